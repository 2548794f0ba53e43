"""The batch-normalization formulas, each written once, pure and stateless.

Every formula of kerasbn lives here, and everything else calls it: the layer,
the backend fast paths of :mod:`kerasbn.backends`, and the tools that compute
on the host in NumPy float64. A formula that needs array functions beyond the
arithmetic operators takes them from ``xp``, a namespace with NumPy's names:
:data:`KERAS` (``keras.ops``, the default: any Keras backend, traced or
eager), :data:`HOST` (NumPy), or a backend's own (see :class:`Namespace`). The
formulas that a fast path applies per channel use only the operators and
``xp.rsqrt``/``xp.maximum``/``xp.multiply_add``, so every framework runs them
in its own ops.

Statistics are kept as *shifted sufficient moments* ``(count, shift, offset,
m2)``: the mean is ``shift + offset`` and the biased variance ``m2 / count``.
The shift is taken from the data (the first sample, :func:`shift_index`; the
generic path refines it to the mean that sample gives), so that ``d = x -
shift`` is small and exact even where the mean is large next to the spread
(mean 1e4, std 1e-2 in float32), and the moments follow from the sums of
``d`` and ``d * d`` (:func:`shifted_statistics`). Groups of moments merge
exactly with Chan et al.'s pairwise formula (:func:`combine_moments`);
``E[x**2] - E[x]**2`` of the raw input is never formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops

from kerasbn import _checks

__all__ = [
    "HOST",
    "KERAS",
    "Moments",
    "Namespace",
    "affine",
    "affine_from_statistics",
    "all_finite",
    "backward_coefficients",
    "batch_normalize",
    "biased_variance",
    "combine_moments",
    "divide_no_nan",
    "ema_update",
    "expand_mask",
    "far_from_zero",
    "finite_probe",
    "input_gradient",
    "inverse_std",
    "moments",
    "normalize",
    "normalized",
    "renorm_correction",
    "sample_count",
    "shift_index",
    "shifted_statistics",
    "statistics_dtype",
    "sufficient_moments",
    "unbiased_variance",
]


class Namespace:
    """Array functions under NumPy's names, for the formulas' ``xp`` argument.

    Every attribute is ``module``'s, except those given as ``overrides``, and
    ``multiply_add(a, b, c)`` is ``a * b + c`` unless overridden (PyTorch
    fuses it in one kernel, ``torch.addcmul``).

    Args:
        module: the module whose functions serve (``numpy``, ``jax.numpy``...).
        **overrides: functions that replace or complete it (``rsqrt``...).

    Example:
        >>> import numpy as np
        >>> xp = Namespace(np, rsqrt=lambda t: 1.0 / np.sqrt(t))
        >>> float(xp.rsqrt(4.0)), float(xp.multiply_add(2.0, 3.0, 1.0))
        (0.5, 7.0)
    """

    def __init__(self, module: Any, **overrides: Callable):
        self._module = module
        self.__dict__.update(overrides)

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    @staticmethod
    def multiply_add(a, b, c):
        """``a * b + c``."""
        return a * b + c


def _keras_maximum(x, y):
    """The larger of ``x`` and ``y``, in ``x``'s dtype (NaN in ``x`` stays NaN).

    ``keras.ops.maximum`` computes in Keras's result dtype, float32 for
    float64 tensors on PyTorch, which would cost float64 statistics their
    precision.
    """
    y = ops.cast(y, x.dtype)
    return ops.where(x < y, y, x)


KERAS = Namespace(ops, maximum=_keras_maximum)
"""``keras.ops``: the formulas on any Keras backend (the default ``xp``)."""

HOST = Namespace(np, rsqrt=lambda t: 1.0 / np.sqrt(t))
"""NumPy: the formulas on host arrays (the tools compute in float64)."""


class Moments(NamedTuple):
    """Shifted sufficient moments of one or more groups of samples.

    Attributes:
        count: number of samples (float).
        shift: a value close to the mean (computed from the samples).
        offset: mean of ``x - shift``; the mean is ``shift + offset``.
        m2: sum of squared deviations from the mean.
    """

    count: Any
    shift: Any
    offset: Any
    m2: Any

    @property
    def mean(self):
        """``shift + offset``."""
        return self.shift + self.offset

    @property
    def variance(self):
        """The biased variance ``m2 / count`` (0 where ``count`` is 0)."""
        return divide_no_nan(self.m2, self.count)


# ---------------------------------------------------------------- helpers
def divide_no_nan(x, y, xp=KERAS):
    """``x / y``, and 0 where ``y`` is 0, in the inputs' dtype.

    ``keras.ops.divide_no_nan`` returns float32 for float64 inputs on PyTorch,
    which would cost float64 statistics their precision.

    Example:
        >>> float(divide_no_nan(keras.ops.array(1.0), keras.ops.array(0.0)))
        0.0
    """
    zero = xp.equal(y, 0)
    quotient = x / xp.where(zero, xp.ones_like(y), y)
    return xp.where(zero, xp.zeros_like(quotient), quotient)


def statistics_dtype(dtype) -> str:
    """The dtype that statistics use for inputs of ``dtype``: float32 at least.

    Example:
        >>> statistics_dtype("bfloat16"), statistics_dtype("float64")
        ('float32', 'float64')
    """
    dtype = keras.backend.standardize_dtype(dtype)
    return "float64" if dtype == "float64" else "float32"


def shift_index(rank: int, axes: Sequence[int]) -> tuple[slice, ...]:
    """The index of the shift in a rank-``rank`` input reduced over ``axes``.

    The shift of the statistics is the first sample of each channel:
    ``x[shift_index(x.ndim, axes)]`` keeps size 1 on the reduced axes.

    Example:
        >>> shift_index(3, [0, 2])
        (slice(0, 1, None), slice(None, None, None), slice(0, 1, None))
    """
    reduced = {a % rank for a in axes}
    return tuple(slice(0, 1) if a in reduced else slice(None) for a in range(rank))


# ---------------------------------------------------- per-channel formulas
def shifted_statistics(d_sum, d_square_sum, count, xp=KERAS):
    """``(offset, variance)`` from the sums of ``d = x - shift`` and ``d * d``.

    ``offset = sum(d) / n`` (the mean is ``shift + offset``) and ``variance
    = sum(d * d) / n - offset**2``, floored at 0. Exact to the rounding of
    the sums where the shift lies within a few spreads of the mean (the
    relative error grows like ``(1 + (offset / std)**2) * eps``), so the
    shift is a sample of the data; with a shift of 0 these are the plain
    moments, accurate only while the mean is near zero (see
    :func:`far_from_zero`).

    Args:
        d_sum, d_square_sum: the per-channel sums.
        count: ``n``, the number of values per channel (> 0; a caller with
            empty channels passes ``maximum(count, 1)``, whose sums are 0).
        xp: the namespace of ``maximum``.

    Returns:
        ``(offset, variance)``.

    Example:
        >>> offset, variance = shifted_statistics(2.0, 6.0, 2.0, HOST)  # d = 0, 2
        >>> float(offset), float(variance)
        (1.0, 2.0)
    """
    offset = d_sum / count
    return offset, xp.maximum(d_square_sum / count - offset * offset, 0.0)


def far_from_zero(mean, variance, spreads: float):
    """Per channel: the mean lies more than ``spreads`` standard deviations from 0.

    Statistics or kernels that round the mean itself (plain sums of ``x``,
    a kernel's float32 mean) lose precision in such channels, and switch to
    the shifted statistics there.

    Example:
        >>> bool(far_from_zero(4.0, 1.0, 3.0)), bool(far_from_zero(2.0, 1.0, 3.0))
        (True, False)
    """
    return mean * mean > spreads * spreads * variance


def inverse_std(variance, epsilon: float, xp=KERAS):
    """``1 / sqrt(variance + epsilon)``.

    Example:
        >>> float(inverse_std(3.0, 1.0, HOST))
        0.5
    """
    return xp.rsqrt(variance + epsilon)


def affine(inv, mean, gamma, beta):
    """``(scale, offset)`` with BN(x) = ``x * scale + offset``, from ``inv =
    inverse_std(variance, epsilon)``; ``gamma``/``beta`` may be None.

    Example:
        >>> affine(0.5, 1.0, 2.0, None)
        (1.0, -1.0)
    """
    scale = inv if gamma is None else gamma * inv
    offset = -mean * scale if beta is None else beta - mean * scale
    return scale, offset


def affine_from_statistics(mean, variance, gamma, beta, epsilon: float, xp=KERAS):
    """The per-channel ``(scale, offset)`` such that BN(x) = ``x * scale + offset``.

    The affine of inference, and what folding BN into the preceding layer
    absorbs (with :data:`HOST`, in NumPy float64).

    Args:
        mean, variance: the statistics.
        gamma, beta: scale and offset, or None.
        epsilon: added to the variance.
        xp: the namespace of ``rsqrt``.

    Returns:
        ``(scale, offset)`` in the statistics' dtype.

    Example:
        >>> s, o = affine_from_statistics(1.0, 4.0, 2.0, 0.5, 0.0)
        >>> float(s), float(o)
        (1.0, -0.5)
    """
    return affine(inverse_std(variance, epsilon, xp), mean, gamma, beta)


def normalized(d, scale, bias, xp=KERAS):
    """The output ``d * scale + bias`` of a training kernel.

    ``d = x - shift`` and ``(scale, bias) = affine(inv, offset, gamma, beta)``:
    the shift cancels, so the output does not inherit the rounding of a large
    mean.

    Example:
        >>> float(normalized(2.0, 0.5, -1.0, HOST))
        0.0
    """
    return xp.multiply_add(d, scale, bias)


def backward_coefficients(dy_sum, dy_d_sum, count, offset, inv, scale):
    """The gradients of ``sum(BN(x) * dy)`` from two per-channel sums.

    With ``d = x - shift`` (the forward pass's), ``dx = dy * scale - (d *
    slope + constant)`` (:func:`input_gradient`), which is ``scale * (dy -
    mean(dy) - x_hat * mean(dy * x_hat))`` written around the shift.

    Args:
        dy_sum, dy_d_sum: the sums of ``dy`` and of ``dy * d`` per channel.
        count: ``n``, the values per channel.
        offset, inv, scale: the forward pass's (``inv = 1 / sqrt(var +
            epsilon)``, ``scale = gamma * inv``).

    Returns:
        ``(dgamma, dbeta, slope, constant)``.

    Example:
        >>> dgamma, dbeta, slope, constant = backward_coefficients(
        ...     2.0, 2.0, 2.0, 1.0, 1.0, 1.0)  # x = 0, 2; dy = 1, 1
        >>> dgamma, dbeta, slope, constant
        (0.0, 2.0, 0.0, 1.0)
    """
    projection = dy_d_sum - offset * dy_sum  # sum(dy * (x - mean))
    dgamma = projection * inv
    per_sample = scale / count
    slope = per_sample * inv * dgamma  # scale * inv**2 * projection / n
    constant = per_sample * dy_sum - offset * slope
    return dgamma, dy_sum, slope, constant


def input_gradient(dy, d, scale, slope, constant, xp=KERAS):
    """``dx = dy * scale - (d * slope + constant)`` (see
    :func:`backward_coefficients`).

    Example:
        >>> float(input_gradient(1.0, 2.0, 1.0, 0.0, 1.0, HOST))
        0.0
    """
    return dy * scale - xp.multiply_add(d, slope, constant)


def unbiased_variance(variance, count, xp=KERAS):
    """``variance * n / (n - 1)`` (Bessel's correction) for ``n = count``.

    A group of at most one value has no unbiased variance; it gets 0, the
    biased variance of one value, rather than a NaN.

    Args:
        variance: the biased variance.
        count: ``n``, a Python number or a tensor that broadcasts to it.
        xp: the namespace for a tensor ``count``.

    Returns:
        The unbiased variance, in ``variance``'s dtype.

    Example:
        >>> float(unbiased_variance(keras.ops.array(3.0), 4.0))  # n = 4: times 4 / 3
        4.0
    """
    if isinstance(count, (int, float)):
        return variance * (count / (count - 1.0) if count > 1 else 0.0)
    count = xp.cast(count, variance.dtype)
    return variance * divide_no_nan(count, xp.maximum(count - 1.0, 0.0), xp)


def biased_variance(variance, count):
    """``variance * (n - 1) / n``: the biased variance from the unbiased one.

    Kernels that keep the Bessel-corrected batch variance (TensorFlow's
    fused kernel, ``torch.batch_norm``) are scaled back with it. ``count``
    is a Python number, or a tensor of ``n`` (then at least 1).

    Example:
        >>> biased_variance(4.0, 4.0)
        3.0
    """
    if isinstance(count, (int, float)):
        return variance * ((count - 1.0) / count if count > 1 else 0.0)
    return variance * ((count - 1.0) / count)


def ema_update(moving, value, momentum: float):
    """The Keras moving average: ``moving * momentum + value * (1 - momentum)``.

    Example:
        >>> float(ema_update(1.0, 0.0, 0.99))
        0.99
    """
    return moving * momentum + value * (1.0 - momentum)


# ------------------------------------------------------ non-finite guard
def finite_probe(first, *others):
    """``first + sum(t * 0 for t in others)``: finite exactly where all are.

    ``t * 0`` is 0 where ``t`` is finite and NaN where it is ±inf or NaN, and
    adding 0 cannot overflow, so one reduction of the probe (all finite, or
    ``sum(probe * 0) == 0``) tests every tensor. Each backend reduces it as
    its compiler likes best (``kerasbn.backends.<name>.all_finite``).

    Example:
        >>> import numpy as np
        >>> finite_probe(np.ones(2), np.array([0.0, np.inf])).tolist()
        [1.0, nan]
    """
    probe = first
    for t in others:
        probe = probe + t * 0.0
    return probe


def all_finite(first, *others, xp=KERAS):
    """A scalar boolean: every element of every tensor is finite.

    ``sum(finite_probe(...) * 0) == 0``: one reduction in all.

    Args:
        first, *others: tensors that broadcast together.
        xp: the namespace of ``sum``.

    Example:
        >>> bool(all_finite(keras.ops.ones(2), keras.ops.array([0.0, float("inf")])))
        False
    """
    return xp.sum(finite_probe(first, *others) * 0.0) == 0.0


# ------------------------------------------------------ generic moments
def sample_count(x, axes: Sequence[int], mask=None):
    """The number of values per channel over ``axes``: the ``n`` of a variance.

    Without a mask it is a Python float where ``x``'s reduced sizes are static,
    else a scalar tensor of ``x``'s statistics dtype from the dynamic shape;
    with a mask, the count of True positions per channel (statistics dtype,
    reduced axes kept).

    Example:
        >>> sample_count(keras.ops.ones((4, 3, 2)), [0, 1])
        12.0
    """
    dtype = statistics_dtype(x.dtype)
    if mask is None:
        sizes = [x.shape[a] for a in axes]
        if all(s is not None for s in sizes):
            return float(math.prod(sizes))
        shape = ops.shape(x)
        return ops.cast(math.prod(shape[a] for a in axes), dtype)
    mask = ops.broadcast_to(ops.cast(mask, dtype), ops.shape(x))
    return ops.sum(mask, axis=tuple(axes), keepdims=True)


def sufficient_moments(x, axes: Sequence[int], mask=None) -> Moments:
    """Shifted sufficient moments of ``x`` over ``axes``.

    Args:
        x: input tensor; cast to float32 (float64 stays float64).
        axes: the reduction axes.
        mask: optional boolean tensor broadcastable to ``x`` (size 1 on the
            axes that are not reduced). False positions are ignored, whatever
            value ``x`` holds there (NaN included).

    Returns:
        A :class:`Moments` whose fields keep the reduced axes with size 1.

    Example:
        >>> m = sufficient_moments(keras.ops.ones((4, 3)), axes=[0])
        >>> [float(v) for v in keras.ops.ravel(m.variance)]
        [0.0, 0.0, 0.0]
    """
    axes = tuple(axes)
    x = ops.cast(x, statistics_dtype(x.dtype))
    if mask is not None:
        mask = ops.broadcast_to(ops.cast(mask, "bool"), ops.shape(x))
        x = ops.where(mask, x, ops.zeros_like(x))
        count = ops.sum(ops.cast(mask, x.dtype), axis=axes, keepdims=True)
    else:
        count = sample_count(x, axes)
    # Empty channels have sums of 0: dividing them by 1 gives 0.
    if isinstance(count, float):
        divisor = max(count, 1.0)
    else:
        divisor = KERAS.maximum(count, 1.0)

    def deviations(shift):
        d = x - shift
        return d if mask is None else ops.where(mask, d, ops.zeros_like(d))

    # The first sample (a sum over a one-sample slice, 0 for an empty batch),
    # then the mean it gives: the sums around that are exact at any
    # magnitude, and their square cancels nothing (a two-pass variance).
    first = ops.sum(x[shift_index(x.ndim, axes)], axis=axes, keepdims=True)
    shift = ops.stop_gradient(
        first + ops.sum(deviations(first), axis=axes, keepdims=True) / divisor
    )
    d = deviations(shift)
    offset, variance = shifted_statistics(
        ops.sum(d, axis=axes, keepdims=True),
        ops.sum(ops.square(d), axis=axes, keepdims=True),
        divisor,
    )
    count = ops.zeros_like(shift) + count
    return Moments(count, shift, offset, variance * count)


def expand_mask(mask, x):
    """A layer's ``mask`` by Keras's BN rule, as a boolean tensor of ``x``'s shape.

    A mask of rank ``x.ndim - 1`` is expanded at the last axis, whatever the
    channel axes (Keras's rule); one of ``x``'s rank is taken as it is. It is
    then broadcast to ``x``.

    Args:
        mask: the mask, or None.
        x: the layer's input.

    Returns:
        The boolean mask of ``x``'s shape, or None.

    Raises:
        ValueError: the mask has another rank or does not broadcast to ``x``.

    Example:
        >>> m = expand_mask(keras.ops.array([[True, False]]), keras.ops.ones((1, 2, 3)))
        >>> tuple(m.shape)
        (1, 2, 3)
    """
    if mask is None:
        return None
    if _checks.mask_shape(mask.shape, x.shape):
        mask = ops.expand_dims(mask, -1)
    return ops.broadcast_to(ops.cast(mask, "bool"), ops.shape(x))


def moments(x, axes: Sequence[int], mask=None):
    """Mean and biased variance of ``x`` over ``axes`` (keepdims), float32 at least.

    Args:
        x: input tensor.
        axes: the reduction axes.
        mask: optional boolean tensor broadcastable to ``x``; see
            :func:`sufficient_moments`.

    Returns:
        ``(mean, variance)`` with ``variance >= 0``. A fully masked group gives
        mean 0 and variance 0.

    Example:
        >>> mean, var = moments(keras.ops.array([[1.0], [3.0]]), axes=[0])
        >>> float(mean[0, 0]), float(var[0, 0])
        (2.0, 1.0)
    """
    m = sufficient_moments(x, axes, mask)
    return m.mean, m.variance


def combine_moments(groups: Moments, axis: int = 0, xp=KERAS) -> Moments:
    """Merges groups of moments stacked along ``axis`` into one (Chan et al.).

    All groups are re-expressed around the shift of the largest group, which
    keeps the merge exact when the mean is large compared with the spread.
    Groups with count 0 contribute nothing. The one merge of kerasbn: across
    replicas (``keras.ops``) and across batches on the host (:data:`HOST`,
    float64), where two moments ``a`` and ``b`` merge as
    ``combine_moments(Moments(*map(np.stack, zip(a, b))), xp=HOST)``.

    Args:
        groups: a :class:`Moments` whose fields are stacked along ``axis``.
        axis: the axis that indexes the groups.
        xp: the namespace of the array functions.

    Returns:
        The merged :class:`Moments`, with ``axis`` removed.

    Example:
        >>> a = sufficient_moments(keras.ops.array([[1.0], [2.0]]), [0])
        >>> b = sufficient_moments(keras.ops.array([[6.0]]), [0])
        >>> stacked = Moments(*[keras.ops.stack(f) for f in zip(a, b)])
        >>> round(float(combine_moments(stacked).variance[0, 0]), 6)  # var of 1, 2, 6
        4.666667
    """
    count, shift, offset, m2 = groups
    largest = xp.expand_dims(xp.argmax(count, axis=axis), axis)
    common_shift = xp.take_along_axis(shift, largest, axis=axis)
    group_offset = (shift - common_shift) + offset
    total = xp.sum(count, axis=axis)
    mean_offset = divide_no_nan(xp.sum(count * group_offset, axis=axis), total, xp)
    between = count * xp.square(group_offset - xp.expand_dims(mean_offset, axis))
    merged_m2 = xp.sum(m2, axis=axis) + xp.sum(between, axis=axis)
    return Moments(total, xp.squeeze(common_shift, axis), mean_offset, merged_m2)


# ------------------------------------------------------------ the generic BN
def normalize(x, mean, variance, gamma, beta, epsilon: float):
    """``gamma * (x - mean) / sqrt(variance + epsilon) + beta``.

    Computed as ``x * scale + offset`` with the per-channel ``scale`` and
    ``offset`` of :func:`affine_from_statistics` formed first, in the
    statistics' dtype, exactly as ``tf.nn.batch_normalization`` does.

    Args:
        x: input tensor.
        mean, variance: statistics broadcastable to ``x``.
        gamma, beta: scale and offset broadcastable to ``x``, or None.
        epsilon: added to the variance.

    Returns:
        The normalized tensor, in ``x``'s statistics dtype (float32 at least).

    Example:
        >>> y = normalize(keras.ops.array([[0.0], [2.0]]), 1.0, 1.0, None, None, 0.0)
        >>> [float(v) for v in keras.ops.ravel(y)]
        [-1.0, 1.0]
    """
    x = ops.cast(x, statistics_dtype(x.dtype))
    scale, offset = affine_from_statistics(mean, variance, gamma, beta, epsilon)
    return x * ops.cast(scale, x.dtype) + ops.cast(offset, x.dtype)


def batch_normalize(x, axes: Sequence[int], gamma, beta, epsilon: float, mask=None):
    """Training-mode batch normalization: ``x`` normalized with its own statistics.

    Args:
        x: input tensor.
        axes: the reduction axes.
        gamma, beta: scale and offset broadcastable to ``x``, or None.
        epsilon: added to the variance.
        mask: optional boolean tensor broadcastable to ``x``.

    Returns:
        ``(y, mean, variance)``: the output in the statistics dtype, and the
        batch statistics with the reduced axes kept.

    Example:
        >>> y, mean, var = batch_normalize(keras.ops.array([[0.0], [2.0]]), [0],
        ...                                None, None, 0.0)
        >>> [float(v) for v in keras.ops.ravel(y)], float(mean[0, 0])
        ([-1.0, 1.0], 1.0)
    """
    mean, variance = moments(x, axes, mask)
    return normalize(x, mean, variance, gamma, beta, epsilon), mean, variance


def renorm_correction(
    mean, variance, renorm_mean, renorm_stddev, epsilon: float, clipping: Mapping
):
    """Batch-renormalization corrections ``(r, d)`` (Ioffe, 2017), gradient-free.

    ``r = std / renorm_std`` and ``d = (mean - renorm_mean) / renorm_std``, with
    ``renorm_std`` floored at ``sqrt(epsilon)`` and ``r`` clipped to
    ``[rmin, rmax]``, ``d`` to ``[-dmax, dmax]``, as Keras does.

    Example:
        >>> r, d = renorm_correction(1.0, 3.0, 0.0, 1.0, 1.0, {"rmax": 1.5})
        >>> float(r), float(d)
        (1.5, 1.0)
    """
    stddev = ops.sqrt(variance + epsilon)
    renorm_stddev = ops.maximum(renorm_stddev, ops.sqrt(epsilon))
    r = stddev / renorm_stddev
    d = (mean - renorm_mean) / renorm_stddev
    if clipping.get("rmin") is not None:
        r = ops.maximum(r, clipping["rmin"])
    if clipping.get("rmax") is not None:
        r = ops.minimum(r, clipping["rmax"])
    if clipping.get("dmax") is not None:
        d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
    return ops.stop_gradient(r), ops.stop_gradient(d)
