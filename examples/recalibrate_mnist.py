"""Precise BN on the lecture's CNN: validation accuracy before and after.

Trains the lecture's CNN for one epoch on the 50,000 MNIST training images
(plain SGD, as in the lecture), then evaluates it on the 10,000 validation
images with the moving statistics that training left behind: exponential
averages over the last few hundred batches, taken while the weights were still
moving. ``kerasbn.recalibrate`` then replaces every BN layer's moving mean and
variance with the exact population statistics of one pass over the training
images (at the training batch size), and the model is evaluated again. No
other weight changes.

Run:
    python examples/recalibrate_mnist.py
    python examples/recalibrate_mnist.py --limit 5000   # a quick run

Example:
    >>> from recalibrate_mnist import parse_args  # doctest: +SKIP
    >>> parse_args([]).batch_size  # doctest: +SKIP
    32
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
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--limit", type=int, default=None, help="training images")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def moving_statistics(model: keras.Model) -> list[np.ndarray]:
    """Every BN layer's moving mean and variance, in order."""
    return [
        np.asarray(w)
        for layer in model.layers
        if isinstance(layer, kerasbn.BatchNorm)
        for w in (layer.moving_mean, layer.moving_variance)
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mnist = load_mnist(limit=args.limit)
    x_train, x_val = mnist.x_train[..., None], mnist.x_val[..., None]
    print(f"MNIST from {mnist.source}: {len(x_train)} training images")

    keras.utils.set_random_seed(args.seed)
    model = build_lecture_cnn()
    model.compile(
        optimizer=keras.optimizers.SGD(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        x_train,
        mnist.y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=2,
    )
    before_loss, before_acc = model.evaluate(x_val, mnist.y_val, verbose=0)
    weights = model.get_weights()
    statistics = moving_statistics(model)

    start = time.perf_counter()
    kerasbn.recalibrate(model, x_train, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    after_loss, after_acc = model.evaluate(x_val, mnist.y_val, verbose=0)

    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(statistics, moving_statistics(model))
    )
    changed = sum(
        not np.array_equal(a, b) for a, b in zip(weights, model.get_weights())
    )
    print(f"recalibration: one pass over {len(x_train)} images in {seconds:.1f} s")
    print(f"  weights changed: {changed} (the {len(statistics)} moving statistics)")
    print(f"  largest change of a moving statistic: {moved:.4g}")
    print(f"validation accuracy before: {before_acc:.4f}  (loss {before_loss:.4f})")
    print(f"validation accuracy after:  {after_acc:.4f}  (loss {after_loss:.4f})")


if __name__ == "__main__":
    main()
