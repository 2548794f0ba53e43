"""The time of ``kerasbn.diagnose`` against one ``predict`` over the same data.

``diagnose`` makes one pass with every BN recording batch statistics, then
runs the model at inference twice (moving statistics, population statistics)
and, with labels, scores both; ``predict`` makes one inference pass. The
script times, side by side over the same images and batch size:

* ``predict``: ``model.predict(x, batch_size=...)``;
* ``evaluate``: ``model.evaluate(x, y, batch_size=...)`` (one scored pass);
* ``recalibrate``: ``kerasbn.recalibrate(copy, x, batch_size=...)`` (the
  statistics pass alone, and the assignment), on a second model built alike
  (recalibrate drops a model's compiled functions, which would make
  ``predict`` trace again);
* ``diagnose``: ``kerasbn.diagnose(model, (x, y), batch_size=...)``.

Every contender runs once to warm up (tracing, compiling), then the medians
of ``--rounds`` interleaved rounds are printed with their ratio to
``predict``. The model is the lecture's MNIST CNN (``--model lecture``) or
Keras's MobileNetV3Small on 32x32 images (``--model mobilenet``), with
random weights; the images are random.

Run:
    python benchmarks/bench_diagnose.py --backend tensorflow
    python benchmarks/bench_diagnose.py --backend jax --model mobilenet --images 512
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness import add_backend_flag, select_backend

if __name__ == "__main__":
    select_backend()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from harness import interleaved_medians, machine, markdown_table, write_json  # noqa: E402

import kerasbn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lecture_cnn import build_lecture_cnn  # noqa: E402


def build(name: str) -> tuple[keras.Model, tuple[int, ...]]:
    """The model and its input shape, compiled with accuracy."""
    keras.utils.set_random_seed(0)
    if name == "lecture":
        model, shape = build_lecture_cnn(), (28, 28, 1)
    else:
        shape = (32, 32, 3)
        model = keras.applications.MobileNetV3Small(
            input_shape=shape, weights=None, classes=10, include_preprocessing=False
        )
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model, shape


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backend_flag(parser)
    parser.add_argument("--model", choices=("lecture", "mobilenet"), default="lecture")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = machine()
    print(f"# {env}", flush=True)
    model, shape = build(args.model)
    copy, _ = build(args.model)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (args.images, *shape)).astype("float32")
    y = rng.integers(0, 10, args.images).astype("int32")
    batch = args.batch_size
    contenders = {
        "predict": lambda: model.predict(x, batch_size=batch, verbose=0),
        "evaluate": lambda: model.evaluate(x, y, batch_size=batch, verbose=0),
        "recalibrate": lambda: kerasbn.recalibrate(copy, x, batch_size=batch),
        "diagnose": lambda: kerasbn.diagnose(model, (x, y), batch_size=batch),
    }
    warm = interleaved_medians(contenders, rounds=1)  # traces, compiles
    medians = interleaved_medians(contenders, rounds=args.rounds)
    rows = [
        [
            name,
            f"{warm[name]:.3f}",
            f"{seconds:.3f}",
            f"{seconds / medians['predict']:.2f}x",
        ]
        for name, seconds in medians.items()
    ]
    print(
        f"# {keras.backend.backend()}, {args.model}, {args.images} images in "
        f"batches of {batch}; medians of {args.rounds} interleaved rounds after one "
        f"warm-up round; load average at the end: {os.getloadavg()}"
    )
    print(
        markdown_table(
            ["contender", "first call (s)", "median (s)", "vs predict"], rows
        )
    )
    write_json(
        args.json,
        {"machine": env, "settings": vars(args), "first": warm, "median": medians},
    )


if __name__ == "__main__":
    main()
