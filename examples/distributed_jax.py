"""Synchronized BN on JAX: ``keras.distribution.DataParallel`` over N CPU devices.

``distributed_sync_bn.py --backend jax --workers N`` lands here. On JAX the
"workers" are N devices of one process: JAX makes N CPU devices only when
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` is set before it
starts, so :func:`main` re-runs this file in a fresh Python with that flag and
``KERAS_BACKEND=jax``. There, the lecture's CNN, with ``synchronized=True``
BN, trains with ``Model.fit`` under ``keras.distribution.DataParallel``: each
global batch is split over the devices, and Keras compiles one SPMD program
for all of them, in which the BN statistics (and the loss and gradients) are
those of the global batch. Then the same model trains on one device on the
same global batches (``fit`` without a distribution).

Under SPMD the devices do not each own a model: the weights and moving
statistics are one array replicated on every device. The script prints each
device's copy of the first BN layer's moving statistics, the largest
difference between the device copies (zero by construction), and the largest
difference from the single device over the moving statistics and all
weights. For scale it prints, as the TensorFlow version does, how far one
device lands from itself when each batch's samples are merely reversed
(float32 rounding, amplified by training), and how far it lands with
``synchronized=False``, which on JAX takes the fast path: the same global
statistics, computed by another float32 formulation.

Run:
    python examples/distributed_sync_bn.py --backend jax --workers 2
    python examples/distributed_jax.py --workers 2 --synthetic --samples 640

Example:
    >>> import distributed_jax  # doctest: +SKIP
    >>> distributed_jax.main(["--workers", "2", "--model", "tiny"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def device_env(devices: int) -> dict[str, str]:
    """The environment of a JAX process with ``devices`` CPU devices."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith(DEVICE_FLAG)]
    return {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": " ".join([*flags, f"{DEVICE_FLAG}={devices}"]),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    }


def train(
    config,
    devices: int = 1,
    reverse_batches: bool = False,
    synchronized: bool = True,
) -> list[dict]:
    """One epoch of ``fit`` over the data, on ``devices`` devices.

    With more than one device, ``fit`` runs under
    ``keras.distribution.DataParallel`` over the first ``devices`` devices;
    the loss of each step is the mean over the global batch, as on one
    device.

    Args:
        config: a ``distributed_sync_bn.Config``: what to train.
        devices: how many devices to spread each batch over.
        reverse_batches: reverse the order of the samples inside each batch.
        synchronized: give the BN layers ``synchronized=True``. On JAX that
            computes the statistics with ``kerasbn.formulas`` (global under SPMD
            either way); False takes the JAX fast path.

    Returns:
        One dict per device: its copy of ``first_bn_moving_mean``,
        ``first_bn_moving_variance`` and ``weight_<i>`` for every weight, as
        NumPy arrays, and ``local_samples``: the samples of the epoch.
    """
    import jax
    import keras
    import numpy as np
    from distributed_sync_bn import (
        LOCAL_SAMPLES,
        build_model,
        default_float,
        first_bn,
        load_data,
        reverse_within_batches,
        synchronized_copy,
    )

    keras.utils.set_random_seed(config.seed)
    with default_float(config.dtype):
        base = build_model(config.model)
    distribution = None
    if devices > 1:
        distribution = keras.distribution.DataParallel(devices=jax.devices()[:devices])
    with _distribution_scope(distribution), default_float(config.dtype):
        model = synchronized_copy(base) if synchronized else base
        model.compile(
            optimizer=keras.optimizers.SGD(config.learning_rate),
            loss="sparse_categorical_crossentropy",
        )
        x, y = load_data(config, model.input_shape[1:])
        if reverse_batches:
            x, y = (reverse_within_batches(a, config.batch_size) for a in (x, y))
        model.fit(x, y, batch_size=config.batch_size, shuffle=False, verbose=0)
    bn = first_bn(model)
    named = {
        "first_bn_moving_mean": bn.moving_mean,
        "first_bn_moving_variance": bn.moving_variance,
        **{f"weight_{i}": w for i, w in enumerate(model.weights)},
    }
    copies = []
    for d in range(devices):
        arrays = {LOCAL_SAMPLES: np.asarray(len(x))}
        for name, variable in named.items():
            shards = variable.value.addressable_shards
            arrays[name] = np.asarray(shards[d % len(shards)].data)
        copies.append(arrays)
    return copies


class _distribution_scope:
    """``keras.distribution.distribution()`` is ``distribution`` inside."""

    def __init__(self, distribution):
        self.distribution = distribution

    def __enter__(self):
        import keras

        self.previous = keras.distribution.distribution()
        keras.distribution.set_distribution(self.distribution)

    def __exit__(self, *exc):
        import keras

        keras.distribution.set_distribution(self.previous)


def report(
    copies: list[dict], single: dict, single_reversed: dict, single_fast: dict
) -> None:
    """Prints every device's copy of the first BN's statistics and the differences.

    Args:
        copies: each device's copy of the arrays after training on all devices.
        single: one device, the same model (synchronized BN) and batches.
        single_reversed: the same, with each batch's samples in reverse order:
            its difference from ``single`` is the rounding floor of training.
        single_fast: one device with ``synchronized=False`` (the JAX fast path).
    """
    import numpy as np
    from distributed_sync_bn import max_difference

    np.set_printoptions(precision=6, suppress=True, linewidth=100)
    for index, arrays in enumerate(copies):
        for name in ("moving_mean", "moving_variance"):
            print(f"device {index} first BN {name:15s} {arrays['first_bn_' + name]}")
    between = max(max_difference(copies[0], c) for c in copies)
    from_single = max(max_difference(c, single) for c in copies)
    floor = max_difference(single_reversed, single)
    print(
        "largest difference between the devices' copies: "
        f"{between:.3g} (under SPMD they hold one replicated array)"
    )
    print(f"largest difference from one device on the same batches: {from_single:.3g}")
    print(
        "  for scale, one device against itself with each batch's samples "
        f"reversed: {floor:.3g}"
    )
    fast = max(max_difference(c, single_fast) for c in copies)
    print(
        "largest difference from one device with synchronized=False (the fast "
        f"path, another float32 formulation): {fast:.3g}"
    )


def run_child(args: argparse.Namespace) -> None:
    """This process has the devices: trains on them, then on one, and reports."""
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import keras
    from distributed_sync_bn import Config

    assert keras.backend.backend() == "jax", keras.backend.backend()
    if len(jax.devices()) < args.workers:
        raise RuntimeError(
            f"--workers={args.workers} needs that many JAX devices; found "
            f"{jax.devices()} (is {DEVICE_FLAG} in XLA_FLAGS?)"
        )
    config = Config.from_args(args)
    if config.batch_size % args.workers:
        raise ValueError(
            f"--batch-size={config.batch_size} must be a multiple of "
            f"--workers={args.workers}: DataParallel splits each batch evenly."
        )
    steps = -(-config.samples // config.batch_size)
    print(
        f"{args.workers} JAX devices under keras.distribution.DataParallel, "
        f"{steps} steps of global batch {config.batch_size}",
        flush=True,
    )
    copies = train(config, devices=args.workers)
    report(
        copies,
        train(config)[0],
        train(config, reverse_batches=True)[0],
        train(config, synchronized=False)[0],
    )


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Runs the JAX version: in a fresh process that has ``--workers`` devices.

    Args:
        args: ``distributed_sync_bn.parse_args``'s namespace, or a command line.

    Returns:
        The child process's exit code.
    """
    if not isinstance(args, argparse.Namespace):
        from distributed_sync_bn import parse_args

        args = parse_args(args)
    here = Path(__file__).resolve()
    command = [
        sys.executable,
        str(here),
        f"--workers={args.workers}",
        f"--model={args.model}",
        f"--samples={args.samples}",
        f"--batch-size={args.batch_size}",
        f"--learning-rate={args.learning_rate!r}",
        f"--seed={args.seed}",
        f"--dtype={args.dtype}",
        *(["--synthetic"] if args.synthetic else []),
        "--jax-child",
    ]
    env = device_env(args.workers)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(here.parent), os.environ.get("PYTHONPATH")) if p
    )
    return subprocess.run(command, env=env, timeout=args.timeout).returncode


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if "--jax-child" in sys.argv:
        from distributed_sync_bn import parse_args

        sys.argv.remove("--jax-child")
        run_child(parse_args(sys.argv[1:]))
    else:
        sys.exit(main(sys.argv[1:]))
