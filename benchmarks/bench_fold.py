"""Inference speed before and after ``kerasbn.fold_batch_norms``.

Two models, each in three variants measured side by side: with
``kerasbn.BatchNorm`` layers (as built), with ``keras.layers.BatchNormalization``
(``kerasbn.to_keras`` of it) and folded (``kerasbn.fold_batch_norms`` of it).
The models are the lecture's MNIST CNN (``examples/lecture_cnn.py``) and a
small ResNet-style conv stack; their BN layers get random trained-looking
statistics, and the script checks that every variant predicts the same.

Each round times ``--calls`` calls of ``model.predict_on_batch`` per variant,
for a batch of 1 (latency) and a batch of ``--batch`` (throughput); the
variants take turns within a round, the order rotating from round to round.
The table shows the medians over ``--rounds`` rounds and the folded model's
speed-up against each BN variant.

Run:
    python benchmarks/bench_fold.py
    python benchmarks/bench_fold.py --rounds 31 --json results/bench_fold.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from harness import interleaved_medians, machine, markdown_table, write_json  # noqa: E402

import kerasbn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lecture_cnn import build_lecture_cnn  # noqa: E402

VARIANTS = ("kerasbn_bn", "keras_bn", "folded")


def build_resnet_stack(blocks: int = 3, width: int = 16) -> keras.Model:
    """A small ResNet-style stack on 32x32x3 images: stem, residual blocks, head.

    Each block is ``Conv-BN-ReLU-Conv-BN``, added to its input, then ReLU; the
    stem is ``Conv-BN-ReLU``, and the head global average pooling and
    ``Dense(10, softmax)``. Every BN follows a bias-free conv, as in ResNet.
    """

    def conv_bn(x):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        return kerasbn.BatchNorm()(x)

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.ReLU()(conv_bn(inputs))
    for _ in range(blocks):
        y = conv_bn(keras.layers.ReLU()(conv_bn(x)))
        x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="resnet_stack")


MODELS = {"lecture_cnn": build_lecture_cnn, "resnet_stack": build_resnet_stack}


def with_trained_statistics(model: keras.Model, rng: np.random.Generator):
    """Gives every BN layer random trained-looking gamma, beta and statistics."""
    for layer in model.layers:
        if isinstance(layer, kerasbn.BatchNorm):
            c = layer.moving_mean.shape
            layer.set_weights(
                [
                    rng.uniform(0.5, 2.0, c),
                    rng.normal(0.0, 0.5, c),
                    rng.normal(0.0, 1.0, c),
                    rng.uniform(0.5, 2.0, c),
                ]
            )
    return model


def variants(model: keras.Model) -> dict[str, keras.Model]:
    return {
        "kerasbn_bn": model,
        "keras_bn": kerasbn.to_keras(model),
        "folded": kerasbn.fold_batch_norms(model),
    }


def max_relative_difference(models: dict[str, keras.Model], x) -> float:
    """Largest ``max|y - y_ref| / max|y_ref|`` of a variant from the first."""
    outputs = [np.asarray(m.predict_on_batch(x)) for m in models.values()]
    scale = np.max(np.abs(outputs[0]))
    return max(float(np.max(np.abs(y - outputs[0])) / scale) for y in outputs[1:])


def measure(models: dict[str, keras.Model], x, rounds: int, calls: int) -> dict:
    """Median seconds per ``predict_on_batch(x)`` call of each variant."""
    contenders = {name: lambda m=m: m.predict_on_batch(x) for name, m in models.items()}
    interleaved_medians(contenders, rounds=1, repeats=3)  # trace and warm up
    return interleaved_medians(contenders, rounds, repeats=calls)


def bench_model(name: str, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    model = with_trained_statistics(MODELS[name](), rng)
    models = variants(model)
    shape = model.input_shape[1:]
    one = rng.normal(size=(1, *shape)).astype("float32")
    batch = rng.normal(size=(args.batch, *shape)).astype("float32")
    latency = measure(models, one, args.rounds, args.calls)
    batch_seconds = measure(models, batch, args.rounds, max(1, args.calls // 4))
    return {
        "model": name,
        "params": {v: m.count_params() for v, m in models.items()},
        "max_relative_difference": max_relative_difference(models, batch),
        "latency_ms": {v: 1e3 * s for v, s in latency.items()},
        "throughput_per_s": {v: args.batch / s for v, s in batch_seconds.items()},
        "speedup_latency": {v: latency[v] / latency["folded"] for v in VARIANTS[:2]},
        "speedup_throughput": {
            v: batch_seconds[v] / batch_seconds["folded"] for v in VARIANTS[:2]
        },
    }


def table(results: list[dict]) -> str:
    """Markdown table: medians per variant and the folded model's speed-ups."""
    header = [
        "model",
        "variant",
        "params",
        "batch-1 latency (ms)",
        "samples/s",
        "fold speed-up (latency / throughput)",
    ]
    rows = []
    for res in results:
        for v in VARIANTS:
            speedup = (
                f"{res['speedup_latency'][v]:.2f}x / {res['speedup_throughput'][v]:.2f}x"
                if v in res["speedup_latency"]
                else "-"
            )
            rows.append(
                [
                    res["model"],
                    v,
                    res["params"][v],
                    f"{res['latency_ms'][v]:.3f}",
                    f"{res['throughput_per_s'][v]:.0f}",
                    speedup,
                ]
            )
    return markdown_table(header, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS)
    )
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument(
        "--calls", type=int, default=40, help="calls per round (batch 1)"
    )
    parser.add_argument("--batch", type=int, default=128, help="throughput batch size")
    parser.add_argument("--threads", type=int, default=None, help="TF intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    env = machine()
    print(f"# {env}", flush=True)
    results = [bench_model(name, args) for name in args.models]
    print(
        f"# predict_on_batch, medians of {args.rounds} interleaved rounds; batch 1 "
        f"latency, batch {args.batch} throughput; load average at the end: "
        f"{os.getloadavg()}"
    )
    print(table(results))
    for res in results:
        print(
            f"# {res['model']}: largest relative difference between variants "
            f"{res['max_relative_difference']:.1e}"
        )
    settings = {k: getattr(args, k) for k in ("rounds", "calls", "batch", "threads")}
    write_json(args.json, {"machine": env, "settings": settings, "results": results})


if __name__ == "__main__":
    main()
