"""The torch.distributed half of ``distributed_sync_bn.py --backend torch``.

``--workers N`` launches N local worker processes that join one
``torch.distributed`` process group (gloo, on 127.0.0.1). They train the
lecture's CNN, with ``synchronized=True`` BN, on the same global batches:
each process gets its share of every batch (a last partial batch splits
unevenly), the BN statistics are those of the global batch, and the loss is
the global batch's mean. Then one process trains the same model, with plain
BN, on the same global batches, and :func:`distributed_sync_bn.report`
prints the differences.

The training loop is a custom one, as in the Keras guide to multi-GPU
training with PyTorch, but without DDP: each process computes the gradients
of its share of the global loss with ``torch.autograd.grad``, sums them over
the processes with one ``all_reduce`` per weight, and applies them with the
Keras optimizer. Synchronized BN's own gather is differentiable, so each
process's gradients include what the other processes' losses owe to its
inputs, as with ``torch.nn.SyncBatchNorm``.

Example:
    >>> from distributed_sync_bn import Config  # doctest: +SKIP
    >>> arrays = train(Config(model="tiny", synthetic=True, samples=32))  # doctest: +SKIP
    >>> arrays["first_bn_moving_mean"].shape  # doctest: +SKIP
    (4,)
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import torch
import torch.distributed as dist
from distributed_sync_bn import (
    LOCAL_SAMPLES,
    Config,
    _worker_command,
    build_model,
    default_float,
    first_bn,
    free_ports,
    load_data,
    reverse_within_batches,
    run_processes,
    synchronized_copy,
)


def train(config: Config, reverse_batches: bool = False) -> dict:
    """One pass of SGD over the data in this process's process group, if any.

    With a process group of more than one process, the model's BN layers are
    synchronized and this process trains on its share of every global batch.
    The loss of each step is the mean over the global batch, whatever the
    split among processes.

    Args:
        config: what to train.
        reverse_batches: reverse the order of the samples inside each batch:
            the same batches, so the same training up to rounding.

    Returns:
        ``first_bn_moving_mean``, ``first_bn_moving_variance`` and
        ``weight_<i>`` for every weight of the model, as NumPy arrays, and
        ``local_samples``: how many samples this process saw.
    """
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    keras.utils.set_random_seed(config.seed)
    with default_float(config.dtype):
        base = build_model(config.model)
        model = synchronized_copy(base) if world > 1 else base
    optimizer = keras.optimizers.SGD(config.learning_rate)
    optimizer.build(model.trainable_variables)
    x, y = load_data(config, model.input_shape[1:])
    if reverse_batches:
        x, y = (reverse_within_batches(a, config.batch_size) for a in (x, y))
    local_samples = 0
    for start in range(0, len(x), config.batch_size):
        stop = min(start + config.batch_size, len(x))
        share = np.array_split(np.arange(start, stop), world)[rank]
        _step(model, optimizer, x[share], y[share], stop - start, world)
        local_samples += len(share)
    bn = first_bn(model)
    arrays = {
        LOCAL_SAMPLES: np.asarray(local_samples),
        "first_bn_moving_mean": np.asarray(bn.moving_mean),
        "first_bn_moving_variance": np.asarray(bn.moving_variance),
    }
    arrays.update({f"weight_{i}": w for i, w in enumerate(model.get_weights())})
    return arrays


def _step(model, optimizer, x, y, global_count: int, world: int) -> None:
    """One SGD step on the global batch whose share here is ``(x, y)``."""
    variables = model.trainable_variables
    losses = keras.losses.sparse_categorical_crossentropy(
        torch.as_tensor(y), model(torch.as_tensor(x), training=True)
    )
    loss = losses.sum() / global_count
    grads = torch.autograd.grad(loss, [v.value for v in variables])
    if world > 1:
        for g in grads:
            dist.all_reduce(g)  # the sum over processes: the global batch's
    optimizer.apply_gradients(zip(grads, variables))


def launch_workers(
    config: Config, workers: int, out_dir: Path, timeout: float = 300.0
) -> list[dict]:
    """Runs ``workers`` processes of one gloo process group; collects their arrays.

    Every worker is killed when one fails, at the deadline, or on any error
    here (in a ``finally``).

    Args:
        config: what every worker trains.
        workers: the number of worker processes.
        out_dir: where the workers write ``worker_<i>.npz`` and ``worker_<i>.log``.
        timeout: seconds for the whole group.

    Returns:
        Each worker's arrays, as :func:`train` returns them.

    Raises:
        RuntimeError: a worker failed (the message holds its log's tail).
        TimeoutError: the workers did not finish within ``timeout`` seconds.
    """
    (port,) = free_ports(1)
    return run_processes(
        workers,
        lambda rank: (
            [*_worker_command(config, rank, out_dir), "--backend=torch"],
            {
                "KERAS_BACKEND": "torch",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(workers),
            },
        ),
        out_dir,
        timeout,
    )


def run_worker(config: Config, index: int, out_dir: Path) -> None:
    """The worker process: joins the gloo process group, trains, saves arrays."""
    torch.set_num_threads(1)  # the workers share the cores
    dist.init_process_group("gloo")  # MASTER_ADDR/PORT, RANK, WORLD_SIZE
    try:
        arrays = train(config)
    finally:
        dist.destroy_process_group()
    np.savez(Path(out_dir) / f"worker_{index}.npz", **arrays)
