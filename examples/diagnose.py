"""The classic BN failure, found by ``kerasbn.diagnose`` and fixed by ``recalibrate``.

Trains the lecture's CNN briefly on MNIST with BN's default momentum 0.99:
after a few dozen steps the moving statistics still hold most of their
initial values (mean 0, variance 1), so ``predict`` and ``evaluate``, which
normalize with them, fall far below the accuracy seen in training. This is
the "BatchNorm behaves differently in train() and eval()" report of every
framework's tracker.

``kerasbn.diagnose`` names the BN layers whose statistics are stale, by how
much, and the fix; ``kerasbn.recalibrate`` applies it (one pass over the
training images); a second diagnosis shows every layer ok. Both diagnoses are
printed, and the first one's figure is written to ``--out``.

Run:
    python examples/diagnose.py
    python examples/diagnose.py --limit 1000 --out diagnosis.png

Example:
    >>> from diagnose import parse_args  # doctest: +SKIP
    >>> parse_args([]).steps  # doctest: +SKIP
    60
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
from lecture_cnn import build_lecture_cnn
from mnist_data import load_mnist

import kerasbn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument(
        "--limit", type=int, default=2000, help="validation images to diagnose on"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="diagnosis.png", help="the figure")
    return parser.parse_args(argv)


def batch_mode_accuracy(model: keras.Model, x, y, batch_size: int = 32) -> float:
    """The accuracy with every BN normalizing with its batch's statistics, as
    in training (a ``stateless_call``: the moving statistics do not move)."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    correct = 0
    for start in range(0, len(x), batch_size):
        probabilities, _ = model.stateless_call(
            trainable, non_trainable, x[start : start + batch_size], training=True
        )
        predicted = np.argmax(keras.ops.convert_to_numpy(probabilities), axis=-1)
        correct += int(np.sum(predicted == y[start : start + batch_size]))
    return correct / len(x)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mnist = load_mnist(limit=args.steps * args.batch_size)
    x_train, y_train = mnist.x_train[..., None], mnist.y_train
    x_val, y_val = mnist.x_val[: args.limit, ..., None], mnist.y_val[: args.limit]
    print(f"MNIST from {mnist.source}")

    keras.utils.set_random_seed(args.seed)
    model = build_lecture_cnn()  # kerasbn.BatchNorm(), momentum 0.99
    model.compile(
        optimizer=keras.optimizers.SGD(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(
        x_train, y_train, batch_size=args.batch_size, epochs=1, verbose=0
    )
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    print(
        f"trained {steps} steps: training accuracy "
        f"{history.history['accuracy'][-1]:.4f} (averaged over the epoch)"
    )
    _, accuracy = model.evaluate(x_val, y_val, verbose=0)
    print(
        f"on {len(x_val)} validation images: accuracy {accuracy:.4f} in evaluate "
        f"(moving statistics), {batch_mode_accuracy(model, x_val, y_val):.4f} "
        "normalizing each batch with its own statistics, as training does\n"
    )

    start = time.perf_counter()
    before = kerasbn.diagnose(model, (x_val, y_val), batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    print(f"diagnosis before recalibration ({seconds:.1f} s):")
    print(before)
    before.plot(args.out)
    print(f"figure: {args.out}\n")

    kerasbn.recalibrate(model, x_train, batch_size=args.batch_size)
    after = kerasbn.diagnose(model, (x_val, y_val), batch_size=args.batch_size)
    print("diagnosis after kerasbn.recalibrate(model, x_train):")
    print(after)
    _, accuracy = model.evaluate(x_val, y_val, verbose=0)
    print(f"\nevaluate after recalibration: accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
