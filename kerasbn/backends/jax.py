"""JAX kernels: one ``jax.custom_vjp`` per training call; SPMD statistics.

A training call views the input as ``(outer, C, inner)`` at no cost and computes
:mod:`kerasbn.formulas` in the fewest passes, as plain HLO that XLA fuses with
the layer's neighbours. :func:`formulation` picks the statistics: ``"shifted"``
(of ``x`` minus its first sample, which XLA's CPU reductions materialize) or, for
large static inputs on a CPU, ``"rough"``: unshifted, a ``lax.cond`` taking the
shifted ones where a mean lies beyond ``ROUGH_MAX_MEAN_SPREADS`` spreads from
zero. Outputs are float32 (float64 for float64); ``dx`` has ``x``'s dtype.
Inference is :func:`kerasbn.formulas.normalize`. Declined: a mask, non-floating
inputs, channel axes that are not adjacent, an unknown size, no reduction axis,
an empty batch.

Under ``keras.distribution`` (also across ``jax.distributed`` processes) the
trainer compiles one SPMD program, whose reductions over the sharded batch are
global. Not covered: a layer called by hand in ``jax.pmap`` or ``shard_map``
(the axis name to merge over is unknown).

Example:
    >>> import jax.numpy as jnp
    >>> [formulation(s, [0, 1, 2]).formulation for s in [(32, 56, 56, 64), (8, 4, 4, 3)]]
    ['rough', 'shifted']
    >>> x = jnp.ones((8, 4, 4, 3))
    >>> y, mean, var = batch_normalize(x, formulation(x.shape, [0, 1, 2]), None, None, 0.0)
    >>> y.shape, mean.shape, float(mean[0, 0, 0, 0])
    ((8, 4, 4, 3), (1, 1, 1, 3), 1.0)
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
"""Measured per instruction set (``benchmarks/README.md``): the size from which
``"rough"`` serves (its cond costs more on small inputs); below, and on
unmeasured CPUs, ``"shifted"``, never slower than Keras's BN."""
ROUGH_MAX_MEAN_SPREADS = 3.0
"""Within it, unshifted sums give the variance ~``(1 + 3**2) * eps`` relative error."""
GUARD_LANES = 32  # XLA's CPU runtime splits a longer reduction in two kernels

_XP = formulas.Namespace(jnp, rsqrt=jax.lax.rsqrt)


def device(x) -> str | None:
    """JAX's default platform; None without a shape."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        return None
    return default_device()


def default_device() -> str:
    """``jax.default_backend()``, a CPU as :data:`CPU_DEVICE`."""
    platform = jax.default_backend()
    return isa.resolve(platform, CPU_DEVICE)


def xla_cpu_max_isa() -> str | None:
    """The cap of ``--xla_cpu_max_isa`` in ``XLA_FLAGS``, or None."""
    found = re.findall(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
    return found[-1] if found else None


CPU_DEVICE = isa.cpu_device(isa.instruction_set(xla_cpu_max_isa()))
"""This process's CPU: its instruction set, capped by ``--xla_cpu_max_isa``."""


def formulation(
    shape: Sequence,
    axes: Sequence[int],
    *,
    dtype: str = "float32",
    epsilon: float = 1e-3,
    training: bool = True,
    device: str = CPU,
) -> Plan | None:
    """:meth:`kerasbn.backends.Kernels.formulation`; ``"affine"`` in inference."""
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


def _view(plan: Plan) -> tuple[tuple, tuple[int, ...], tuple]:
    """The view ``(outer, C, inner)`` less size-1 ends: shape, reduced axes, vector."""
    if plan.inner == 1:
        shape, axes = (plan.outer, plan.channels), (0,)
    elif plan.outer == 1:
        shape, axes = (plan.channels, plan.inner), (1,)
    else:
        shape, axes = (plan.outer, plan.channels, plan.inner), (0, 2)
    return shape, axes, tuple(1 if a in axes else d for a, d in enumerate(shape))


def _sum(t, plan: Plan):
    return jnp.sum(t, _view(plan)[1], keepdims=True)


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
    """:meth:`kerasbn.backends.Kernels.batch_normalize`."""
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


def normalize(x, plan: Plan, mean, variance, gamma, beta, epsilon: float):
    """:func:`kerasbn.formulas.normalize` itself: one fused multiply-add."""
    del plan
    return formulas.normalize(x, mean, variance, gamma, beta, epsilon)


def all_finite(first, *others):
    """``finite_probe(...) * 0`` sums to 0 iff all is finite: ``GUARD_LANES`` partial
    sums added as scalars are one kernel, where a plain reduction takes three."""
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


moving_average = formulas.ema_update  # Keras's own ops, which the compiler fuses


def assign_where(usable, updates) -> None:
    """One ``jnp.where`` per variable."""
    for variable, current, value in updates:
        variable.assign(jnp.where(usable, jnp.asarray(value, current.dtype), current))


def global_moments(local: formulas.Moments) -> formulas.Moments:
    """``local``: under SPMD the moments are global already."""
    return local


def assert_divisible(x, group_size: int, message: str):
    """``x``: JAX traces static shapes, which the layer has checked already."""
    del group_size, message
    return x


def gather_workers(array: np.ndarray, variable=None) -> np.ndarray:
    """:meth:`kerasbn.backends.Kernels.gather_workers` over ``jax.distributed``'s
    processes, the float64 bytes sent as uint32 (JAX without x64 would round)."""
    array = np.ascontiguousarray(array, np.float64)
    if jax.process_count() == 1:
        return array[np.newaxis]
    from jax.experimental import multihost_utils

    words = array.reshape(-1).view(np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(words, tiled=False))
    gathered = np.ascontiguousarray(gathered, np.uint32).view(np.float64)
    return gathered.reshape(jax.process_count(), *array.shape)


def jit(function):
    """``jax.jit(function)`` in one process (op-by-op JAX compiles every op); with
    several, ``function``: compiled, it would take each process's data as shared."""
    return jax.jit(function) if jax.process_count() == 1 else function


def replicas_in_sync() -> int:
    """1: Keras's JAX trainer does not scale a loss by the replicas."""
    return 1
