"""The JAX kernels: one ``jax.custom_vjp`` per training call, and SPMD statistics.

A training call views the input, at no cost, as ``(outer, C, inner)``
(``(rows, C)`` for channels-last inputs, ``(B, C, H * W)`` for channels-first
ones) and computes, in the fewest passes over memory that XLA allows, what
:mod:`kerasbn.formulas` computes:

* forward: the sums of ``d = x - shift`` and ``d * d`` per channel
  (:func:`~kerasbn.formulas.shifted_statistics`), then one element-wise pass
  ``y = d * scale + bias`` (:func:`~kerasbn.formulas.normalized`);
* backward: the sums of ``dy`` and ``dy * d``, then one element-wise pass for
  ``dx`` (:func:`~kerasbn.formulas.backward_coefficients`); the gradients of
  gamma and beta come from the same sums.

Every step of it is plain HLO inside the train step's program, so XLA fuses
the element-wise passes with the producer and the consumer of the layer.

The statistics are computed one of two ways (:func:`formulation`):

* ``"shifted"``: the shift is the first sample of each channel. XLA's CPU
  reductions do not fuse a broadcast subtraction, so ``d`` is materialized:
  two passes over memory more than sums of ``x`` itself.
* ``"rough"`` (on the CPU, for static shapes of ``ROUGH_MIN_ELEMENTS`` or
  more): the shift is 0, so the sums of ``x`` and ``x * x`` need no ``d``.
  Their relative error grows like ``(1 + (mean / std)**2) * eps``, so a
  ``lax.cond`` (one branch runs) switches to the shifted statistics, and the
  backward pass with them, wherever some channel's mean lies more than
  ``ROUGH_MAX_MEAN_SPREADS`` standard deviations from zero
  (:func:`~kerasbn.formulas.far_from_zero`). Inside a compiled train step a
  ``lax.cond`` costs more than the passes it saves on small inputs, hence
  the threshold; the saving was measured with XLA's CPU reductions only,
  hence the CPU. ``benchmarks/README.md`` has the figures.

Outputs are float32 (float64 for float64 inputs), also for float16 and
bfloat16 inputs; the gradient with respect to ``x`` has ``x``'s dtype.
Inference is :func:`kerasbn.formulas.normalize` itself: one fused
multiply-add, which is what XLA makes of it.

Declined (the generic formulas serve the call): a mask, non-floating inputs,
channel axes that are not adjacent (``axis=[1, 3]``, ghost batches), an
unknown dimension, no reduction axis, an empty batch.

**Synchronized statistics.** Under ``keras.distribution`` (``DataParallel``,
``ModelParallel``, also over processes joined by ``jax.distributed``), Keras's
JAX trainer compiles one SPMD program for the whole device mesh: a reduction
over the sharded batch axis is a reduction over the global batch, and XLA
inserts the cross-device sums itself. So the moments computed in the step are
already global (:func:`global_moments` returns them unchanged), and
``synchronized=False`` gives the same global statistics. Not covered: a layer
called inside ``jax.pmap`` or ``shard_map`` by hand, where each shard computes
its own statistics (the axis name to merge over is not known here).

Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.zeros((8, 4, 4, 3)) + 1.0
    >>> plan = formulation(x.shape, [0, 1, 2])
    >>> plan.formulation
    'shifted'
    >>> y, mean, var = batch_normalize(x, plan, None, None, 1e-3)
    >>> y.shape, mean.shape, float(mean[0, 0, 0, 0])
    ((8, 4, 4, 3), (1, 1, 1, 3), 1.0)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kerasbn import formulas
from kerasbn.backends.plan import CPU, Plan, channel_vector

__all__ = [
    "DTYPES",
    "GUARD_LANES",
    "ROUGH_MAX_MEAN_SPREADS",
    "ROUGH_MIN_ELEMENTS",
    "all_finite",
    "assert_divisible",
    "batch_normalize",
    "default_device",
    "device",
    "formulation",
    "global_moments",
    "normalize",
]

DTYPES = ("float16", "bfloat16", "float32", "float64")
ROUGH_MIN_ELEMENTS = 1 << 20
"""Below this many elements the statistics are always shifted."""
ROUGH_MAX_MEAN_SPREADS = 3.0
"""The rough (unshifted) sums serve while every channel's mean lies within
this many standard deviations of zero: there the variance keeps float32
precision (a relative error of about ``(1 + 3**2) * eps``)."""
GUARD_LANES = 32
"""XLA's CPU runtime splits a reduction of more elements into two kernels."""

_XP = formulas.Namespace(jnp, rsqrt=jax.lax.rsqrt)


def device(x) -> str | None:
    """JAX's default platform (where Keras's JAX backend computes), or None
    for an object without a shape and a dtype."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        return None
    return default_device()


def default_device() -> str:
    """``jax.default_backend()``: ``"cpu"``, ``"gpu"``, ``"tpu"``..."""
    return jax.default_backend()


def formulation(
    shape: Sequence,
    axes: Sequence[int],
    *,
    dtype: str = "float32",
    epsilon: float = 1e-3,
    training: bool = True,
    device: str = CPU,
) -> Plan | None:
    """How a call is computed: ``"shifted"`` or ``"rough"`` statistics in
    training (see the module docstring), ``"affine"`` in inference.

    Args:
        shape: the input's shape (ints or ``jax.export`` symbolic dimensions).
        axes: the reduction axes.
        dtype: the input's dtype.
        epsilon: the layer's epsilon (no choice depends on it).
        training: whether the call uses batch statistics.
        device: the platform (``"cpu"``, ``"gpu"``...); ``"rough"`` is for
            the CPU only.

    Returns:
        The plan, or None for a call that the fast path declines.

    Example:
        >>> formulation((32, 56, 56, 64), [0, 1, 2]).formulation
        'rough'
        >>> formulation((32, 56, 56, 64), [0, 1, 2], device="gpu").formulation
        'shifted'
        >>> formulation((4, 5, 6), [1]) is None  # channel axes 0 and 2
        True
    """
    del epsilon
    plan = Plan.of(shape, axes, device=device, training=training)
    if plan is None or dtype not in DTYPES or None in plan.shape or plan.empty:
        return None
    if not training:
        return plan.using("affine")
    rough = device == CPU and plan.static and plan.nominal_size >= ROUGH_MIN_ELEMENTS
    return plan.using("rough" if rough else "shifted")


# ------------------------------------------------------------------- the view
def _view_shape(plan: Plan) -> tuple:
    """``(outer, C, inner)`` with size-1 ends dropped, so that reductions run
    over at most two axes of a contiguous array."""
    if plan.inner == 1:
        return (plan.outer, plan.channels)
    if plan.outer == 1:
        return (plan.channels, plan.inner)
    return (plan.outer, plan.channels, plan.inner)


def _view_axes(plan: Plan) -> tuple[int, ...]:
    """The reduction axes of :func:`_view_shape`."""
    if plan.inner == 1:
        return (0,)
    if plan.outer == 1:
        return (1,)
    return (0, 2)


def _vector_shape(plan: Plan) -> tuple[int, ...]:
    """A per-channel vector in the view: size 1 on the reduced axes."""
    axes = _view_axes(plan)
    return tuple(1 if a in axes else d for a, d in enumerate(_view_shape(plan)))


def _sum(t, plan: Plan):
    return jnp.sum(t, _view_axes(plan), keepdims=True)


# ------------------------------------------------------------------- training
def _statistics(x, plan: Plan):
    """``(shift, offset, variance, far)`` of the view ``x`` (statistics dtype)."""
    n = plan.count

    def shifted():
        shift = jax.lax.stop_gradient(x[formulas.shift_index(x.ndim, _view_axes(plan))])
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
    """The gradients w.r.t. ``x``, gamma and beta of ``sum(y * dy)``; the
    cotangents of the statistics are ignored (they carry no gradient)."""
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
    if value is None:
        return jnp.full(_vector_shape(plan), default, dtype)
    vector = channel_vector(jnp.asarray(value), plan, jnp, _vector_shape(plan))
    return vector.astype(dtype)


def batch_normalize(x, plan: Plan, gamma, beta, epsilon: float):
    """Training-mode BN of ``x`` as ``plan`` says (see :func:`formulation`).

    Args:
        x: the input array.
        plan: its training plan.
        gamma, beta: scale and offset broadcastable to ``x`` with one value
            per channel, or None.
        epsilon: added to the variance.

    Returns:
        ``(y, mean, variance)``: the output in float32 (float64 for float64
        inputs), and the batch mean and biased variance in that dtype with
        the reduced axes kept (no gradient).

    Example:
        >>> x = jnp.array([[0.0], [2.0]])
        >>> y, mean, var = batch_normalize(x, formulation(x.shape, [0]), None, None, 0.0)
        >>> [float(v) for v in (y[0, 0], y[1, 0], mean[0, 0], var[0, 0])]
        [-1.0, 1.0, 1.0, 1.0]
    """
    x = jnp.asarray(x)
    dtype = formulas.statistics_dtype(x.dtype)
    y, mean, variance = _batch_norm(
        jnp.reshape(x, _view_shape(plan)),
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
    """Inference-mode BN: :func:`kerasbn.formulas.normalize` itself, which XLA
    fuses into one multiply-add over ``x``.

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

    The probe of :func:`kerasbn.formulas.finite_probe`, times 0, sums to 0
    exactly when all are. A longer probe than ``GUARD_LANES`` is summed to
    ``GUARD_LANES`` partial sums (one reduce that fuses the probe), and those
    are added as scalars, which XLA fuses into the kernel that consumes the
    result: one kernel where a plain reduction takes three.

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
    """The moments of the global batch: ``local`` itself under SPMD (see the
    module docstring).

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
