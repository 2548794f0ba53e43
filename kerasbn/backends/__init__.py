"""Backend fast paths and distribution engines: one contract, one selector.

The backend module ``kerasbn.backends.<keras.backend.backend()>``, where one
exists, implements all of :class:`Kernels`; this module, its only caller,
imports it once, asks it for one :class:`~kerasbn.backends.plan.Plan` per call
and hands the plan to its kernel, or calls :mod:`kerasbn.formulas` where there
is no plan. The layer calls the functions below and nothing else of a backend.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import keras
import numpy as np

from kerasbn import formulas
from kerasbn.backends.plan import CPU, Plan
from kerasbn.formulas import Moments

__all__ = [
    "Kernels",
    "Plan",
    "all_finite",
    "batch_normalize",
    "check_divisible",
    "current",
    "formulation",
    "gather_workers",
    "global_moments",
    "jit",
    "normalize",
    "plan",
    "replicas_in_sync",
]


@runtime_checkable
class Kernels(Protocol):
    """The contract of a backend module: its kernels and its distribution engine.

    A kernel computes what :mod:`kerasbn.formulas` computes (outputs,
    gradients, biased batch statistics, to the statistics dtype's rounding),
    returns outputs in the statistics dtype and statistics without gradient,
    decides only from its plan and reads no tensor value on the host.
    """

    def device(self, x) -> str | None:
        """The device type ``x``'s ops run on (:data:`~kerasbn.backends.plan.CPU`,
        ``"gpu"``...), or None where ``x`` is not this framework's tensor."""

    def default_device(self) -> str:
        """The device type that a new tensor of this framework lives on."""

    def formulation(
        self,
        shape: Sequence,
        axes: Sequence[int],
        *,
        dtype: str = "float32",
        epsilon: float = 1e-3,
        training: bool = True,
        device: str = CPU,
    ) -> Plan | None:
        """How a call with an input of ``shape`` is computed, or None where the
        fast path declines it: the one place that says when it applies. A rule
        measured on one device applies on that device only."""

    def batch_normalize(self, x, plan: Plan, gamma, beta, epsilon: float):
        """Training: ``(y, mean, variance)`` as
        :func:`kerasbn.formulas.batch_normalize`, as ``plan`` says."""

    def normalize(self, x, plan: Plan, mean, variance, gamma, beta, epsilon: float):
        """Inference: ``y`` as :func:`kerasbn.formulas.normalize`, as ``plan``
        (made with ``training=False``) says."""

    def all_finite(self, first, *others):
        """A scalar boolean tensor: :func:`kerasbn.formulas.all_finite`,
        reduced as this framework's compiler does best."""

    # The distribution engine.
    def global_moments(self, local: Moments) -> Moments:
        """The moments of the global batch, merged with
        :func:`kerasbn.formulas.combine_moments` over the framework's
        collectives; ``local`` where nothing is distributed."""

    def assert_divisible(self, x, group_size: int, message: str):
        """``x``, checked in the graph to have a batch size that ``group_size``
        divides, where the framework can check a dynamic size; else ``x``."""

    def gather_workers(self, array, variable=None):
        """Every worker's float64 NumPy ``array``, stacked in rank order, bit for
        bit, over the engine's workers (processes); ``array[None]`` where
        nothing is distributed. ``variable`` is a model variable by which an
        engine may find its strategy, or None."""

    def replicas_in_sync(self) -> int:
        """The replicas that Keras divides a loss by in the current scope."""

    # The tools' passes.
    def jit(self, function):
        """``function`` compiled where that serves a pass of the tools over
        many batches, else ``function`` itself."""


_LOADED: dict[str, Kernels | None] = {}


def current() -> Kernels | None:
    """The active Keras backend's module, or None where it has none; imported
    once (``torch.compile`` breaks its graph at an import)."""
    name = keras.backend.backend()
    if name not in _LOADED:
        module_name = f"{__name__}.{name}"
        found = importlib.util.find_spec(module_name) is not None
        _LOADED[name] = importlib.import_module(module_name) if found else None
    return _LOADED[name]


def formulation(
    shape: Sequence,
    axes: Sequence[int],
    *,
    dtype: str = "float32",
    epsilon: float = 1e-3,
    training: bool = True,
    device: str | None = None,
) -> Plan | None:
    """The active backend's :meth:`Kernels.formulation` (``device`` by default
    the backend's default device); None without a backend module.

    Example:
        >>> p = formulation((32, 100), [0])
        >>> p is None or p.channels == 100
        True
    """
    module = current()
    if module is None:
        return None
    device = module.default_device() if device is None else device
    return module.formulation(
        tuple(shape),
        axes,
        dtype=dtype,
        epsilon=epsilon,
        training=training,
        device=device,
    )


def plan(x, axes: Sequence[int], mask=None, *, epsilon: float, training: bool):
    """The plan of a call with input ``x``, or None for :mod:`kerasbn.formulas`
    (a mask, an unknown rank, or not the backend's tensor).

    Example:
        >>> p = plan(keras.ops.ones((4, 3)), [0], epsilon=1e-3, training=True)
        >>> p is None or (p.start, p.stop)
        (1, 2)
    """
    module = current()
    device = None if module is None or mask is not None else module.device(x)
    if device is None:
        return None
    try:
        shape = tuple(x.shape)
    except (TypeError, ValueError):  # an unknown rank
        return None
    dtype = keras.backend.standardize_dtype(x.dtype)
    return formulation(
        shape, axes, dtype=dtype, epsilon=epsilon, training=training, device=device
    )


def batch_normalize(x, axes: Sequence[int], gamma, beta, epsilon: float, mask=None):
    """Training-mode BN: the backend's kernel where it has a plan, else
    :func:`kerasbn.formulas.batch_normalize` (same arguments and results).

    Example:
        >>> x = keras.ops.array([[0.0], [2.0]])
        >>> y, mean, var = batch_normalize(x, [0], None, None, 0.0)
        >>> round(float(mean[0, 0]), 6), round(float(var[0, 0]), 6)
        (1.0, 1.0)
    """
    chosen = plan(x, axes, mask, epsilon=epsilon, training=True)
    if chosen is None:
        return formulas.batch_normalize(x, axes, gamma, beta, epsilon, mask)
    return current().batch_normalize(x, chosen, gamma, beta, epsilon)


def normalize(x, axes: Sequence[int], mean, variance, gamma, beta, epsilon: float):
    """Inference-mode BN over ``axes``: the backend's kernel where it has a
    plan, else :func:`kerasbn.formulas.normalize` (same arguments).

    Example:
        >>> x, one = keras.ops.array([[0.0], [2.0]]), keras.ops.ones((1, 1))
        >>> keras.ops.convert_to_numpy(normalize(x, [0], one, one, None, None, 0.0))
        array([[-1.],
               [ 1.]], dtype=float32)
    """
    chosen = plan(x, axes, epsilon=epsilon, training=False)
    if chosen is None:
        return formulas.normalize(x, mean, variance, gamma, beta, epsilon)
    return current().normalize(x, chosen, mean, variance, gamma, beta, epsilon)


def all_finite(first, *others):
    """A scalar boolean: every element of every tensor is finite.

    Example:
        >>> bool(all_finite(keras.ops.ones(2), keras.ops.array([1.0, float("nan")])))
        False
    """
    module = current()
    if module is None:
        return formulas.all_finite(first, *others)
    return module.all_finite(first, *others)


def global_moments(local: Moments) -> Moments:
    """The moments of the global batch, merged from this replica's ``local``
    ones over the backend's engine; ``local`` where nothing is distributed.

    Example:
        >>> m = formulas.sufficient_moments(keras.ops.ones((2, 3)), [0])
        >>> tuple(global_moments(m).count.shape)  # nothing distributed: local
        (1, 3)
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
    return function if module is None else module.jit(function)


def replicas_in_sync() -> int:
    """The replicas that Keras divides a loss by in the current scope.

    The ``tf.distribute`` strategy's ``num_replicas_in_sync`` in its scope on
    TensorFlow; 1 elsewhere (JAX and PyTorch do not scale losses).

    Example:
        >>> replicas_in_sync()
        1
    """
    module = current()
    return 1 if module is None else module.replicas_in_sync()


def check_divisible(x, group_size: int):
    """``x``, once its batch size is known to be a multiple of ``group_size``:
    a static size at once, a dynamic one by :meth:`Kernels.assert_divisible`.

    Raises:
        ValueError: the static batch size is not a multiple of ``group_size``.

    Example:
        >>> check_divisible(keras.ops.ones((4, 2)), 3)
        Traceback (most recent call last):
        ...
        ValueError: `virtual_batch_size`=3 must divide the batch size in training; got a batch of 4 (shape (4, 2)).
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
    module = current()
    return x if module is None else module.assert_divisible(x, group_size, message)
