"""Backend fast paths and distribution engines, chosen in one place.

Each backend module (``kerasbn.backends.tensorflow``, ``.jax``, ``.torch``)
exposes the same ``batch_normalize`` and ``normalize`` as :mod:`kerasbn.ops`
(which is the fallback everywhere), ``applies(x, axes, mask)``, which says
whether it computes that call exactly, and ``global_moments(local)``, which
merges the per-replica moments over that backend's distribution engine, and
``gather_workers(array, variable)``, which all-gathers a host-side float64
array over that engine's workers (processes) for the tools' statistics pass.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import keras
import numpy as np

from kerasbn import ops

_MODULES = ("tensorflow", "jax", "torch")
_LOADED: dict[str, ModuleType] = {}


def current() -> ModuleType | None:
    """The backend module of the active Keras backend, or None if it has none."""
    name = keras.backend.backend()
    if name not in _MODULES:
        return None
    module = _LOADED.get(name)
    if module is None:  # imported once: torch.compile breaks its graph at an import
        module = _LOADED[name] = importlib.import_module(f"kerasbn.backends.{name}")
    return module


def implementation(x, axes: Sequence[int], mask=None):
    """The module whose ``batch_normalize``/``normalize`` serve this call.

    Args:
        x: the layer's input.
        axes: the reduction axes.
        mask: the broadcastable mask, or None.

    Returns:
        The active backend's module when its ``applies`` accepts the call,
        else :mod:`kerasbn.ops`.
    """
    module = current()
    if module is not None and module.applies(x, axes, mask):
        return module
    return ops


def channels_of_reduction(rank: int, axes: Sequence[int]) -> list[int] | None:
    """The channel axes (those not reduced) of a rank-``rank`` input, sorted.

    None where nothing is reduced, which no fast path serves.

    Example:
        >>> channels_of_reduction(4, [0, -2, 1])
        [3]
    """
    if not axes:
        return None
    reduced = {a % rank for a in axes}
    return [a for a in range(rank) if a not in reduced]


def channels_of_statistic(shape: Sequence[int], rank: int) -> list[int] | None:
    """The axes of a rank-``rank`` input along which a statistic of ``shape`` varies.

    Shapes are aligned at the right, as broadcasting aligns them, so the layer's
    ``(C,)`` weights of a channels-last input give the last axis. A statistic
    with a single value gives the last axis too; one of higher rank, None.

    Example:
        >>> channels_of_statistic((1, 8, 1, 1), 4), channels_of_statistic((8,), 4)
        ([1], [3])
    """
    shape = tuple(shape)
    if len(shape) > rank:
        return None
    start = rank - len(shape)
    axes = [start + i for i, d in enumerate(shape) if d != 1]
    return axes or [rank - 1]


def all_finite(first, *others):
    """A scalar boolean: every element of every tensor is finite.

    The backend module's ``all_finite`` where it has one (fewer kernels for
    the same answer), else :func:`kerasbn.ops.all_finite`.
    """
    module = current()
    check = getattr(module, "all_finite", ops.all_finite)
    return check(first, *others)


def global_moments(local: ops.Moments) -> ops.Moments:
    """The moments of the global batch, merged over the backend's engine.

    Args:
        local: this replica's (or process's) :class:`kerasbn.ops.Moments`.

    Returns:
        The merged moments; the local ones where nothing is distributed.
    """
    module = current()
    return local if module is None else module.global_moments(local)


def gather_workers(array, variable=None):
    """Every worker's float64 NumPy ``array``, stacked in rank order, bit for bit.

    The workers are those of the backend's engine: the processes of a
    ``tf.distribute`` strategy (the one in scope, else the one holding
    ``variable``), of ``jax.distributed``, or of a ``torch.distributed``
    process group. Every worker must call it with an array of the same shape.

    Args:
        array: this worker's array.
        variable: a Keras variable of the model (TensorFlow finds the
            strategy that holds it), or None.

    Returns:
        ``(workers, *array.shape)`` float64; ``array[None]`` where nothing is
        distributed.

    Example:
        >>> gather_workers(np.ones(2)).tolist()  # one process
        [[1.0, 1.0]]
    """
    module = current()
    if module is None:
        return np.asarray(array, np.float64)[np.newaxis]
    return module.gather_workers(array, variable)


def jit(function):
    """``function`` compiled by the backend, where that serves the tools' passes.

    JAX: ``jax.jit`` in one process (op-by-op JAX compiles every op of a
    model at its first call, many times slower than compiling the model
    once); with several ``jax.distributed`` processes, each running on its
    own data, ``function`` itself. TensorFlow and PyTorch: ``function``
    itself, run eagerly (their eager ops need no compiling).

    Example:
        >>> int(jit(abs)(-2))
        2
    """
    module = current()
    compile_function = getattr(module, "jit", None)
    return function if compile_function is None else compile_function(function)


def replicas_in_sync() -> int:
    """The replicas that Keras divides a loss by in the current scope.

    The ``tf.distribute`` strategy's ``num_replicas_in_sync`` in its scope on
    TensorFlow; 1 elsewhere (JAX and PyTorch do not scale losses).

    Example:
        >>> replicas_in_sync()
        1
    """
    module = current()
    replicas = getattr(module, "replicas_in_sync", None)
    return 1 if replicas is None else replicas()


def check_divisible(x, group_size: int):
    """Returns ``x`` once its batch size is known to be a multiple of ``group_size``.

    A static batch size is checked at once (ValueError); a dynamic one on the
    TensorFlow backend by an in-graph assertion that ``x`` depends on
    (InvalidArgumentError).
    """
    message = (
        f"`virtual_batch_size`={group_size} must divide the batch size in training"
    )
    batch = x.shape[0]
    if batch is not None:
        if batch % group_size:
            raise ValueError(
                f"{message}; got a batch of {batch} (shape {tuple(x.shape)})."
            )
        return x
    if keras.backend.backend() != "tensorflow":
        return x
    from kerasbn.backends import tensorflow as tf_backend

    return tf_backend.assert_divisible(x, group_size, message)
