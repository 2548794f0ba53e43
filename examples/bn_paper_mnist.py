"""Reproduces Figure 1 of Ioffe & Szegedy (2015) on MNIST.

A 784-100-100-100-10 network with sigmoid hidden units is trained with SGD on
mini-batches of 60 (reshuffled every epoch), once as is and once with ``kerasbn.BatchNorm`` between
each hidden layer's affine map and its sigmoid (the affine map then has no
bias: BN's beta replaces it). It trains on the 60,000 MNIST training images
(the lecture's 50k train + 10k validation) and is evaluated on the 10,000
test images every ``--eval-every`` steps. At each evaluation the script also
records the 15th, 50th and 85th percentiles, over the test images, of one
last-hidden-layer unit's input to its sigmoid (with BN: the BN output).

The paper does not give its learning rate; the default here is 0.1 (at 0.01
the network without BN stays near chance for the first few thousand steps).

The PNG has the paper's three panels: (a) test accuracy against steps for
both networks; (b) the percentiles without BN; (c) with BN.

Run:
    python examples/bn_paper_mnist.py [--steps 50000]

Writes ``OUT/bn_paper_mnist.json`` and ``OUT/bn_paper_mnist.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import keras
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from batches import ShuffledBatches
from mnist_data import Mnist, MnistNotFoundError, load_mnist

import kerasbn

PERCENTILES = (15, 50, 85)
RUNS = (("with_bn", True), ("without_bn", False))


def build_mlp(batch_norm: bool) -> tuple[keras.Model, keras.Model]:
    """Builds the paper's 784-100-100-100-10 sigmoid network.

    Args:
        batch_norm: Insert ``kerasbn.BatchNorm`` before each hidden sigmoid.

    Returns:
        ``(model, probe)``: the classifier, and a model sharing its layers
        that returns ``[class probabilities, last hidden layer's input to
        its sigmoid]``.
    """
    inputs = keras.Input(shape=(784,))
    h = inputs
    for i in range(1, 4):
        h = keras.layers.Dense(100, use_bias=not batch_norm, name=f"dense_{i}")(h)
        if batch_norm:
            h = kerasbn.BatchNorm(name=f"bn_{i}")(h)
        pre_sigmoid = h
        h = keras.layers.Activation("sigmoid", name=f"sigmoid_{i}")(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="softmax")(h)
    name = "mlp_bn" if batch_norm else "mlp_no_bn"
    model = keras.Model(inputs, outputs, name=name)
    probe = keras.Model(inputs, [outputs, pre_sigmoid], name=f"{name}_probe")
    return model, probe


class Recorder(keras.callbacks.Callback):
    """Evaluates on the test set every ``every`` steps, and stops at ``steps``.

    Test accuracy comes from ``predict`` (not ``evaluate``), so that the
    training metrics are left alone.
    """

    def __init__(
        self,
        probe: keras.Model,
        x_test: np.ndarray,
        y_test: np.ndarray,
        unit: int,
        every: int,
        steps: int,
        steps_per_epoch: int,
    ) -> None:
        super().__init__()
        self.probe, self.x_test, self.y_test = probe, x_test, y_test
        self.unit, self.every, self.steps = unit, every, steps
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self.record: dict[str, list] = {"steps": [], "test_accuracy": []}
        self.record.update({str(p): [] for p in PERCENTILES})

    def measure(self, step: int) -> None:
        """Records test accuracy and the unit's percentiles at ``step``."""
        # On JAX, fit() keeps the weights in its own state; reading
        # ``self.model`` writes them back into the variables the probe shares.
        self.model  # noqa: B018
        probs, pre_sigmoid = self.probe.predict(self.x_test, batch_size=2000, verbose=0)
        accuracy = float(np.mean(np.argmax(probs, axis=1) == self.y_test))
        values = np.percentile(pre_sigmoid[:, self.unit], PERCENTILES)
        self.record["steps"].append(step)
        self.record["test_accuracy"].append(accuracy)
        for p, value in zip(PERCENTILES, values):
            self.record[str(p)].append(float(value))

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.measure(0)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        step = self.epoch * self.steps_per_epoch + batch + 1
        if step % self.every == 0 or step == self.steps:
            self.measure(step)
            print(
                f"  step {step:>6,}: test accuracy "
                f"{self.record['test_accuracy'][-1]:.4f}",
                flush=True,
            )
        if step >= self.steps:
            self.model.stop_training = True


def train(batch_norm: bool, args: argparse.Namespace, data: Mnist) -> dict:
    """Trains one network and returns what it recorded.

    Args:
        batch_norm: Whether the network has BN.
        args: The parsed flags.
        data: The MNIST arrays.

    Returns:
        ``steps``, ``test_accuracy`` and the percentile series (keys "15",
        "50", "85"), plus ``final_test_accuracy`` and ``seconds`` (training
        and evaluations).
    """
    x_train = np.concatenate([data.x_train, data.x_val]).reshape(-1, 784)
    y_train = np.concatenate([data.y_train, data.y_val])
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    keras.utils.set_random_seed(args.seed)
    model, probe = build_mlp(batch_norm)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=args.learning_rate),
        loss="sparse_categorical_crossentropy",
        # Many steps per call for speed, but a call ends at every evaluation;
        # Keras's PyTorch trainer runs one step per call.
        steps_per_execution=1
        if keras.backend.backend() == "torch"
        else math.gcd(args.eval_every, args.steps, steps_per_epoch),
    )
    recorder = Recorder(
        probe,
        data.x_test.reshape(-1, 784),
        data.y_test,
        args.unit,
        args.eval_every,
        args.steps,
        steps_per_epoch,
    )
    print(f"\n=== {model.name}: {model.count_params():,} parameters ===")
    start = time.perf_counter()
    model.fit(
        ShuffledBatches(x_train, y_train, args.batch_size, seed=args.seed),
        epochs=math.ceil(args.steps / steps_per_epoch),
        callbacks=[recorder],
        verbose=0,
    )
    run = dict(recorder.record)
    run["final_test_accuracy"] = run["test_accuracy"][-1]
    run["seconds"] = time.perf_counter() - start
    return run


def plot(runs: dict, args: argparse.Namespace, path: Path) -> None:
    """Draws the paper's three panels.

    Args:
        runs: The two runs.
        args: The parsed flags, for the titles.
        path: Where to write the PNG.
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for key, batch_norm in RUNS:
        label = "with BN" if batch_norm else "without BN"
        axes[0].plot(runs[key]["steps"], runs[key]["test_accuracy"], label=label)
    axes[0].set(xlabel="training step", ylabel="test accuracy")
    axes[0].set_title("(a) test accuracy")
    trained = [a for k, _ in RUNS for a in runs[k]["test_accuracy"][1:]]
    axes[0].set_ylim(max(0.0, min(trained, default=0.0) - 0.02), 1.0)
    axes[0].legend()

    low = min(min(runs[k][str(p)]) for k, _ in RUNS for p in PERCENTILES)
    high = max(max(runs[k][str(p)]) for k, _ in RUNS for p in PERCENTILES)
    margin = 0.05 * (high - low)
    for ax, (key, title) in zip(
        axes[1:], (("without_bn", "(b) without BN"), ("with_bn", "(c) with BN"))
    ):
        for p in PERCENTILES:
            ax.plot(runs[key]["steps"], runs[key][str(p)], label=f"{p}th percentile")
        ax.set_ylim(low - margin, high + margin)
        ax.set(xlabel="training step", ylabel=f"input to sigmoid of unit {args.unit}")
        ax.set_title(f"{title}: last hidden layer, unit {args.unit}")
        ax.legend()
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(
        "Ioffe & Szegedy (2015) Fig. 1 on MNIST: 784-100-100-100-10 sigmoid, "
        f"SGD lr {args.learning_rate:g}, batch {args.batch_size}, seed {args.seed}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments, without the program name; None reads sys.argv.

    Returns:
        The parsed flags.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--unit", type=int, default=0, help="last-layer unit (0-99)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or not 0 <= args.unit < 100:
        parser.error("--steps and --eval-every must be >= 1, --unit in 0..99")
    return args


def main(argv: list[str] | None = None) -> None:
    """Trains both networks, prints the results, writes the JSON and PNG.

    Args:
        argv: Arguments, without the program name; None reads sys.argv.
    """
    args = parse_args(argv)
    try:
        data = load_mnist()
    except MnistNotFoundError as error:
        sys.exit(str(error))
    print(f"MNIST from {data.source}")
    args.out.mkdir(parents=True, exist_ok=True)

    runs = {key: train(batch_norm, args, data) for key, batch_norm in RUNS}
    print(f"\nAfter {args.steps:,} steps of batch {args.batch_size}:")
    for key, _ in RUNS:
        run = runs[key]
        print(
            f"  {key:<11} final test accuracy {run['final_test_accuracy']:.4f}"
            f"  ({run['seconds']:.0f} s)"
        )

    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config.update(
        n_train=len(data.x_train) + len(data.x_val),
        n_test=len(data.x_test),
        data_source=data.source,
        keras_version=keras.__version__,
        kerasbn_version=kerasbn.__version__,
    )
    result = {**runs, "config": config}
    (args.out / "bn_paper_mnist.json").write_text(json.dumps(result, indent=2))
    plot(runs, args, args.out / "bn_paper_mnist.png")
    print(f"Wrote {args.out / 'bn_paper_mnist.json'} and bn_paper_mnist.png")


if __name__ == "__main__":
    main()
