"""The JAX kernels: one ``jax.custom_vjp`` per training call, and SPMD statistics.

A training call views the input, at no cost, as ``(outer, C, inner)`` and
computes what :mod:`kerasbn.formulas` computes in the fewest passes over
memory: forward, the sums of ``d = x - shift`` and ``d * d``, then ``y = d *
scale + bias``; backward, the sums of ``dy`` and ``dy * d``, then ``dx``
(:func:`~kerasbn.formulas.backward_coefficients`). All of it is plain HLO in
the train step's program, which XLA fuses with the layer's neighbours.

The statistics are (:func:`formulation`) ``"shifted"``: the shift is the
first sample, and XLA's CPU reductions, which do not fuse a broadcast
subtraction, materialize ``d``; or ``"rough"`` (large static inputs on the
CPU, where the saving was measured): the shift is 0, and a ``lax.cond``
switches to the shifted statistics, and the backward pass with them, where
some channel's mean lies more than ``ROUGH_MAX_MEAN_SPREADS`` standard
deviations from zero (:func:`~kerasbn.formulas.far_from_zero`). On small
inputs the ``lax.cond`` costs more than it saves, hence ``ROUGH_MIN_ELEMENTS``.

Outputs are float32 (float64 for float64 inputs); ``dx`` has ``x``'s dtype.
Inference is :func:`kerasbn.formulas.normalize`: one fused multiply-add.
Declined: a mask, non-floating inputs, channel axes that are not adjacent,
an unknown dimension, no reduction axis, an empty batch.

**Synchronized statistics.** Under ``keras.distribution`` (also across
``jax.distributed`` processes) Keras's JAX trainer compiles one SPMD program
for the device mesh, in which a reduction over the sharded batch is one over
the global batch: the moments are global already (:func:`global_moments`),
whatever ``synchronized`` says. Not covered: a layer called by hand inside
``jax.pmap`` or ``shard_map`` (the axis name to merge over is not known).

Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.zeros((8, 4, 4, 3)) + 1.0
    >>> plan = formulation(x.shape, [0, 1, 2])
    >>> y, mean, var = batch_normalize(x, plan, None, None, 1e-3)
    >>> plan.formulation, y.shape, mean.shape, float(mean[0, 0, 0, 0])
    ('shifted', (8, 4, 4, 3), (1, 1, 1, 3), 1.0)
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kerasbn import _isa as isa
from kerasbn import formulas
from kerasbn.backends.plan import CPU, KERNEL_FUNCTIONS, Plan, channel_vector

__all__ = [
    *KERNEL_FUNCTIONS,
    "CPU_DEVICE",
    "DTYPES",
    "GUARD_LANES",
    "ROUGH_MAX_MEAN_SPREADS",
    "ROUGH_MIN_ELEMENTS",
    "xla_cpu_max_isa",
]

DTYPES = ("float16", "bfloat16", "float32", "float64")
ROUGH_MIN_ELEMENTS = {isa.AVX512: 1 << 20, isa.AVX2: 1 << 20}
"""Per instruction set it was measured on, the size from which the rough
statistics serve; below it, and on other CPUs, the shifted ones."""
ROUGH_MAX_MEAN_SPREADS = 3.0
"""Unshifted sums keep float32 precision (a relative error of the variance of
about ``(1 + 3**2) * eps``) while every mean lies within 3 spreads of zero."""
GUARD_LANES = 32  # XLA's CPU runtime splits a longer reduction in two kernels

_XP = formulas.Namespace(jnp, rsqrt=jax.lax.rsqrt)


def device(x) -> str | None:
    """JAX's default platform, where Keras computes; None without a shape."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        return None
    return default_device()


def default_device() -> str:
    """``jax.default_backend()`` (``"gpu"``, ``"tpu"``...), a CPU as
    :data:`CPU_DEVICE`."""
    platform = jax.default_backend()
    return CPU_DEVICE if platform == CPU else platform


def xla_cpu_max_isa() -> str | None:
    """The cap of ``--xla_cpu_max_isa`` in ``XLA_FLAGS``, or None."""
    found = re.findall(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
    return found[-1] if found else None


CPU_DEVICE = isa.cpu_device(isa.instruction_set(xla_cpu_max_isa()))
"""This process's CPU: the instruction set XLA compiles for (the CPU's,
capped by ``--xla_cpu_max_isa``)."""


def formulation(
    shape: Sequence,
    axes: Sequence[int],
    *,
    dtype: str = "float32",
    epsilon: float = 1e-3,
    training: bool = True,
    device: str = CPU,
) -> Plan | None:
    """The plan of a call (see :class:`kerasbn.backends.Kernels`):
    ``"shifted"`` or ``"rough"`` in training, ``"affine"`` in inference.

    Example:
        >>> formulation((32, 56, 56, 64), [0, 1, 2]).formulation
        'rough'
        >>> formulation((32, 56, 56, 64), [0, 1, 2], device="gpu").formulation
        'shifted'
        >>> formulation((4, 5, 6), [1]) is None  # channel axes 0 and 2
        True
    """
    del epsilon
    device = isa.resolve(device, CPU_DEVICE)
    plan = Plan.of(shape, axes, device=device, training=training)
    if plan is None or dtype not in DTYPES or None in plan.shape or plan.empty:
        return None
    if not training:
        return plan.using("affine")
    threshold = ROUGH_MIN_ELEMENTS.get(isa.device_isa(device))
    rough = threshold is not None and plan.static and plan.nominal_size >= threshold
    return plan.using("rough" if rough else "shifted")


# ------------------------------------------------------------------- the view
def _view(plan: Plan) -> tuple[tuple, tuple[int, ...], tuple]:
    """``(shape, reduction axes, vector shape)`` of the view ``(outer, C,
    inner)`` without size-1 ends: reductions over contiguous axes."""
    if plan.inner == 1:
        shape, axes = (plan.outer, plan.channels), (0,)
    elif plan.outer == 1:
        shape, axes = (plan.channels, plan.inner), (1,)
    else:
        shape, axes = (plan.outer, plan.channels, plan.inner), (0, 2)
    return shape, axes, tuple(1 if a in axes else d for a, d in enumerate(shape))


def _sum(t, plan: Plan):
    return jnp.sum(t, _view(plan)[1], keepdims=True)


# ------------------------------------------------------------------- training
def _statistics(x, plan: Plan):
    """``(shift, offset, variance, far)`` of the view ``x``."""
    n = plan.count

    def shifted():
        shift = jax.lax.stop_gradient(x[formulas.shift_index(x.ndim, _view(plan)[1])])
        d = x - shift
        offset, variance = formulas.shifted_statistics(
            _sum(d, plan), _sum(d * d, plan), n, _XP
        )
        return shift, offset, variance

    if plan.formulation != "rough":
        return (*shifted(), jnp.asarray(True))
    mean, variance = formulas.shifted_statistics(
        _sum(x, plan), _sum(x * x, plan), n, _XP
    )
    far = jnp.any(formulas.far_from_zero(mean, variance, ROUGH_MAX_MEAN_SPREADS))
    shift, offset, variance = jax.lax.cond(
        far, shifted, lambda: (jnp.zeros_like(mean), mean, variance)
    )
    return shift, offset, variance, far


def _forward(x, gamma, beta, epsilon: float, plan: Plan):
    """Returns ``((y, mean, variance), residuals)`` on the view ``x``."""
    xs = x.astype(formulas.statistics_dtype(x.dtype))
    shift, offset, variance, far = _statistics(xs, plan)
    inv = formulas.inverse_std(variance, epsilon, _XP)
    scale, bias = formulas.affine(inv, offset, gamma, beta)
    y = formulas.normalized(xs - shift, scale, bias, _XP)
    return (y, shift + offset, variance), (x, shift, offset, inv, scale, far)


def _backward(epsilon: float, plan: Plan, residuals, cotangents):
    """The gradients w.r.t. ``x``, gamma and beta of ``sum(y * dy)``."""
    del epsilon
    x, shift, offset, inv, scale, far = residuals
    dy = cotangents[0].astype(shift.dtype)
    xs = x.astype(shift.dtype)

    def shifted():
        return _sum(dy * (xs - shift), plan)

    if plan.formulation == "rough":  # unshifted where the forward pass was
        dot = jax.lax.cond(far, shifted, lambda: _sum(dy * xs, plan))
    else:
        dot = shifted()
    dgamma, dbeta, slope, constant = formulas.backward_coefficients(
        _sum(dy, plan), dot, plan.count, offset, inv, scale
    )
    dx = formulas.input_gradient(dy, xs - shift, scale, slope, constant, _XP)
    return dx.astype(x.dtype), dgamma, dbeta


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm(x, gamma, beta, epsilon: float, plan: Plan):
    """BN of the view ``x`` with its own statistics: ``(y, mean, variance)``."""
    return _forward(x, gamma, beta, epsilon, plan)[0]


_batch_norm.defvjp(_forward, _backward)


def _vector(value, plan: Plan, dtype, default: float):
    """A broadcastable per-channel ``value`` (or ``default``) as a view vector."""
    shape = _view(plan)[2]
    if value is None:
        return jnp.full(shape, default, dtype)
    return channel_vector(jnp.asarray(value), plan, jnp, shape).astype(dtype)


def batch_normalize(x, plan: Plan, gamma, beta, epsilon: float):
    """Training-mode BN of ``x`` as ``plan`` says: ``(y, mean, variance)`` as
    :func:`kerasbn.formulas.batch_normalize` returns them.

    Example:
        >>> x = jnp.array([[0.0], [2.0]])
        >>> y, mean, var = batch_normalize(x, formulation(x.shape, [0]), None, None, 0.0)
        >>> [float(v) for v in (y[0, 0], y[1, 0], mean[0, 0], var[0, 0])]
        [-1.0, 1.0, 1.0, 1.0]
    """
    x = jnp.asarray(x)
    dtype = formulas.statistics_dtype(x.dtype)
    y, mean, variance = _batch_norm(
        jnp.reshape(x, _view(plan)[0]),
        _vector(gamma, plan, dtype, 1.0),
        _vector(beta, plan, dtype, 0.0),
        float(epsilon),
        plan,
    )
    return (
        jnp.reshape(y, x.shape),
        jax.lax.stop_gradient(jnp.reshape(mean, plan.keepdims_shape)),
        jax.lax.stop_gradient(jnp.reshape(variance, plan.keepdims_shape)),
    )


# ------------------------------------------------------------------ inference
def normalize(x, plan: Plan, mean, variance, gamma, beta, epsilon: float):
    """Inference-mode BN: :func:`kerasbn.formulas.normalize` itself.

    Example:
        >>> x = jnp.array([[0.0], [2.0]])
        >>> plan = formulation(x.shape, [0], training=False)
        >>> y = normalize(x, plan, 1.0, 1.0, None, None, 0.0)
        >>> [float(v) for v in y.ravel()]
        [-1.0, 1.0]
    """
    del plan
    return formulas.normalize(x, mean, variance, gamma, beta, epsilon)


# ------------------------------------------------------ non-finite guard
def all_finite(first, *others):
    """A scalar boolean: every element of every array is finite.

    :func:`kerasbn.formulas.finite_probe` times 0 sums to 0 exactly when all
    are; summed to ``GUARD_LANES`` partial sums (one reduce, fused with the
    probe) that are added as scalars (fused into the consumer): one kernel
    where a plain reduction takes three.

    Example:
        >>> bool(all_finite(jnp.ones(40), jnp.zeros(40))), bool(all_finite(jnp.array([jnp.inf])))
        (True, False)
    """
    probe = formulas.finite_probe(jnp.asarray(first), *(jnp.asarray(t) for t in others))
    probe = jnp.ravel(probe * 0.0)
    size = probe.shape[0]
    if size > GUARD_LANES:
        columns = -(-size // GUARD_LANES)
        padded = jnp.pad(probe, (0, GUARD_LANES * columns - size))
        probe = jnp.sum(jnp.reshape(padded, (GUARD_LANES, columns)), axis=1)
    total = probe[0]
    for i in range(1, probe.shape[0]):
        total = total + probe[i]
    return total == 0.0


# ------------------------------------------------ synchronized statistics
def global_moments(local: formulas.Moments) -> formulas.Moments:
    """``local``: under SPMD the moments are global already.

    Example:
        >>> m = formulas.sufficient_moments(jnp.ones((2, 3)), [0])
        >>> global_moments(m) is m
        True
    """
    return local


def assert_divisible(x, group_size: int, message: str):
    """``x``: JAX traces static shapes, which the layer has checked already."""
    del group_size, message
    return x


# ------------------------------------------------ host-side worker gather
def gather_workers(array: np.ndarray, variable=None) -> np.ndarray:
    """Every process's float64 ``array``, stacked in process order, bit for bit.

    With several JAX processes (``jax.distributed``), one
    ``multihost_utils.process_allgather`` brings each process's array to
    every process. The float64 values travel as their bytes (viewed as
    uint32), so that JAX without x64 does not round them to float32. With one
    process, ``array[None]``. Every process must call it, with arrays of the
    same shape.

    Args:
        array: this process's array.
        variable: unused (the processes are JAX's own).

    Returns:
        ``(processes, *array.shape)`` float64.

    Example:
        >>> gather_workers(np.arange(3.0)).shape  # one process
        (1, 3)
    """
    array = np.ascontiguousarray(array, np.float64)
    if jax.process_count() == 1:
        return array[np.newaxis]
    from jax.experimental import multihost_utils

    words = array.reshape(-1).view(np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(words, tiled=False))
    gathered = np.ascontiguousarray(gathered, np.uint32).view(np.float64)
    return gathered.reshape(jax.process_count(), *array.shape)


def jit(function):
    """``jax.jit(function)`` in one process; ``function`` itself with several.

    The tools' statistics pass runs every process on its own data. A compiled
    function would take that host data for one value replicated over every
    process's devices, which it is not; op by op, each process computes on
    its own.

    Example:
        >>> float(jit(lambda x: x + 1)(jnp.float32(1)))
        2.0
    """
    return jax.jit(function) if jax.process_count() == 1 else function


def replicas_in_sync() -> int:
    """1: Keras's JAX trainer does not scale a loss by the replicas.

    Example:
        >>> replicas_in_sync()
        1
    """
    return 1
