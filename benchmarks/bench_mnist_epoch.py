"""One training epoch of the lecture's MNIST CNN: kerasbn vs Keras 3's BN vs no BN.

The CNN is ``examples/lecture_cnn.py``'s: Conv2D(10, 5x5), BN, ReLU, max-pool,
Conv2D(20, 5x5), BN, ReLU, max-pool, Flatten, Dense(100), BN, ReLU,
Dense(10, softmax), on 28x28x1 inputs. Three variants with the same initial
weights: with ``kerasbn.BatchNorm``, with ``keras.layers.BatchNormalization``
(``kerasbn.to_keras`` of the first) and without BN.

Each is compiled the same way (Adam, sparse categorical cross-entropy,
accuracy) and warmed up, then each round times one ``model.fit`` epoch of
every variant, in an order that rotates from round to round. The table shows
the median epoch time and its ratio to the CNN without BN. ``--memory`` adds,
for each variant in a fresh process, the peak RSS while ``fit`` trains 300
steps (after tracing) above the RSS before it.

The data are the 50,000 first MNIST training images (``examples/mnist_data.py``
loads them offline), or with ``--synthetic`` a random tensor of the same shape:
the timing does not depend on the pixel values.

``--backend tensorflow|jax|torch`` picks the Keras backend (default
``$KERAS_BACKEND``, else TensorFlow).

Run:
    python benchmarks/bench_mnist_epoch.py --synthetic
    python benchmarks/bench_mnist_epoch.py --synthetic --backend jax
    python benchmarks/bench_mnist_epoch.py --synthetic --rounds 5 --memory \\
        --json results/epoch.json
    python benchmarks/bench_mnist_epoch.py --ops   # ops per BN layer (TensorFlow)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from harness import (  # noqa: E402
    add_backend_flag,
    add_output_flags,
    interleaved_times,
    machine,
    markdown_table,
    memory_in_child,
    select_backend,
    step_memory_mb,
    write_json,
)

BACKEND = select_backend()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerasbn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lecture_cnn import build_lecture_cnn  # noqa: E402

VARIANTS = ("kerasbn", "keras", "no_bn")
IMAGES = 50_000


def build_variants(seed: int = 0) -> dict[str, keras.Model]:
    """The three compiled CNNs, BN variants with identical weights."""
    keras.utils.set_random_seed(seed)
    with_bn = build_lecture_cnn(batch_norm=True)
    models = {
        "kerasbn": with_bn,
        "keras": kerasbn.to_keras(with_bn),
        "no_bn": build_lecture_cnn(batch_norm=False),
    }
    for model in models.values():
        model.compile(
            optimizer="adam",
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    return models


def load_data(synthetic: bool, images: int):
    """``(x, y)``: images (N, 28, 28, 1) float32 in [0, 1], labels int32."""
    if synthetic:
        rng = np.random.default_rng(0)
        x = rng.random((images, 28, 28, 1), dtype=np.float32)
        return x, rng.integers(0, 10, images).astype("int32")
    from mnist_data import load_mnist

    data = load_mnist(limit=images)
    return data.x_train[..., None], data.y_train


def epoch(model: keras.Model, x, y, batch_size: int):
    """A callable that trains ``model`` for one epoch of ``(x, y)``."""
    return lambda: model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)


def rss_child(variant: str, batch_size: str, steps: str) -> None:
    """Child process: the memory of ``steps`` training steps, printed as JSON.

    The train function is traced on two batches first, so that the figure
    counts the tensors of training rather than the building of the graph.
    """
    model = build_variants()[variant]
    batch_size = int(batch_size)
    x, y = load_data(True, batch_size * int(steps))
    warm = 2 * batch_size
    model.fit(x[:warm], y[:warm], batch_size=batch_size, epochs=1, verbose=0)
    print(json.dumps(step_memory_mb(epoch(model, x, y, batch_size))))


BN_INPUTS = ((32, 24, 24, 10), (32, 8, 8, 20), (32, 100))  # the CNN's 3 BN layers


def count_ops(models: dict, batch: int) -> None:
    """Prints the ops of one traced train step (TensorFlow backend).

    Per variant: the step of ``model.train_step``'s work (forward, loss,
    gradients, Adam) on one batch, and what its BN layers add over the CNN
    without BN, per layer. Per BN input shape: one layer's train step alone
    (forward, backward, moving-average update; ``steps_tensorflow``).
    Counts leave out constants, identities and placeholders; "optimized"
    is after Grappler.
    """
    import steps_tensorflow
    import tensorflow as tf

    x = tf.zeros((batch, 28, 28, 1))
    y = tf.zeros((batch,), tf.int32)
    counts = {}
    for name, model in models.items():

        @tf.function
        def step(x, y, model=model):
            with tf.GradientTape() as tape:
                loss = model.compute_loss(x, y, model(x, training=True))
            weights = model.trainable_variables
            model.optimizer.apply(tape.gradient(loss, weights), weights)

        counts[name] = steps_tensorflow.graph_ops(step, x, y)
    rows = []
    for name, c in counts.items():
        added = [(c[k] - counts["no_bn"][k]) / 3 for k in ("traced", "optimized")]
        rows.append([name, c["traced"], c["optimized"], *(f"{a:.0f}" for a in added)])
    header = ["variant", "step ops", "optimized", "per BN", "per BN optimized"]
    print("\nOps of one train step of the CNN (model, loss, gradients, Adam):\n")
    print(markdown_table(header, rows))
    rows = []
    for shape in BN_INPUTS:
        for name in ("kerasbn", "keras"):
            layer = steps_tensorflow.CONTENDERS[name]()
            layer.build(shape)
            t = tf.zeros(shape)
            c = steps_tensorflow.graph_ops(
                steps_tensorflow.train_step(layer, shape), t, t
            )
            rows.append([str(shape), name, c["traced"], c["optimized"]])
    print("\nOps of one BN layer's train step (forward, backward, moving update):\n")
    print(markdown_table(["BN input", "layer", "ops", "optimized"], rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true", help="random images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--ops",
        action="store_true",
        help="TensorFlow: print the ops a BN layer adds to a train step, then stop",
    )
    add_backend_flag(parser)
    add_output_flags(parser, "peak RSS per variant")
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    if args.ops:
        if BACKEND != "tensorflow":
            parser.error(f"--ops counts TensorFlow graph ops; got --backend {BACKEND}")
        count_ops(build_variants(), args.batch)
        return
    env = machine()
    print(f"# {env}", flush=True)
    x, y = load_data(args.synthetic, args.images)
    models = build_variants()
    for model in models.values():  # trace; feed the whole array once
        model.fit(x, y, batch_size=args.batch, steps_per_epoch=20, verbose=0)
    start = time.perf_counter()
    times = interleaved_times(
        {name: epoch(m, x, y, args.batch) for name, m in models.items()},
        args.rounds,
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"# {time.perf_counter() - start:.0f} s; load average {os.getloadavg()}")
    memory = None
    if args.memory:
        memory = {
            name: memory_in_child(__file__, [name, str(args.batch), "300"])
            for name in VARIANTS
        }
    rows = [
        [
            name,
            f"{medians[name]:.2f}",
            f"{medians[name] / medians['no_bn']:.2f}x",
            f"{1e3 * medians[name] * args.batch / len(x):.2f}",
            f"{memory[name]['step_rss_mb']:.0f}" if memory else "-",
        ]
        for name in VARIANTS
    ]
    header = ["variant", "epoch s", "vs no BN", "ms / step", "training RSS MiB"]
    print(
        f"\n{len(x)} images{' (synthetic)' if args.synthetic else ''}, "
        f"batch {args.batch}, median of {args.rounds} interleaved rounds\n"
    )
    print(markdown_table(header, rows))
    write_json(
        args.json,
        {
            "machine": env,
            "images": len(x),
            "batch": args.batch,
            "synthetic": args.synthetic,
            "rounds": args.rounds,
            "epoch_s": medians,
            "epoch_s_by_round": times,
            "memory_mb": memory,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
