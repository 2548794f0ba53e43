"""A compiled train step of the lecture CNN: kerasbn vs Keras 3's BN vs no BN.

``model.compile(..., jit_compile=True)`` compiles Keras's train step with XLA
on TensorFlow and with ``torch.compile`` on PyTorch (on JAX every train step
is jitted anyway, so ``--backend jax`` measures the default). The CNN is
``examples/lecture_cnn.py``'s (its BN inputs are (32, 24, 24, 10),
(32, 8, 8, 20) and (32, 100) at batch 32), in three variants with the same
initial weights: ``kerasbn.BatchNorm``, ``keras.layers.BatchNormalization``
(``kerasbn.to_keras`` of the first) and no BN, each compiled the same way
(Adam, sparse categorical cross-entropy).

After a warm-up (which compiles), each round times ``--steps`` calls of
``train_on_batch`` on one fixed batch for every variant, in an order that
rotates from round to round; the table gives the median time per step, the
speed ratio of kerasbn to Keras's BN (Keras's time / kerasbn's) and each
variant's time over the CNN without BN. ``--json`` keeps every round.

Run:
    python benchmarks/bench_compiled_step.py --backend tensorflow
    python benchmarks/bench_compiled_step.py --backend torch --rounds 21
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from harness import (  # noqa: E402
    add_backend_flag,
    interleaved_times,
    machine,
    markdown_table,
    select_backend,
    write_json,
)

BACKEND = select_backend()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerasbn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lecture_cnn import build_lecture_cnn  # noqa: E402

VARIANTS = ("kerasbn", "keras", "no_bn")


def build_variants(jit_compile: bool, seed: int = 0) -> dict[str, keras.Model]:
    """The three CNNs, compiled alike; the BN variants share their weights."""
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
            jit_compile=jit_compile,
        )
    return models


def steps(model: keras.Model, x, y, count: int):
    """A callable that runs ``count`` train steps of ``model`` on ``(x, y)``."""

    def run():
        for _ in range(count):
            model.train_on_batch(x, y)

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing")
    parser.add_argument(
        "--no-jit", action="store_true", help="compile with jit_compile=False instead"
    )
    parser.add_argument("--json", default=None, help="write the figures here")
    add_backend_flag(parser)
    args = parser.parse_args(argv)
    env = machine()
    print(f"# {env}", flush=True)
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, args.batch).astype("int32")
    models = build_variants(jit_compile=not args.no_jit)
    start = time.perf_counter()
    for model in models.values():
        steps(model, x, y, args.warmup)()
    print(f"# warm-up (compilation) {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()
    times = interleaved_times(
        {name: steps(m, x, y, args.steps) for name, m in models.items()},
        args.rounds,
    )
    ms = {name: 1e3 * statistics.median(t) / args.steps for name, t in times.items()}
    print(f"# {time.perf_counter() - start:.0f} s; load average {os.getloadavg()}")
    rows = [
        [
            name,
            f"{ms[name]:.3f}",
            f"{ms['keras'] / ms[name]:.2f}x",
            f"{ms[name] / ms['no_bn']:.2f}x",
        ]
        for name in VARIANTS
    ]
    mode = "jit_compile=False" if args.no_jit else "jit_compile=True"
    print(
        f"\n{BACKEND}, {mode}, batch {args.batch}, medians of {args.rounds} "
        f"interleaved rounds of {args.steps} steps\n"
    )
    header = ["variant", "ms / step", "speed vs Keras BN", "time vs no BN"]
    print(markdown_table(header, rows))
    write_json(
        args.json,
        {
            "machine": env,
            "backend": BACKEND,
            "jit_compile": not args.no_jit,
            "batch": args.batch,
            "rounds": args.rounds,
            "steps": args.steps,
            "ms_per_step": ms,
            "seconds_by_round": times,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
