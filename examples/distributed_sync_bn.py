"""Synchronized BN across worker processes: every worker sees the global batch.

``--workers N`` launches N local worker processes, each one replica of
``tf.distribute.MultiWorkerMirroredStrategy`` (``TF_CONFIG`` on 127.0.0.1
ports only). They train the lecture's CNN, with ``synchronized=True`` BN, on
the same global batches: each worker gets its share of every batch (a last
partial batch splits unevenly), the BN statistics are those of the global
batch, and the loss is the global batch's mean. Then one process trains the
same model, with plain BN, on the same global batches.

At the end it prints each worker's moving statistics of the first BN layer,
the largest difference between the workers and the largest difference from
the single process (over the moving statistics and all weights). For scale,
it also prints how far the single process lands from itself when each batch's
samples are merely reversed: float32 rounding, amplified by training, sets
that floor (``--dtype float64`` lowers it to about 1e-14).

The training loop is a custom one (``strategy.run``): Keras 3.15's
``Model.fit`` fails under ``MultiWorkerMirroredStrategy`` before the first
step (``_maybe_symbolic_build`` reduces the ``(x, y)`` batch as one tensor).

``--backend torch`` runs the same comparison over ``torch.distributed``
instead (gloo on 127.0.0.1; see ``distributed_torch.py``), and ``--backend
jax`` over ``--workers`` CPU devices under ``keras.distribution.DataParallel``
(see ``distributed_jax.py``).

Run:
    python examples/distributed_sync_bn.py --workers 2
    python examples/distributed_sync_bn.py --backend jax --workers 2
    python examples/distributed_sync_bn.py --workers 2 --synthetic --samples 640
    python examples/distributed_sync_bn.py --backend torch --workers 2

Example:
    >>> from distributed_sync_bn import Config, train  # doctest: +SKIP
    >>> arrays = train(Config(model="tiny", synthetic=True, samples=32))  # doctest: +SKIP
    >>> arrays["first_bn_moving_mean"].shape  # doctest: +SKIP
    (4,)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from lecture_cnn import build_lecture_cnn

import kerasbn

MODELS = ("lecture", "tiny")
BACKENDS = ("tensorflow", "jax", "torch")
LOCAL_SAMPLES = "local_samples"
BN_TYPES = (kerasbn.BatchNorm,)


@dataclasses.dataclass(frozen=True)
class Config:
    """What every process trains; the same on all of them.

    Attributes:
        model: ``"lecture"`` (the lecture's CNN) or ``"tiny"`` (one conv + BN).
        samples: the number of training samples; one pass over them.
        batch_size: the global batch size (split among the workers).
        learning_rate: of plain SGD.
        synthetic: random images instead of MNIST (the tiny model always is).
        seed: seeds the initial weights and the synthetic data.
        dtype: the model's and the data's float type, ``"float32"`` or
            ``"float64"``.
    """

    model: str = "lecture"
    samples: int = 3200
    batch_size: int = 64
    learning_rate: float = 0.05
    synthetic: bool = False
    seed: int = 0
    dtype: str = "float32"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        """The configuration that the command-line flags ``args`` give."""
        return cls(*(getattr(args, f.name) for f in dataclasses.fields(cls)))


def build_model(name: str) -> keras.Sequential:
    """The lecture's CNN, or a tiny conv net with one BN for quick checks."""
    if name == "lecture":
        return build_lecture_cnn()
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3),
            kerasbn.BatchNorm(momentum=0.5),
            keras.layers.Activation("relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="tiny",
    )


def synchronized_copy(model: keras.Model) -> keras.Model:
    """A copy of ``model`` whose BN layers have ``synchronized=True``, same weights."""

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if isinstance(layer, BN_TYPES):
            config["synchronized"] = True
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


@contextlib.contextmanager
def default_float(dtype: str):
    """Layers built inside use ``dtype`` (``keras.config.floatx``)."""
    previous = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(previous)


def load_data(config: Config, input_shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """``config.samples`` images of ``input_shape`` and their int labels."""
    if config.synthetic or config.model == "tiny":
        rng = np.random.default_rng(config.seed)
        x = rng.normal(0.5, 0.3, (config.samples, *input_shape))
        y = rng.integers(0, 10, config.samples)
    else:
        from mnist_data import load_mnist

        mnist = load_mnist(limit=config.samples)
        x, y = mnist.x_train[..., np.newaxis], mnist.y_train
    return x.astype(config.dtype), y.astype("int32")


def reverse_within_batches(x: np.ndarray, batch_size: int) -> np.ndarray:
    """``x`` with the samples of each batch in reverse order (same batches)."""
    starts = range(0, len(x), batch_size)
    order = [np.arange(i, min(i + batch_size, len(x)))[::-1] for i in starts]
    return x[np.concatenate(order)]


def first_bn(model: keras.Model) -> keras.layers.Layer:
    """The model's first BN layer."""
    return next(layer for layer in model.layers if isinstance(layer, BN_TYPES))


def train(
    config: Config,
    strategy: tf.distribute.Strategy | None = None,
    reverse_batches: bool = False,
) -> dict:
    """One pass of SGD over the data, under ``strategy`` (default: one process).

    With a strategy of more than one replica, the model's BN layers are
    synchronized. The loss of each step is the mean over the global batch,
    whatever the split among replicas.

    Args:
        config: what to train.
        strategy: a ``tf.distribute`` strategy, or None for this process alone.
        reverse_batches: reverse the order of the samples inside each batch:
            the same batches, so the same training up to rounding.

    Returns:
        ``first_bn_moving_mean``, ``first_bn_moving_variance`` and
        ``weight_<i>`` for every weight of the model, as NumPy arrays, and
        ``local_samples``: how many samples this process's replicas saw.
    """
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(config.seed)
    with default_float(config.dtype):
        base = build_model(config.model)
    with strategy.scope(), default_float(config.dtype):
        model = synchronized_copy(base) if strategy.num_replicas_in_sync > 1 else base
        optimizer = keras.optimizers.SGD(config.learning_rate)
        optimizer.build(model.trainable_variables)

    def replica_step(x, y):
        context = tf.distribute.get_replica_context()
        global_count = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.shape(x)[0])
        with tf.GradientTape() as tape:
            losses = keras.losses.sparse_categorical_crossentropy(
                y, model(x, training=True)
            )
            loss = tf.reduce_sum(losses) / tf.cast(global_count, losses.dtype)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def step(batch):
        strategy.run(replica_step, args=batch)

    x, y = load_data(config, model.input_shape[1:])
    if reverse_batches:
        x, y = (reverse_within_batches(a, config.batch_size) for a in (x, y))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(config.batch_size)
        .with_options(options)
    )
    local_samples = 0
    for batch in strategy.experimental_distribute_dataset(dataset):
        step(batch)
        local_samples += sum(
            int(x.shape[0]) for x in strategy.experimental_local_results(batch[0])
        )
    bn = first_bn(model)
    arrays = {
        LOCAL_SAMPLES: np.asarray(local_samples),
        "first_bn_moving_mean": np.asarray(bn.moving_mean),
        "first_bn_moving_variance": np.asarray(bn.moving_variance),
    }
    arrays.update({f"weight_{i}": w for i, w in enumerate(model.get_weights())})
    return arrays


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: list[int], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` in a cluster on ``ports``."""
    workers = [f"127.0.0.1:{port}" for port in ports]
    return json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    )


def _worker_command(config: Config, index: int, out_dir: Path) -> list[str]:
    """The command line that runs worker ``index`` of this script."""
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--model={config.model}",
        f"--samples={config.samples}",
        f"--batch-size={config.batch_size}",
        f"--learning-rate={config.learning_rate!r}",
        f"--seed={config.seed}",
        f"--dtype={config.dtype}",
        *(["--synthetic"] if config.synthetic else []),
        f"--worker-index={index}",
        f"--out={out_dir}",
    ]


def launch_workers(
    config: Config, workers: int, out_dir: Path, timeout: float = 300.0
) -> list[dict]:
    """Runs ``workers`` worker processes of this script and collects their arrays.

    The workers join one ``MultiWorkerMirroredStrategy`` cluster (``TF_CONFIG``
    on 127.0.0.1); see :func:`run_processes`.

    Args:
        config: what every worker trains.
        workers: the number of worker processes.
        out_dir: where the workers write ``worker_<i>.npz`` and ``worker_<i>.log``.
        timeout: seconds for the whole cluster.

    Returns:
        Each worker's arrays, as :func:`train` returns them.

    Raises:
        RuntimeError: a worker failed (the message holds its log's tail).
        TimeoutError: the workers did not finish within ``timeout`` seconds.
    """
    ports = free_ports(workers)
    return run_processes(
        workers,
        lambda index: (
            _worker_command(config, index, out_dir),
            {"TF_CONFIG": tf_config(ports, index)},
        ),
        out_dir,
        timeout,
    )


def run_processes(workers: int, spec, out_dir: Path, timeout: float) -> list[dict]:
    """Starts ``workers`` processes, waits for all, and loads their arrays.

    Every process is killed when one fails, at the deadline, or on any error
    here (in a ``finally``).

    Args:
        workers: the number of processes.
        spec: ``spec(index) -> (command, environment variables)`` of process
            ``index``; the variables are added to this process's environment.
        out_dir: where process ``i`` writes ``worker_<i>.npz``; its output goes
            to ``worker_<i>.log`` there.
        timeout: seconds for all of them.

    Returns:
        Each process's arrays.

    Raises:
        RuntimeError: a process failed (the message holds its log's tail).
        TimeoutError: the processes did not finish within ``timeout`` seconds.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    try:
        for index in range(workers):
            command, env = spec(index)
            with open(out_dir / f"worker_{index}.log", "wb") as log:
                processes.append(
                    subprocess.Popen(
                        command,
                        env={**os.environ, **env},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        _wait(processes, out_dir, time.monotonic() + timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    return [dict(np.load(out_dir / f"worker_{i}.npz")) for i in range(workers)]


def _wait(processes: list, out_dir: Path, deadline: float) -> None:
    """Waits for every process to succeed; raises as soon as one fails."""
    while True:
        codes = [p.poll() for p in processes]
        failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            log = (out_dir / f"worker_{failed[0]}.log").read_text(errors="replace")
            raise RuntimeError(f"worker {failed[0]} failed:\n{log[-3000:]}")
        if all(code == 0 for code in codes):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the workers did not finish in time; logs in {out_dir}")
        time.sleep(0.2)


def run_worker(config: Config, index: int, out_dir: Path) -> None:
    """The worker process: trains under MultiWorkerMirroredStrategy, saves arrays."""
    tf.config.threading.set_intra_op_parallelism_threads(1)  # workers share cores
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    arrays = train(config, strategy)
    np.savez(Path(out_dir) / f"worker_{index}.npz", **arrays)


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference of the moving statistics and weights."""
    keys = [k for k in a if k != LOCAL_SAMPLES]
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in keys)


def report(results: list[dict], single: dict, single_reversed: dict) -> None:
    """Prints the workers' first-BN moving statistics and the differences.

    Args:
        results: each worker's arrays.
        single: one process trained on the same global batches.
        single_reversed: the same, with each batch's samples in reverse order:
            its difference from ``single`` is the rounding floor of training.
    """
    np.set_printoptions(precision=6, suppress=True, linewidth=100)
    for index, arrays in enumerate(results):
        for name in ("moving_mean", "moving_variance"):
            print(f"worker {index} first BN {name:15s} {arrays['first_bn_' + name]}")
    between = max(max_difference(results[0], r) for r in results)
    from_single = max(max_difference(r, single) for r in results)
    floor = max_difference(single_reversed, single)
    print(f"largest difference between workers: {between:.3g}")
    print(f"largest difference from one process on the same batches: {from_single:.3g}")
    print(
        "  for scale, one process against itself with each batch's samples "
        f"reversed: {floor:.3g}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=keras.backend.backend(),
        help="the Keras backend and its engine (default: the current backend)",
    )
    parser.add_argument("--model", choices=MODELS, default=Config.model)
    parser.add_argument("--samples", type=int, default=Config.samples)
    parser.add_argument("--batch-size", type=int, default=Config.batch_size)
    parser.add_argument("--learning-rate", type=float, default=Config.learning_rate)
    parser.add_argument("--synthetic", action="store_true", help="no MNIST")
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--out", type=Path, default=None, help="worker files")
    parser.add_argument(
        "--worker-index", type=int, default=None, help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def engine(backend: str):
    """The module that trains on ``backend``'s distribution engine."""
    if backend == "torch":
        import distributed_torch

        return distributed_torch
    return sys.modules[__name__]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.backend == "jax":
        import distributed_jax

        sys.exit(distributed_jax.main(args))
    if args.backend != keras.backend.backend():
        if argv is not None:
            raise ValueError(
                f"--backend {args.backend} needs KERAS_BACKEND={args.backend} "
                f"before Keras is imported; Keras runs on {keras.backend.backend()!r}."
            )
        # Keras picks its backend when imported: start again on the right one.
        env = {**os.environ, "KERAS_BACKEND": args.backend}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    config = Config.from_args(args)
    trainer = engine(args.backend)
    if args.worker_index is not None:
        trainer.run_worker(config, args.worker_index, args.out)
        return
    steps = math.ceil(config.samples / config.batch_size)
    print(f"{args.workers} workers, {steps} steps of global batch {config.batch_size}")
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="distributed_sync_bn_"))
    results = trainer.launch_workers(config, args.workers, out_dir, args.timeout)
    single = trainer.train(config)
    report(results, single, trainer.train(config, reverse_batches=True))


if __name__ == "__main__":
    main()
