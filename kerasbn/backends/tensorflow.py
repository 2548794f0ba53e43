"""TensorFlow fast path: batch normalization in a handful of kernels.

:func:`kerasbn.backends.implementation` picks this module on the TensorFlow
backend when :func:`applies` accepts a call. It computes what
:mod:`kerasbn.ops` computes (the same outputs, gradients and biased batch
statistics, to float32 rounding) with one of two formulations, chosen per
call from the static shape (see :func:`formulation`):

* ``"fused"``: TensorFlow's fused kernels, ``FusedBatchNormV3`` and its
  registered gradient ``FusedBatchNormGradV3`` (oneDNN on x86 CPUs, cuDNN on
  GPUs), on a 4-D NHWC view of a channels-last input. They make the fewest
  passes over memory but cost about 0.4 ms per training step whatever the
  size, and run 3-4 times slower than the composite formulation when the
  channel count is not a multiple of 4, so they serve large channels-last
  inputs with such channel counts (``FUSED_THRESHOLDS``). The kernel's batch
  variance is Bessel-corrected; it is scaled back by ``(n - 1) / n`` to the
  biased variance that the moving average takes. Where a channel's mean is
  more than ``FAR_MEAN`` spreads from zero, the kernel runs again on the
  input shifted by its first sample, which removes the rounding of its
  float32 mean from the output and the statistics (a constant channel
  normalizes to 0 at any magnitude).
* ``"composite"``: one ``tf.custom_gradient`` of 13 large ops: forward the
  sums of ``d = x - shift`` (``shift`` the first sample, as in
  :mod:`kerasbn.ops`) and of its square, the subtraction, the square, a
  multiply and an add; backward the sums of ``dy`` and ``dy * d`` and five
  element-wise ops. Reductions run over contiguous axes first. Channels-last
  inputs with fewer than 64 channels are viewed as ``(rows / k, k * C)`` with
  ``k * C`` a multiple of 16, which halves the cost of broadcasting
  per-channel vectors for channel counts such as 10 or 20.

Inference uses the fused kernel where training would, the widened view where
training would, and :func:`kerasbn.ops.normalize` (already two ops) otherwise.
The outputs are float32, as :mod:`kerasbn.ops` returns them, also for
float16 and bfloat16 inputs; the statistics returned in training carry no
gradient (the layer feeds them only to its moving averages), while the
gradient of the output is exact.

Declined (:func:`applies` is False and :mod:`kerasbn.ops` serves the call):

* a mask;
* float64 and non-floating inputs (the fused kernels have no float64);
* channel axes that are not adjacent, e.g. ``axis=[1, 3]`` or the grouping of
  ghost batches;
* an unknown rank, an unknown channel size, or no reduction axis.

Renormalization and synchronized statistics never reach this module: the
layer computes them with :mod:`kerasbn.ops`.

Example:
    >>> import tensorflow as tf
    >>> x = tf.random.normal((8, 4, 4, 3))
    >>> applies(x, [0, 1, 2]), applies(tf.cast(x, "float64"), [0, 1, 2])
    (True, False)
    >>> y, mean, var = batch_normalize(x, [0, 1, 2], None, None, 1e-3)
    >>> y.shape, mean.shape
    (TensorShape([8, 4, 4, 3]), TensorShape([1, 1, 1, 3]))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from kerasbn import backends, ops

DTYPES = ("float16", "bfloat16", "float32")
# (channel multiple, fewest elements): the fused kernel is faster from that size
# on for channels-last inputs whose channel count is a multiple of the first
# number (measured on a 2-core AVX-512 CPU with oneDNN); for others, never.
FUSED_THRESHOLDS = ((8, 1 << 17), (4, 1 << 19))
FUSED_MIN_EPSILON = 1.001e-5  # cuDNN's smallest epsilon
FUSED_IMAGE_ROWS = 16  # rows per image of the fused kernel's 4-D view
FAR_MEAN = 100.0  # spreads from zero beyond which the fused kernel is shifted
NOMINAL_DIM = 32  # stands for an unknown dimension when sizing a tensor
VECTOR_WIDTH = 16  # float32 lanes of a 512-bit vector
WIDEN_MIN_ELEMENTS = 1 << 15  # below this, widening costs more ops than it saves

EAGER_CALLS = 8  # calls of a tool's pass function run eagerly before tracing it

_EMPTY = ()


class _View(NamedTuple):
    """The input seen as ``(outer, channels, inner)``.

    Attributes:
        start, stop: the channel axes are ``start .. stop - 1``.
        channels: the product of their sizes.
    """

    start: int
    stop: int
    channels: int


def _view(shape: tf.TensorShape, channel_axes: Sequence[int]) -> _View | None:
    """The view for adjacent channel axes of known size, else None."""
    axes = sorted(channel_axes)
    if not axes or axes != list(range(axes[0], axes[-1] + 1)):
        return None
    sizes = [shape[a] for a in axes]
    if None in sizes:
        return None
    return _View(axes[0], axes[-1] + 1, math.prod(sizes))


def _view_of_reduction(shape: tf.TensorShape, axes: Sequence[int]) -> _View | None:
    if shape.rank is None:
        return None
    channel_axes = backends.channels_of_reduction(shape.rank, axes)
    return None if channel_axes is None else _view(shape, channel_axes)


def applies(x, axes: Sequence[int], mask=None) -> bool:
    """Whether this module computes the call exactly.

    Args:
        x: the input.
        axes: the reduction axes.
        mask: the broadcastable mask, or None.

    Returns:
        True for float16, bfloat16 and float32 inputs of known rank without a
        mask whose channel axes (those not in ``axes``) are adjacent and of
        known size.

    Example:
        >>> x = tf.zeros((8, 5, 3))
        >>> applies(x, [0]), applies(x, [1]), applies(x, [0], mask=x > 0)
        (True, False, False)
    """
    if mask is not None:
        return False
    if keras.backend.standardize_dtype(x.dtype) not in DTYPES:
        return False
    return _view_of_reduction(x.shape, axes) is not None


def formulation(
    shape: Sequence[int | None],
    axes: Sequence[int],
    epsilon: float,
    device: str = "CPU",
) -> str:
    """``"fused"`` or ``"composite"``: how a training call of this shape is computed.

    Args:
        shape: the input's static shape; an unknown dimension counts as
            ``NOMINAL_DIM``.
        axes: the reduction axes; the call must be one that :func:`applies`
            accepts.
        epsilon: the layer's epsilon.
        device: the device type the call runs on (``"CPU"``, ``"GPU"``...).

    Returns:
        ``"fused"`` for channels-last inputs and an epsilon that cuDNN
        accepts: on the CPU only where they are large enough for their
        channel count (``FUSED_THRESHOLDS``, measured on a CPU), on any other
        device always (the fused kernel is what tf.keras runs on GPUs, and
        nothing else was measured there). ``"composite"`` otherwise.

    Example:
        >>> formulation((32, 56, 56, 64), [0, 1, 2], 1e-3)
        'fused'
        >>> formulation((32, 24, 24, 10), [0, 1, 2], 1e-3)
        'composite'
        >>> formulation((32, 24, 24, 10), [0, 1, 2], 1e-3, device="GPU")
        'fused'
    """
    shape = tf.TensorShape(shape)
    return _formulation(shape, _view_of_reduction(shape, axes), epsilon, device)


def _formulation(
    shape: tf.TensorShape, view: _View, epsilon: float, device: str = "CPU"
) -> str:
    fused = (
        view.stop == shape.rank
        and epsilon >= FUSED_MIN_EPSILON
        and (
            device != "CPU"
            or any(
                view.channels % multiple == 0 and _size(shape) >= smallest
                for multiple, smallest in FUSED_THRESHOLDS
            )
        )
    )
    return "fused" if fused else "composite"


def _device_type(x) -> str:
    """The type of device that ``x``'s ops run on, known when tracing.

    An eager tensor names its device. A symbolic one (``tf.function``)
    usually names none; TensorFlow then places ops on a GPU where one is
    visible, so that is the answer.
    """
    name = getattr(x, "device", "") or ""
    if name:
        return tf.DeviceSpec.from_string(name).device_type or "CPU"
    return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"


# ------------------------------------------------------------------- layouts
def _size(shape: tf.TensorShape) -> int:
    """The number of elements, an unknown dimension counting as ``NOMINAL_DIM``."""
    return math.prod(NOMINAL_DIM if d is None else d for d in shape)


def _known_rows(shape: tf.TensorShape, view: _View) -> int:
    """The product of the known dimensions before the channel axes.

    The number of rows of a channels-last input is a multiple of it whatever
    the unknown dimensions are.
    """
    return math.prod(d for d in shape[: view.start] if d is not None)


def _statistics_shape(x, view: _View) -> list[int]:
    """The keepdims shape of the statistics: size 1 on the reduced axes."""
    rank = x.shape.rank
    return [x.shape[a] if view.start <= a < view.stop else 1 for a in range(rank)]


def _widening(shape: tf.TensorShape, view: _View, device: str = "CPU") -> int:
    """The factor ``k`` that views channels-last ``(rows, C)`` as ``(rows / k, k * C)``.

    For fewer than ``4 * VECTOR_WIDTH`` channels in a tensor of at least
    ``WIDEN_MIN_ELEMENTS``, ``k * C`` becomes a multiple of ``VECTOR_WIDTH``
    (with ``k`` dividing the rows), so that element-wise ops broadcast
    per-channel vectors over whole SIMD vectors. Otherwise 1: no widening,
    and on any device but the CPU, whose vector width this is.
    """
    channels = view.channels
    if (
        device != "CPU"
        or view.stop != shape.rank
        or channels >= 4 * VECTOR_WIDTH
        or _size(shape) < WIDEN_MIN_ELEMENTS
    ):
        return 1
    rows = _known_rows(shape, view)
    k = VECTOR_WIDTH // math.gcd(channels, VECTOR_WIDTH)
    while rows % k:
        k //= 2
    return k


class _Layout:
    """How the composite formulation sees ``x`` and its per-channel vectors.

    Unwidened, ``x`` keeps its shape. Where the channel axes trail, a
    per-channel vector has the shape of the channel axes (the layer's
    weights as they are, which broadcast against ``x``) and a reduction runs
    over the leading axes without keeping them, so that neither the weights
    nor their gradients are reshaped. Otherwise a vector has the statistics'
    keepdims shape, and a reduction runs over the trailing axes first, which
    are contiguous, then over the leading ones. Widened by ``k`` (see
    :func:`_widening`), ``x`` is a ``(rows / k, k * C)`` matrix and a vector
    is ``(C,)``, repeated ``k`` times along a row.
    """

    def __init__(self, x, view: _View):
        rank = x.shape.rank
        self.channels = view.channels
        self.statistics_shape = _statistics_shape(x, view)
        self.k = _widening(x.shape, view, _device_type(x))
        self.inner_axes = tuple(range(view.stop, rank))
        self.channel_axes = range(view.start, view.stop)
        self.outer_axes = tuple(range(view.start))
        if self.k > 1:
            self.vector_shape = (view.channels,)
        elif not self.inner_axes:  # trailing channels: no keepdims
            self.vector_shape = tuple(self.statistics_shape[view.start :])
        else:
            self.vector_shape = tuple(self.statistics_shape)
        size = x.shape.num_elements()
        self.count = None if size is None else float(size // view.channels)

    def view(self, x):
        """``x`` as float32 in this layout."""
        x = tf.cast(x, tf.float32)
        if self.k == 1:
            return x
        return tf.reshape(x, [-1, self.k * self.channels])

    def restore(self, t, x):
        """``t`` (in this layout) back in ``x``'s shape."""
        if self.k == 1:
            return t
        return tf.reshape(t, _shape_of(x))

    def vector(self, value, default: float = 1.0):
        """A broadcastable per-channel ``value`` (or ``default``) as a vector."""
        if getattr(value, "shape", None) == self.vector_shape:
            return tf.cast(value, tf.float32)  # e.g. the layer's weights as they are
        value = _statistics_tensor(value, self.statistics_shape, default)
        if self.vector_shape == tuple(self.statistics_shape):
            return value
        return tf.reshape(value, self.vector_shape)

    def statistics(self, v):
        """A vector in the statistics' keepdims shape."""
        if self.vector_shape == tuple(self.statistics_shape):
            return v
        return tf.reshape(v, self.statistics_shape)

    def samples(self, xv):
        """The number of samples per channel (a scalar tensor if dynamic)."""
        if self.count is not None:
            return self.count
        return tf.cast(tf.size(xv) // self.channels, tf.float32)

    def spread(self, v):
        """A vector, broadcastable against ``x`` in this layout."""
        return v if self.k == 1 else tf.tile(v, [self.k])

    def sum(self, t):
        """``t`` summed to a vector."""
        return self._reduce(tf.reduce_sum, t)

    def first(self, xv):
        """The first sample of each channel as a vector (0 for an empty batch).

        The shift of the statistics, as in
        :func:`kerasbn.ops.sufficient_moments`: the sum over a one-sample
        slice, which has the vector's static shape also where a dimension is
        unknown, and gives 0 rather than an error where the batch is empty.
        """
        if self.k > 1:
            return tf.reduce_sum(xv[:1, : self.channels], axis=0)
        reduced = self.outer_axes + self.inner_axes
        index = tuple(
            slice(0, 1) if a in reduced else slice(None)
            for a in range(len(self.statistics_shape))
        )
        keepdims = bool(self.inner_axes)
        return tf.reduce_sum(xv[index], axis=reduced, keepdims=keepdims)

    def sum_of_squares(self, t):
        """The squares of ``t`` summed to a vector.

        (``tf.math.reduce_euclidean_norm`` would save an op but has no XLA
        kernel, and Keras compiles train steps with XLA on GPUs.)
        """
        return self.sum(tf.square(t))

    def _reduce(self, reduction, t):
        if self.k > 1:
            t = reduction(t, axis=0)
            return reduction(tf.reshape(t, [self.k, self.channels]), axis=0)
        if not self.inner_axes:
            return reduction(t, axis=self.outer_axes)
        for axes in (self.inner_axes, self.outer_axes):
            if axes:
                t = reduction(t, axis=axes, keepdims=True)
        return t


def _shape_of(x):
    """``x``'s shape: a list if static, else a tensor."""
    return x.shape.as_list() if x.shape.is_fully_defined() else tf.shape(x)


def _statistics_tensor(value, shape: list[int], default: float):
    """A broadcastable ``value`` (or ``default``) as float32 of the statistics' shape."""
    value = tf.cast(default if value is None else value, tf.float32)
    if value.shape != shape:
        value = tf.broadcast_to(value, shape)
    return value


def _channel_vector(value, view: _View, x, default: float):
    """A broadcastable ``value`` (or ``default``) as a float32 ``(C,)`` vector."""
    value = _statistics_tensor(value, _statistics_shape(x, view), default)
    return tf.reshape(value, [view.channels])


def _fused_view(x, view: _View):
    """Channels-last ``x`` as the NHWC tensor ``(rows / r, r, 1, C)``, ``r <= 16``.

    oneDNN spreads many short images over the cores better than the input's
    own 4-D shape or one long image: 8% faster at (32, 28, 28, 256).
    """
    rows = math.gcd(_known_rows(x.shape, view), FUSED_IMAGE_ROWS)
    return tf.reshape(x, [-1, rows, 1, view.channels])


# ------------------------------------------------------------------- training
def _composite_batch_normalize(x, view: _View, gamma, beta, epsilon: float):
    """BN of ``x`` with its own statistics as one ``tf.custom_gradient``.

    Forward: the sums of ``d = x - shift`` and of its square, the
    subtraction, the square, a multiply and an add. Backward: the sums of
    ``dy`` and ``dy * d`` and five element-wise ops. The shift is the first
    sample of each channel, as in :func:`kerasbn.ops.sufficient_moments`, so
    the statistics stay exact where the mean is large compared with the
    spread and a constant channel normalizes to exactly 0 at any magnitude
    (a float32 sum of ``x`` itself, the mean's first guess before, was off
    by 113 at a constant 1e6 + 0.5 over 100,352 values). Returns ``(y, mean,
    variance)`` in the layout.
    """
    layout = _Layout(x, view)

    @tf.custom_gradient
    def batch_norm(xv, gamma, beta):
        count = layout.samples(xv)
        shift = tf.stop_gradient(layout.first(xv))
        centred = xv - layout.spread(shift)  # exact where x is close to it
        offset = layout.sum(centred) / count
        variance = layout.sum_of_squares(centred) / count - tf.square(offset)
        variance = tf.maximum(variance, 0.0)
        inv = tf.math.rsqrt(variance + epsilon)
        scale = gamma * inv
        # y = (centred - offset) * scale + beta
        y = centred * layout.spread(scale) + layout.spread(beta - offset * scale)

        def grad(dy, *_):
            # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat))
            dbeta = layout.sum(dy)
            projection = layout.sum(dy * centred) - offset * dbeta
            dgamma = projection * inv
            per_sample = scale / count
            slope = per_sample * inv * dgamma  # scale * inv**2 * projection / n
            constant = per_sample * dbeta - offset * slope
            dx = dy * layout.spread(scale) - (
                centred * layout.spread(slope) + layout.spread(constant)
            )
            return dx, dgamma, dbeta

        return (y, shift + offset, variance), grad

    y, mean, variance = batch_norm(
        layout.view(x), layout.vector(gamma, 1.0), layout.vector(beta, 0.0)
    )
    return layout.restore(y, x), layout.statistics(mean), layout.statistics(variance)


def _fused_batch_normalize(x, view: _View, gamma, beta, epsilon: float):
    """BN with the fused kernel; returns ``(y, mean, variance)``.

    The kernel's batch variance is unbiased; it is scaled back to the biased
    one. The kernel keeps its mean in float32, so where a channel's mean is
    far from zero next to its spread the mean's rounding, amplified by
    ``1 / sqrt(variance + epsilon)``, spoils the output (a constant channel
    of 1e6 + 0.5 came out as 0.010 rather than 0) and the variance (a
    relative error near ``(eps * mean)**2 / variance``, 2e-4 for a mean of
    1e4 and a spread of 1e-2). Where some channel's mean exceeds
    ``FAR_MEAN`` spreads, a ``tf.cond`` (decided in the graph, one branch
    runs) runs the kernel again on the input shifted by its first sample, as
    :mod:`kerasbn.ops` shifts it; elsewhere (almost always) that costs one
    comparison of two ``(C,)`` vectors.
    """
    x4 = _fused_view(x, view)

    def fused(t, scale, offset):
        return tf.raw_ops.FusedBatchNormV3(
            x=t,
            scale=scale,
            offset=offset,
            mean=tf.constant(_EMPTY, tf.float32),
            variance=tf.constant(_EMPTY, tf.float32),
            epsilon=epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=True,
        )

    # The tf.cond runs in the forward pass only: the gradient is the fused
    # gradient kernel of whichever input the kernel saw (BN's gradient does
    # not change with a constant shift), so nothing of the branch not taken
    # is kept for the backward pass.
    @tf.custom_gradient
    def batch_norm(x4, scale, offset):
        y, mean, variance, *reserve = fused(x4, scale, offset)
        far = tf.reduce_any(tf.square(mean) > FAR_MEAN**2 * variance)

        def shifted():
            shift = tf.cast(x4[:1, :1, :1], tf.float32)
            # Exact in the input's dtype where x is close to its first sample.
            t = tf.cast(tf.cast(x4, tf.float32) - shift, x4.dtype)
            y, mean, variance, *reserve = fused(t, scale, offset)
            mean = mean + tf.reshape(shift, [view.channels])
            return (t, tf.cast(y, tf.float32), mean, variance, *reserve)

        t, y, mean, variance, *reserve = tf.cond(
            far,
            shifted,
            lambda: (x4, tf.cast(y, tf.float32), mean, variance, *reserve),
        )

        def grad(dy, *_):
            dx, dscale, doffset, *_ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=tf.cast(dy, x4.dtype),
                x=t,
                scale=scale,
                reserve_space_1=reserve[0],
                reserve_space_2=reserve[1],
                reserve_space_3=reserve[2],
                epsilon=epsilon,
                data_format="NHWC",
                is_training=True,
            )
            return dx, dscale, doffset

        return (y, mean, variance), grad

    y, mean, variance = batch_norm(
        x4, _channel_vector(gamma, view, x, 1.0), _channel_vector(beta, view, x, 0.0)
    )
    variance = variance * _bessel_inverse(x, view.channels)
    shape = _statistics_shape(x, view)
    return (
        tf.reshape(y, _shape_of(x)),
        tf.reshape(mean, shape),
        tf.reshape(variance, shape),
    )


def _bessel_inverse(x, channels: int):
    """``(n - 1) / n`` for ``n`` samples per channel: unbiased to biased variance."""
    size = x.shape.num_elements()
    if size is not None:
        n = size // channels
        return (n - 1) / n if n > 1 else 0.0
    n = tf.cast(tf.size(x) // channels, tf.float32)
    return tf.maximum(n - 1.0, 0.0) / n


def batch_normalize(x, axes: Sequence[int], gamma, beta, epsilon: float, mask=None):
    """Training-mode batch normalization, as :func:`kerasbn.ops.batch_normalize`.

    Args:
        x: input tensor; :func:`applies` must accept the call.
        axes: the reduction axes.
        gamma, beta: scale and offset broadcastable to ``x``, or None.
        epsilon: added to the variance.
        mask: must be None.

    Returns:
        ``(y, mean, variance)``: the output in float32, and the batch mean and
        biased variance in float32 with the reduced axes kept (no gradient).

    Raises:
        ValueError: if :func:`applies` declines the call.

    Example:
        >>> x = tf.constant([[0.0], [2.0]])
        >>> y, mean, var = batch_normalize(x, [0], None, None, 0.0)
        >>> [round(float(v), 6) for v in (y[0, 0], y[1, 0], mean[0, 0], var[0, 0])]
        [-1.0, 1.0, 1.0, 1.0]
    """
    if not applies(x, axes, mask):
        raise ValueError(
            f"The TensorFlow fast path does not apply to this call (dtype "
            f"{x.dtype}, shape {x.shape}, axes {list(axes)}, mask "
            f"{'given' if mask is not None else 'None'}); use kerasbn.ops."
        )
    view = _view_of_reduction(x.shape, axes)
    if _formulation(x.shape, view, epsilon, _device_type(x)) == "fused":
        y, mean, variance = _fused_batch_normalize(x, view, gamma, beta, epsilon)
    else:
        y, mean, variance = _composite_batch_normalize(x, view, gamma, beta, epsilon)
    return tf.cast(y, tf.float32), mean, variance


# ------------------------------------------------------------------ inference
def normalize(x, mean, variance, gamma, beta, epsilon: float):
    """Inference-mode normalization, as :func:`kerasbn.ops.normalize`.

    Large channels-last inputs use the fused kernel; channel counts below
    ``4 * VECTOR_WIDTH`` are widened (see :func:`formulation`); everything
    else is :func:`kerasbn.ops.normalize` itself, which is already two ops.

    Args:
        x: input tensor.
        mean, variance: per-channel statistics broadcastable to ``x``: the
            layer's weights as they are where the channels trail, else with
            ``x``'s rank and size 1 on the reduced axes.
        gamma, beta: scale and offset broadcastable to ``x``, or None.
        epsilon: added to the variance.

    Returns:
        ``gamma * (x - mean) / sqrt(variance + epsilon) + beta`` in float32.

    Example:
        >>> x = tf.constant([[0.0], [2.0]])
        >>> normalize(x, tf.ones((1, 1)), tf.ones((1, 1)), None, None, 0.0)
        <tf.Tensor: shape=(2, 1), dtype=float32, numpy=
        array([[-1.],
               [ 1.]], dtype=float32)>
    """
    view = _inference_view(x, mean)
    device = _device_type(x)
    if view is not None and _formulation(x.shape, view, epsilon, device) == "fused":
        y, *_ = tf.raw_ops.FusedBatchNormV3(
            x=_fused_view(x, view),
            scale=_channel_vector(gamma, view, x, 1.0),
            offset=_channel_vector(beta, view, x, 0.0),
            mean=_channel_vector(mean, view, x, 0.0),
            variance=_channel_vector(variance, view, x, 1.0),
            epsilon=epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=False,
        )
        return tf.cast(tf.reshape(y, _shape_of(x)), tf.float32)
    layout = None if view is None else _Layout(x, view)
    if layout is None or layout.k == 1:
        return ops.normalize(x, mean, variance, gamma, beta, epsilon)
    statistics = [
        None if v is None else layout.vector(v) for v in (mean, variance, gamma, beta)
    ]
    scale, offset = ops.affine_from_statistics(*statistics, epsilon)
    y = layout.view(x) * layout.spread(scale) + layout.spread(offset)
    return layout.restore(y, x)


def _inference_view(x, mean) -> _View | None:
    """The view whose channel axes are those along which ``mean`` varies.

    None where :func:`applies` would decline: another dtype, an input of
    unknown rank, or statistics of higher rank than ``x``.
    """
    rank = x.shape.rank
    if keras.backend.standardize_dtype(x.dtype) not in DTYPES or rank is None:
        return None
    channel_axes = backends.channels_of_statistic(getattr(mean, "shape", ()), rank)
    return None if channel_axes is None else _view(x.shape, channel_axes)


# ------------------------------------------------------ non-finite guard
def all_finite(first, *others):
    """A scalar boolean: every element of every tensor is finite.

    What :func:`kerasbn.ops.all_finite` computes, in one op fewer on
    TensorFlow: ``first + t * 0`` is finite exactly where all are (adding 0
    cannot overflow), and ``IsFinite`` and ``All`` test it.

    Example:
        >>> bool(all_finite(tf.ones(2), tf.constant([0.0, float("inf")])))
        False
    """
    probe = first
    for t in others:
        probe = probe + t * 0.0
    return tf.reduce_all(tf.math.is_finite(probe))


# ------------------------------------------------ synchronized statistics
def global_moments(local: ops.Moments) -> ops.Moments:
    """Merges the local moments of every tf.distribute replica in sync.

    Each replica computes its shifted sufficient moments locally. One
    ``all_gather`` (a single ``CollectiveGatherV2`` under the mirrored
    strategies) brings every replica's moments to every replica, and
    :func:`kerasbn.ops.combine_moments` merges them exactly (Chan et al.),
    weighted by the counts, so uneven or empty replicas give the statistics of
    the global batch. Every replica merges the same gathered tensor with the
    same ops, so all get bit-identical statistics; gradients flow through
    ``all_gather`` to every replica's inputs.

    Args:
        local: this replica's :class:`kerasbn.ops.Moments`; all fields have the
            same shape on every replica.

    Returns:
        The moments of the global batch (the local ones where there is no
        cross-replica context to merge over).

    Example:
        >>> m = ops.sufficient_moments(tf.ones((2, 3)), [0])
        >>> global_moments(m).count.shape  # no strategy: the local moments
        TensorShape([1, 3])
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return local
    packed = tf.stack(list(local))[tf.newaxis]
    gathered = context.all_gather(packed, axis=0)
    # MirroredStrategy's all_gather returns a fully unknown shape, which
    # tf.unstack cannot split; only the number of replicas is really unknown.
    gathered = tf.ensure_shape(gathered, [None, *packed.shape[1:]])
    return ops.combine_moments(ops.Moments(*tf.unstack(gathered, axis=1)))


def assert_divisible(x, group_size: int, message: str):
    """``x``, after an in-graph check that its batch size divides by ``group_size``."""
    check = tf.debugging.assert_equal(tf.shape(x)[0] % group_size, 0, message=message)
    with tf.control_dependencies([check]):
        return tf.identity(x)


# ------------------------------------------------ host-side worker gather
def gather_workers(array: np.ndarray, variable=None) -> np.ndarray:
    """Every worker's float64 ``array``, stacked in worker order, bit for bit.

    The strategy is the one in scope, else the one that holds ``variable``
    (a Keras variable of the model). Under a strategy whose replicas span
    several workers (``MultiWorkerMirroredStrategy``), one
    ``strategy.gather`` brings each worker's array to every worker (every
    local replica contributes the same copy; one per worker is kept). Under
    a strategy of one worker (``MirroredStrategy`` over local devices), or
    none, this process holds everything: ``array[None]``.

    Every worker must call it, with arrays of the same shape.

    Args:
        array: this worker's array.
        variable: a Keras variable of the model, or None.

    Returns:
        ``(workers, *array.shape)`` float64.

    Example:
        >>> gather_workers(np.arange(3.0)).shape  # no strategy: this worker only
        (1, 3)
    """
    array = np.asarray(array, np.float64)
    strategy = _strategy(variable)
    local = len(strategy.extended.worker_devices) if strategy is not None else 1
    if strategy is None or strategy.num_replicas_in_sync <= local:
        return array[np.newaxis]
    value = tf.constant(array[np.newaxis])
    per_replica = strategy.experimental_distribute_values_from_function(lambda _: value)
    gathered = strategy.gather(per_replica, axis=0).numpy()
    return gathered[::local]


def _strategy(variable):
    """The ``tf.distribute`` strategy in scope, else the one holding ``variable``."""
    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy()
    held = getattr(variable, "value", None)
    return getattr(held, "distribute_strategy", None)


def replicas_in_sync() -> int:
    """The replicas of the ``tf.distribute`` strategy in scope (1 outside any).

    Keras divides a loss computed in a strategy's scope by this number (each
    replica's share of the global batch's mean); the tools' statistics pass
    multiplies it back.

    Example:
        >>> replicas_in_sync()
        1
    """
    return tf.distribute.get_strategy().num_replicas_in_sync


def jit(function):
    """``function`` for the tools' passes: eager for its first
    ``EAGER_CALLS`` calls, then a ``tf.function`` with relaxed shapes (one
    trace serves every batch size).

    Tracing a model costs about as much as 7 to 10 eager calls of it (the
    lecture CNN: 0.31 s against 37 ms eager and 6.5 ms traced; MobileNetV3Small:
    1.6 s against 233 ms and 20 ms, batches of 32 on a 2-core CPU), so a pass
    of a few batches runs eagerly and a long one pays the trace once.

    Example:
        >>> increment = jit(lambda x: x + 1)
        >>> [int(increment(tf.constant(i))) for i in range(10)][-1]
        10
    """
    compiled = tf.function(function, reduce_retracing=True)
    calls = itertools.count()

    def call(*args):
        return (function if next(calls) < EAGER_CALLS else compiled)(*args)

    return call
