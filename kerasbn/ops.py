"""Pure, stateless batch-normalization math on ``keras.ops``.

Every function here works on any Keras backend and is the reference that the
backend fast paths in :mod:`kerasbn.backends` must reproduce.

Statistics are kept as *shifted sufficient moments* ``(count, shift, offset,
m2)``: the mean is ``shift + offset`` and the biased variance ``m2 / count``.
The shift is one sample of the data itself, so ``x - shift`` is small and exact
even when the mean is large compared with the spread (mean 1e4, std 1e-2 in
float32). Groups of such moments merge exactly with Chan et al.'s pairwise
formula (:func:`combine_moments`); ``E[x**2] - E[x]**2`` is never formed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import keras
from keras import ops

from kerasbn import _checks


class Moments(NamedTuple):
    """Shifted sufficient moments of one or more groups of samples.

    Attributes:
        count: number of samples (float).
        shift: a value close to the mean (one of the samples).
        offset: mean of ``x - shift``; the mean is ``shift + offset``.
        m2: sum of squared deviations from the mean.
    """

    count: object
    shift: object
    offset: object
    m2: object

    @property
    def mean(self):
        return self.shift + self.offset

    @property
    def variance(self):
        return divide_no_nan(self.m2, self.count)


def divide_no_nan(x, y):
    """``x / y``, and 0 where ``y`` is 0, in the inputs' dtype.

    ``keras.ops.divide_no_nan`` returns float32 for float64 inputs on PyTorch,
    which would cost float64 statistics their precision.

    Example:
        >>> float(divide_no_nan(keras.ops.array(1.0), keras.ops.array(0.0)))
        0.0
    """
    zero = ops.equal(y, 0)
    quotient = x / ops.where(zero, ops.ones_like(y), y)
    return ops.where(zero, ops.zeros_like(quotient), quotient)


def statistics_dtype(dtype) -> str:
    """The dtype that statistics use for inputs of ``dtype``: float32 at least."""
    dtype = keras.backend.standardize_dtype(dtype)
    return "float64" if dtype == "float64" else "float32"


def _first_sample(x, axes: Sequence[int]):
    """The first element along ``axes`` (keepdims), or 0 where the batch is empty."""
    index = tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim))
    return ops.sum(x[index], axis=tuple(axes), keepdims=True)


def _sample_count(x, axes: Sequence[int]):
    """The number of elements along ``axes``, as a scalar of ``x``'s dtype."""
    shape = ops.shape(x)
    count = 1
    for a in axes:
        count = count * shape[a]
    return ops.cast(count, x.dtype)


def sample_count(x, axes: Sequence[int], mask=None):
    """The number of values per channel over ``axes``: the ``n`` of a variance.

    Without a mask it is a Python float where ``x``'s reduced sizes are static,
    else a float32 scalar tensor from the dynamic shape; with a mask, the count
    of True positions per channel (float32, reduced axes kept).

    Example:
        >>> sample_count(keras.ops.ones((4, 3, 2)), [0, 1])
        12.0
    """
    if mask is None:
        sizes = [x.shape[a] for a in axes]
        if all(s is not None for s in sizes):
            return float(math.prod(sizes))
        shape = ops.shape(x)
        return ops.cast(math.prod(shape[a] for a in axes), "float32")
    mask = ops.broadcast_to(ops.cast(mask, "float32"), ops.shape(x))
    return ops.sum(mask, axis=tuple(axes), keepdims=True)


def unbiased_variance(variance, count):
    """``variance * n / (n - 1)`` (Bessel's correction) for ``n = count``.

    A group of at most one value has no unbiased variance; it gets 0, the
    biased variance of one value, rather than a NaN.

    Args:
        variance: the biased variance.
        count: ``n``, a Python number or a tensor that broadcasts to it.

    Returns:
        The unbiased variance, in ``variance``'s dtype.

    Example:
        >>> float(unbiased_variance(keras.ops.array(3.0), 4.0))  # n = 4: times 4 / 3
        4.0
    """
    if isinstance(count, (int, float)):
        return variance * (count / (count - 1.0) if count > 1 else 0.0)
    count = ops.cast(count, variance.dtype)
    return variance * divide_no_nan(count, ops.maximum(count - 1.0, 0.0))


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
    shift = ops.stop_gradient(_first_sample(x, axes))
    centred = x - shift
    if mask is None:
        count = ops.zeros_like(shift) + _sample_count(x, axes)
        offset = divide_no_nan(ops.sum(centred, axis=axes, keepdims=True), count)
        m2 = ops.sum(ops.square(centred - offset), axis=axes, keepdims=True)
    else:
        centred = ops.where(mask, centred, ops.zeros_like(centred))
        count = ops.sum(ops.cast(mask, x.dtype), axis=axes, keepdims=True)
        offset = divide_no_nan(ops.sum(centred, axis=axes, keepdims=True), count)
        deviation = ops.where(mask, centred - offset, ops.zeros_like(centred))
        m2 = ops.sum(ops.square(deviation), axis=axes, keepdims=True)
    return Moments(count, shift, offset, m2)


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


def combine_moments(groups: Moments, axis: int = 0) -> Moments:
    """Merges groups of moments stacked along ``axis`` into one (Chan et al.).

    All groups are re-expressed around the shift of the largest group, which
    keeps the merge exact when the mean is large compared with the spread.
    Groups with count 0 contribute nothing.

    Args:
        groups: a :class:`Moments` whose fields are stacked along ``axis``.
        axis: the axis that indexes the groups.

    Returns:
        The merged :class:`Moments`, with ``axis`` removed.

    Example:
        >>> a = sufficient_moments(keras.ops.array([[1.0], [2.0]]), [0])
        >>> b = sufficient_moments(keras.ops.array([[6.0]]), [0])
        >>> stacked = Moments(*[keras.ops.stack(f) for f in zip(a, b)])
        >>> float(combine_moments(stacked).variance[0, 0])  # var of 1, 2, 6
        4.666666507720947
    """
    count, shift, offset, m2 = groups
    largest = ops.expand_dims(ops.argmax(count, axis=axis), axis)
    common_shift = ops.take_along_axis(shift, largest, axis=axis)
    group_offset = (shift - common_shift) + offset
    total = ops.sum(count, axis=axis)
    mean_offset = divide_no_nan(ops.sum(count * group_offset, axis=axis), total)
    between = count * ops.square(group_offset - ops.expand_dims(mean_offset, axis))
    merged_m2 = ops.sum(m2, axis=axis) + ops.sum(between, axis=axis)
    return Moments(total, ops.squeeze(common_shift, axis), mean_offset, merged_m2)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Merges two sets of moments of the same shape (see :func:`combine_moments`)."""
    return combine_moments(Moments(*[ops.stack(pair) for pair in zip(a, b)]))


def normalize(x, mean, variance, gamma, beta, epsilon: float):
    """``gamma * (x - mean) / sqrt(variance + epsilon) + beta``.

    Computed as ``x * scale + shift`` with the per-channel ``scale`` and
    ``shift`` formed first, in the statistics' dtype, exactly as
    ``tf.nn.batch_normalization`` does.

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


def affine_from_statistics(mean, variance, gamma, beta, epsilon: float):
    """The per-channel ``(scale, offset)`` such that BN(x) = ``x * scale + offset``.

    Args:
        mean, variance: the statistics.
        gamma, beta: scale and offset, or None.
        epsilon: added to the variance.

    Returns:
        ``(scale, offset)`` in the statistics' dtype.

    Example:
        >>> s, o = affine_from_statistics(1.0, 4.0, 2.0, 0.5, 0.0)
        >>> float(s), float(o)
        (1.0, -0.5)
    """
    scale = ops.rsqrt(variance + epsilon)
    if gamma is not None:
        scale = scale * gamma
    offset = -mean * scale if beta is None else beta - mean * scale
    return scale, offset


def ema_update(moving, value, momentum: float):
    """The Keras moving average: ``moving * momentum + value * (1 - momentum)``.

    Example:
        >>> float(ema_update(1.0, 0.0, 0.99))
        0.99
    """
    return moving * momentum + value * (1.0 - momentum)


def all_finite(first, *others):
    """A scalar boolean: every element of every tensor is finite.

    ``t * 0`` is 0 where ``t`` is finite and NaN where it is ±inf or NaN, so
    ``first + sum(others * 0)`` is finite exactly where all are (adding 0
    cannot overflow), and the sum of that times 0 is 0 exactly when every
    element is. One reduction in all: an eager backend dispatches one Keras
    op, and XLA compiles fewer kernels than for a chain of ``all(isfinite)``.

    Args:
        first, *others: tensors that broadcast together.

    Example:
        >>> bool(all_finite(keras.ops.ones(2), keras.ops.array([0.0, float("inf")])))
        False
    """
    probe = first
    for t in others:
        probe = probe + t * 0.0
    return ops.sum(probe * 0.0) == 0.0


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
