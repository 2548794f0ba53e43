"""Trains the lecture's MNIST CNN with and without BN and compares convergence.

Both runs use the same data (50,000 training and 10,000 validation images),
seed, optimizer and batch size, and see the batches in the same order (a
new permutation every epoch); only the three ``kerasbn.BatchNorm`` layers
differ. The script prints the per-epoch log of each run, then a summary:
the epoch at which val_acc first reaches ``--target``, the best val_acc and
the seconds per epoch of each model, and the ratio of epochs-to-target
without BN to with BN. With ``--activation sigmoid`` it shows the lecture's
other claim: under plain SGD a sigmoid CNN barely trains without BN.

Run:
    python examples/mnist_convergence.py
    python examples/mnist_convergence.py --activation sigmoid --out results/sigmoid

Writes ``OUT/mnist_convergence.json`` and ``OUT/mnist_convergence.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import keras
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from batches import ShuffledBatches
from lecture_cnn import ACTIVATIONS, build_lecture_cnn
from matplotlib.ticker import MaxNLocator
from mnist_data import Mnist, MnistNotFoundError, load_mnist

import kerasbn

OPTIMIZERS = {
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
    "adam": keras.optimizers.Adam,
}
RUNS = (("with_bn", True), ("without_bn", False))
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


class EpochTimer(keras.callbacks.Callback):
    """Records the wall-clock seconds of each epoch, validation included."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments, without the program name; None reads sys.argv.

    Returns:
        The parsed flags.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--target", type=float, default=0.98, help="val_acc goal")
    parser.add_argument(
        "--limit", type=int, default=None, help="use only N training images"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    return parser.parse_args(argv)


def epochs_to_target(val_accuracy: list[float], target: float) -> int | None:
    """Returns the first epoch (1-based) whose val_acc reaches ``target``.

    Args:
        val_accuracy: Validation accuracy after each epoch.
        target: The accuracy to reach.

    Returns:
        The epoch number, or None if never reached.
    """
    for epoch, accuracy in enumerate(val_accuracy, start=1):
        if accuracy >= target:
            return epoch
    return None


def train(batch_norm: bool, args: argparse.Namespace, data: Mnist) -> dict:
    """Trains one CNN and returns its per-epoch history and summary.

    Args:
        batch_norm: Whether the CNN has its BN layers.
        args: The parsed flags.
        data: The MNIST arrays.

    Returns:
        Per-epoch ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy`` and
        ``epoch_seconds``, plus ``epochs_to_target``, ``best_val_accuracy``
        and ``seconds_per_epoch`` (the median, robust to the first epoch's
        graph tracing).
    """
    keras.utils.set_random_seed(args.seed)
    model = build_lecture_cnn(batch_norm=batch_norm, activation=args.activation)
    model.compile(
        optimizer=OPTIMIZERS[args.optimizer](learning_rate=args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    timer = EpochTimer()
    print(f"\n=== {model.name}: {model.count_params():,} parameters ===")
    batches = ShuffledBatches(
        data.x_train[..., None], data.y_train, args.batch_size, seed=args.seed
    )
    history = model.fit(
        batches,
        epochs=args.epochs,
        validation_data=(data.x_val[..., None], data.y_val),
        # BN runs in inference mode here, so the batch size changes no number;
        # large batches only make the 10,000-image pass cheaper.
        validation_batch_size=1000,
        callbacks=[timer],
        verbose=1,
    )
    run = {k: [float(v) for v in history.history[k]] for k in METRICS}
    run["epoch_seconds"] = timer.seconds
    run["epochs_to_target"] = epochs_to_target(run["val_accuracy"], args.target)
    run["best_val_accuracy"] = max(run["val_accuracy"])
    run["seconds_per_epoch"] = statistics.median(timer.seconds)
    return run


def epochs_ratio(runs: dict, epochs: int) -> dict:
    """Compares epochs-to-target without BN with those with BN.

    Args:
        runs: The two runs, keyed ``with_bn`` and ``without_bn``.
        epochs: Epochs trained, the bound used when a run never got there.

    Returns:
        ``{"ratio": r, "ratio_lower_bound": b, "text": ...}``: ``r`` when both
        reached the target, else ``b`` (more than ``epochs / with_bn``) when
        only the BN model did; both None when the BN model did not.
    """
    with_bn = runs["with_bn"]["epochs_to_target"]
    without_bn = runs["without_bn"]["epochs_to_target"]
    if with_bn is None:
        return {
            "ratio": None,
            "ratio_lower_bound": None,
            "text": "n/a (BN: not reached)",
        }
    if without_bn is None:
        bound = epochs / with_bn
        text = f"> {bound:.2f} (without BN: not reached in {epochs} epochs)"
        return {"ratio": None, "ratio_lower_bound": bound, "text": text}
    ratio = without_bn / with_bn
    return {"ratio": ratio, "ratio_lower_bound": None, "text": f"{ratio:.2f}"}


def print_report(runs: dict, ratio: dict, args: argparse.Namespace) -> None:
    """Prints the per-epoch log of both runs and the summary table.

    Args:
        runs: The two runs.
        ratio: The output of ``epochs_ratio``.
        args: The parsed flags.
    """
    print("\nPer-epoch log (loss, acc, val_loss, val_acc):")
    for key, _ in RUNS:
        print(f"  {key}:")
        run = runs[key]
        for i in range(len(run["loss"])):
            print(
                f"    Epoch {i + 1:>2}/{args.epochs}: loss {run['loss'][i]:.4f}"
                f" - acc {run['accuracy'][i]:.4f}"
                f" - val_loss {run['val_loss'][i]:.4f}"
                f" - val_acc {run['val_accuracy'][i]:.4f}"
                f" ({run['epoch_seconds'][i]:.1f} s)"
            )

    print(f"\nSummary (target val_acc {args.target:g}):")
    print(f"  {'model':<12}{'epochs to target':>18}{'best val_acc':>14}{'s/epoch':>10}")
    for key, _ in RUNS:
        run = runs[key]
        reached = run["epochs_to_target"] or "not reached"
        print(
            f"  {key:<12}{reached!s:>18}{run['best_val_accuracy']:>14.4f}"
            f"{run['seconds_per_epoch']:>10.1f}"
        )
    print(f"  ratio of epochs to target, without BN / with BN: {ratio['text']}")
    if args.activation == "sigmoid":
        print(
            "  Sigmoid under SGD: best val_acc without BN "
            f"{runs['without_bn']['best_val_accuracy']:.4f} vs with BN "
            f"{runs['with_bn']['best_val_accuracy']:.4f} (chance is 0.10)."
        )


def plot(runs: dict, args: argparse.Namespace, n_train: int, path: Path) -> None:
    """Plots val accuracy and training loss against the epoch for both runs.

    Args:
        runs: The two runs.
        args: The parsed flags, for the title.
        n_train: Number of training images used.
        path: Where to write the PNG.
    """
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    for key, batch_norm in RUNS:
        run = runs[key]
        epochs = range(1, len(run["loss"]) + 1)
        label = "with BN" if batch_norm else "without BN"
        acc_ax.plot(epochs, run["val_accuracy"], marker="o", label=label)
        loss_ax.plot(epochs, run["loss"], marker="o", label=label)
    acc_ax.axhline(
        args.target, color="gray", linestyle="--", label=f"target {args.target:g}"
    )
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy", title="val accuracy")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    loss_ax.set_yscale("log")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"Lecture CNN on MNIST ({n_train:,} train / 10,000 val): "
        f"{args.activation}, {args.optimizer} lr {args.learning_rate:g}, "
        f"batch {args.batch_size}, seed {args.seed}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Trains both models, prints the report, writes the JSON and PNG.

    Args:
        argv: Arguments, without the program name; None reads sys.argv.
    """
    args = parse_args(argv)
    try:
        data = load_mnist(limit=args.limit)
    except MnistNotFoundError as error:
        sys.exit(str(error))
    print(f"MNIST from {data.source}")
    print(f"{len(data.x_train):,} training and {len(data.x_val):,} validation images")
    args.out.mkdir(parents=True, exist_ok=True)

    runs = {key: train(batch_norm, args, data) for key, batch_norm in RUNS}
    ratio = epochs_ratio(runs, args.epochs)
    print_report(runs, ratio, args)

    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config.update(
        n_train=len(data.x_train),
        n_val=len(data.x_val),
        data_source=data.source,
        keras_version=keras.__version__,
        kerasbn_version=kerasbn.__version__,
    )
    result = {**runs, "config": config, "summary": ratio}
    (args.out / "mnist_convergence.json").write_text(json.dumps(result, indent=2))
    plot(runs, args, len(data.x_train), args.out / "mnist_convergence.png")
    print(f"Wrote {args.out / 'mnist_convergence.json'} and mnist_convergence.png")


if __name__ == "__main__":
    main()
