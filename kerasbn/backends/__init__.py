"""Backend fast paths and distribution engines: one contract, one selector.

``kerasbn.backends.<keras.backend.backend()>``, where it exists, implements
:class:`Kernels`. This module, its only caller, asks it for a
:class:`~kerasbn.backends.plan.Plan` per call and hands the plan to its kernel,
else calls :mod:`kerasbn.formulas`. The layer reaches a backend only through it.
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
    "assign_where",
    "batch_normalize",
    "check_divisible",
    "current",
    "formulation",
    "gather_workers",
    "global_moments",
    "jit",
    "moving_average",
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
        """``(y, mean, variance)`` as :func:`kerasbn.formulas.batch_normalize`."""

    def normalize(self, x, plan: Plan, mean, variance, gamma, beta, epsilon: float):
        """Inference: ``y`` as :func:`kerasbn.formulas.normalize`, as ``plan``
        (made with ``training=False``) says."""

    def all_finite(self, first, *others):
        """A scalar boolean: :func:`kerasbn.formulas.all_finite`, computed fastest."""

    def moving_average(self, moving, value, momentum: float):
        """:func:`kerasbn.formulas.ema_update`, Keras's moving average, computed
        fastest (to the rounding of its two products)."""

    def assign_where(self, usable, updates) -> None:
        """For each ``(variable, current, value)`` of ``updates``,
        ``variable.assign(value)`` where the boolean ``usable`` (a scalar, or one
        per element) holds, else ``current`` (its value, read once by the caller);
        ``value`` cast to the variable's dtype."""

    # The distribution engine.
    def global_moments(self, local: Moments) -> Moments:
        """The global batch's moments by :func:`kerasbn.formulas.combine_moments` over
        the collectives, the same on every replica, gradients reaching each one's
        inputs; ``local`` where nothing is distributed."""

    def assert_divisible(self, x, group_size: int, message: str):
        """``x``, checked in the graph to have a batch size that ``group_size``
        divides, where the framework can check a dynamic size; else ``x``."""

    def gather_workers(self, array, variable=None):
        """Every worker's float64 NumPy ``array`` (same shape on each), stacked in
        rank order, bit for bit; ``array[None]`` where nothing is distributed.
        ``variable``: a model variable by which to find a strategy, or None."""

    def replicas_in_sync(self) -> int:
        """The replicas that Keras divides a loss by in the current scope."""

    def jit(self, function):
        """``function`` compiled where that serves the tools' passes, else itself."""


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
    """The backend's :meth:`Kernels.formulation` (``device`` by default its default
    device); None without a backend module.

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
    """Training BN: the backend's kernel where it has a plan, else
    :func:`kerasbn.formulas.batch_normalize`.

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
    """Inference BN over ``axes``: the backend's kernel where it has a plan, else
    :func:`kerasbn.formulas.normalize`.

    Example:
        >>> x, one = keras.ops.array([[0.0], [2.0]]), keras.ops.ones((1, 1))
        >>> keras.ops.convert_to_numpy(normalize(x, [0], one, one, None, None, 0.0)).tolist()
        [[-1.0], [1.0]]
    """
    chosen = plan(x, axes, epsilon=epsilon, training=False)
    if chosen is None:
        return formulas.normalize(x, mean, variance, gamma, beta, epsilon)
    return current().normalize(x, chosen, mean, variance, gamma, beta, epsilon)


def all_finite(first, *others):
    """A scalar boolean: every element of every tensor is finite."""
    module = current()
    if module is None:
        return formulas.all_finite(first, *others)
    return module.all_finite(first, *others)


def moving_average(moving, value, momentum: float):
    """The backend's :meth:`Kernels.moving_average`, else
    :func:`kerasbn.formulas.ema_update`."""
    module = current()
    if module is None:
        return formulas.ema_update(moving, value, momentum)
    return module.moving_average(moving, value, momentum)


def assign_where(usable, updates) -> None:
    """The backend's :meth:`Kernels.assign_where`, else by ``keras.ops.where``."""
    module = current()
    if module is not None:
        return module.assign_where(usable, updates)
    for variable, held, value in updates:
        value = keras.ops.cast(value, variable.dtype)
        variable.assign(keras.ops.where(usable, value, held))
    return None


def global_moments(local: Moments) -> Moments:
    """The backend's :meth:`Kernels.global_moments`; ``local`` without one."""
    module = current()
    return local if module is None else module.global_moments(local)


def gather_workers(array, variable=None):
    """The backend's :meth:`Kernels.gather_workers`; ``array[None]`` without one."""
    module = current()
    if module is None:
        return np.asarray(array, np.float64)[np.newaxis]
    return module.gather_workers(array, variable)


def jit(function):
    """The backend's :meth:`Kernels.jit`; ``function`` itself without one."""
    module = current()
    return function if module is None else module.jit(function)


def replicas_in_sync() -> int:
    """The backend's :meth:`Kernels.replicas_in_sync`; 1 without one."""
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
