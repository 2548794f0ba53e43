"""The TensorFlow kernels: TensorFlow's fused kernel or one custom gradient, and
``tf.distribute`` statistics.

A call is computed one of three ways, chosen from static facts
(:func:`formulation`):

* ``"fused"``: TensorFlow's fused kernels, ``FusedBatchNormV3`` and its
  registered gradient ``FusedBatchNormGradV3`` (oneDNN on x86 CPUs, cuDNN on
  GPUs), on a 4-D NHWC view of a channels-last input. They make the fewest
  passes over memory, but on the CPU they carry a fixed cost per step and run
  their scalar path for channel counts that are not a multiple of 4, so there
  they serve only large channels-last inputs of such channel counts
  (``FUSED_THRESHOLDS``, measured on a CPU); on other devices they always
  serve (what tf.keras runs there). The kernel keeps the Bessel-corrected
  batch variance, scaled back to the biased one
  (:func:`~kerasbn.formulas.biased_variance`), and a float32 mean, whose
  rounding ``1 / sqrt(variance + epsilon)`` amplifies: where a channel's mean
  lies more than ``FUSED_MAX_MEAN_SPREADS`` standard deviations from zero
  (:func:`~kerasbn.formulas.far_from_zero`), a ``tf.cond`` runs the kernel
  again on the input shifted by its first sample, so a constant channel
  normalizes to 0 at any magnitude.
* ``"composite"``: one ``tf.custom_gradient`` of few large ops. Forward: the
  sums of ``d = x - shift`` and ``d * d`` (the shift is the first sample,
  :func:`~kerasbn.formulas.shifted_statistics`), then ``y = d * scale +
  bias``; backward: the sums of ``dy`` and ``dy * d`` and one element-wise
  pass (:func:`~kerasbn.formulas.backward_coefficients`). Reductions run over
  contiguous axes first.
* ``"widened"``: the composite formulation on the channels-last input viewed
  as ``(rows / k, k * C)``, with ``k * C`` a multiple of the CPU's vector
  width (``VECTOR_WIDTH``), for large inputs with fewer than
  ``4 * VECTOR_WIDTH`` channels: broadcasting a per-channel vector then fills
  whole SIMD vectors.

Inference takes the fused kernel and the widened view where training would,
and :func:`kerasbn.formulas.normalize` (``"affine"``, already two ops)
otherwise. Outputs are float32, also for float16 and bfloat16 inputs.

Declined (the generic formulas serve the call): a mask, float64 (the fused
kernels have none) and non-floating inputs, channel axes that are not
adjacent (``axis=[1, 3]``, ghost batches), an unknown rank or channel size,
no reduction axis. Renormalization and synchronized statistics never reach
the kernels: the layer computes them with :mod:`kerasbn.formulas`, and
:func:`global_moments` merges them over ``tf.distribute``.

Example:
    >>> x = tf.random.normal((8, 4, 4, 3))
    >>> plan = formulation(x.shape, [0, 1, 2])
    >>> plan.formulation, formulation(x.shape, [0, 1, 2], dtype="float64")
    ('composite', None)
    >>> y, mean, var = batch_normalize(x, plan, None, None, 1e-3)
    >>> y.shape, mean.shape
    (TensorShape([8, 4, 4, 3]), TensorShape([1, 1, 1, 3]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

from kerasbn import formulas
from kerasbn.backends.plan import CPU, Plan, channel_vector

__all__ = [
    "DTYPES",
    "FUSED_IMAGE_ROWS",
    "FUSED_MAX_MEAN_SPREADS",
    "FUSED_MIN_EPSILON",
    "FUSED_THRESHOLDS",
    "VECTOR_WIDTH",
    "WIDEN_MIN_ELEMENTS",
    "all_finite",
    "assert_divisible",
    "batch_normalize",
    "default_device",
    "device",
    "formulation",
    "global_moments",
    "normalize",
]

DTYPES = ("float16", "bfloat16", "float32")
FUSED_THRESHOLDS = ((8, 1 << 17), (4, 1 << 19))
"""On the CPU, ``(channel multiple, fewest elements)``: the fused kernel serves
channels-last inputs whose channel count is a multiple of the first number
from that size on (measured with oneDNN on an AVX-512 CPU); others, never."""
FUSED_MIN_EPSILON = 1.001e-5
"""cuDNN's smallest epsilon."""
FUSED_IMAGE_ROWS = 16
"""Rows per image of the fused kernel's 4-D view: oneDNN spreads many short
images over the cores better than the input's own 4-D shape or one image."""
FUSED_MAX_MEAN_SPREADS = 100.0
"""The fused kernel sees the input as it is while every channel's mean lies
within this many standard deviations of zero; beyond, its float32 mean's
rounding shows in the output, and the kernel runs on the shifted input."""
VECTOR_WIDTH = 16
"""float32 lanes of a 512-bit vector."""
WIDEN_MIN_ELEMENTS = 1 << 15
"""Below this many elements widening costs more ops than it saves."""

_EMPTY = ()
_XP = formulas.Namespace(tf, rsqrt=tf.math.rsqrt)


def device(x) -> str | None:
    """The type of device ``x``'s ops run on, known when tracing, or None for
    what is not a TensorFlow tensor.

    An eager tensor names its device. A symbolic one (``tf.function``)
    usually names none; TensorFlow then places ops on a GPU where one is
    visible, so that is the answer.
    """
    if not tf.is_tensor(x):
        return None
    name = getattr(x, "device", "") or ""
    if name:
        return (tf.DeviceSpec.from_string(name).device_type or "CPU").lower()
    return default_device()


def default_device() -> str:
    """``"gpu"`` where TensorFlow sees a GPU, else ``"cpu"``."""
    return "gpu" if tf.config.list_logical_devices("GPU") else CPU


def formulation(
    shape: Sequence,
    axes: Sequence[int],
    *,
    dtype: str = "float32",
    epsilon: float = 1e-3,
    training: bool = True,
    device: str = CPU,
) -> Plan | None:
    """How a call is computed: ``"fused"``, ``"widened"``, or ``"composite"``
    in training and ``"affine"`` in inference (see the module docstring).

    Args:
        shape: the input's static shape; an unknown dimension counts as
            :data:`~kerasbn.backends.plan.NOMINAL_DIM` where a size matters.
        axes: the reduction axes.
        dtype: the input's dtype.
        epsilon: the layer's epsilon (cuDNN's fused kernel has a smallest).
        training: whether the call uses batch statistics.
        device: the device type (``"cpu"``, ``"gpu"``...).

    Returns:
        The plan, or None for a call that the fast path declines.

    Example:
        >>> formulation((32, 56, 56, 64), [0, 1, 2]).formulation
        'fused'
        >>> formulation((32, 24, 24, 10), [0, 1, 2]).formulation
        'widened'
        >>> formulation((32, 24, 24, 10), [0, 1, 2], device="gpu").formulation
        'fused'
        >>> formulation((32, 64, 56, 56), [0, 2, 3], training=False).formulation
        'affine'
    """
    plan = Plan.of(shape, axes, device=device, training=training)
    if plan is None or dtype not in DTYPES:
        return None
    if _fused(plan, epsilon):
        return plan.using("fused")
    if _widens(plan):
        return plan.using("widened")
    return plan.using("composite" if training else "affine")


def _fused(plan: Plan, epsilon: float) -> bool:
    if not plan.channels_last or epsilon < FUSED_MIN_EPSILON:
        return False
    return plan.device != CPU or any(
        plan.channels % multiple == 0 and plan.nominal_size >= smallest
        for multiple, smallest in FUSED_THRESHOLDS
    )


def _widens(plan: Plan) -> bool:
    return (
        plan.device == CPU
        and plan.nominal_size >= WIDEN_MIN_ELEMENTS
        and _widening(plan) > 1
    )


def _widening(plan: Plan) -> int:
    """``k`` for the ``(rows / k, k * C)`` view of a channels-last input: the
    smallest that makes ``k * C`` a multiple of ``VECTOR_WIDTH``, halved until
    it divides the rows; 1 for other inputs and ``4 * VECTOR_WIDTH`` channels
    or more."""
    channels = plan.channels
    if not plan.channels_last or channels >= 4 * VECTOR_WIDTH:
        return 1
    k = VECTOR_WIDTH // math.gcd(channels, VECTOR_WIDTH)
    while plan.known_outer % k:
        k //= 2
    return k


# ------------------------------------------------------------------- layouts
def _shape_of(x):
    """``x``'s shape: a list if static, else a tensor."""
    return x.shape.as_list() if x.shape.is_fully_defined() else tf.shape(x)


class _Layout:
    """How the composite formulation sees ``x`` and its per-channel vectors.

    Unwidened, ``x`` keeps its shape. Where the channel axes trail, a
    per-channel vector has the shape of the channel axes (the layer's
    weights as they are, which broadcast against ``x``) and a reduction runs
    over the leading axes without keeping them, so that neither the weights
    nor their gradients are reshaped. Otherwise a vector has the statistics'
    keepdims shape, and a reduction runs over the trailing axes first, which
    are contiguous, then over the leading ones. Widened by ``k``, ``x`` is a
    ``(rows / k, k * C)`` matrix and a vector is ``(C,)``, repeated ``k``
    times along a row.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.k = _widening(plan) if plan.formulation == "widened" else 1
        self.inner_axes = tuple(range(plan.stop, plan.rank))
        self.outer_axes = tuple(range(plan.start))
        if self.k > 1:
            self.vector_shape = (plan.channels,)
        elif not self.inner_axes:  # trailing channels: no keepdims
            self.vector_shape = plan.keepdims_shape[plan.start :]
        else:
            self.vector_shape = plan.keepdims_shape

    def view(self, x):
        """``x`` as float32 in this layout."""
        x = tf.cast(x, tf.float32)
        if self.k == 1:
            return x
        return tf.reshape(x, [-1, self.k * self.plan.channels])

    def restore(self, t, x):
        """``t`` (in this layout) back in ``x``'s shape."""
        return t if self.k == 1 else tf.reshape(t, _shape_of(x))

    def vector(self, value, default: float):
        """A broadcastable per-channel ``value`` (or ``default``) as a vector."""
        return _vector(value, self.plan, self.vector_shape, default)

    def statistics(self, v):
        """A vector in the statistics' keepdims shape."""
        if self.vector_shape == self.plan.keepdims_shape:
            return v
        return tf.reshape(v, self.plan.keepdims_shape)

    def samples(self, xv):
        """The number of samples per channel (a scalar tensor if dynamic)."""
        if self.plan.count is not None:
            return float(self.plan.count)
        return tf.cast(tf.size(xv) // self.plan.channels, tf.float32)

    def spread(self, v):
        """A vector, broadcastable against ``x`` in this layout."""
        return v if self.k == 1 else tf.tile(v, [self.k])

    def sum(self, t):
        """``t`` summed to a vector."""
        if self.k > 1:
            t = tf.reduce_sum(t, axis=0)
            return tf.reduce_sum(tf.reshape(t, [self.k, self.plan.channels]), axis=0)
        if not self.inner_axes:
            return tf.reduce_sum(t, axis=self.outer_axes)
        for axes in (self.inner_axes, self.outer_axes):
            if axes:
                t = tf.reduce_sum(t, axis=axes, keepdims=True)
        return t

    def first(self, xv):
        """The first sample of each channel as a vector (0 for an empty batch):
        the sum over a one-sample slice, which has the vector's static shape
        also where a dimension is unknown."""
        if self.k > 1:
            return tf.reduce_sum(xv[:1, : self.plan.channels], axis=0)
        reduced = self.outer_axes + self.inner_axes
        index = formulas.shift_index(self.plan.rank, reduced)
        return tf.reduce_sum(xv[index], axis=reduced, keepdims=bool(self.inner_axes))


def _vector(value, plan: Plan, shape, default: float):
    """A broadcastable per-channel ``value`` (or ``default``) as float32 ``shape``."""
    if value is None:
        return tf.constant(default, tf.float32, shape)
    return channel_vector(tf.cast(value, tf.float32), plan, tf, shape)


def _fused_view(x, plan: Plan):
    """Channels-last ``x`` as the NHWC tensor ``(rows / r, r, 1, C)``, ``r <=
    FUSED_IMAGE_ROWS``."""
    rows = math.gcd(plan.known_outer, FUSED_IMAGE_ROWS)
    return tf.reshape(x, [-1, rows, 1, plan.channels])


# ------------------------------------------------------------------- training
def _composite_batch_normalize(x, plan: Plan, gamma, beta, epsilon: float):
    """BN of ``x`` with its own statistics as one ``tf.custom_gradient``;
    ``(y, mean, variance)`` in the layout."""
    layout = _Layout(plan)

    @tf.custom_gradient
    def batch_norm(xv, gamma, beta):
        count = layout.samples(xv)
        shift = tf.stop_gradient(layout.first(xv))
        d = xv - layout.spread(shift)  # exact where x is close to its shift
        offset, variance = formulas.shifted_statistics(
            layout.sum(d), layout.sum(tf.square(d)), count, _XP
        )
        inv = formulas.inverse_std(variance, epsilon, _XP)
        scale, bias = formulas.affine(inv, offset, gamma, beta)
        y = formulas.normalized(d, layout.spread(scale), layout.spread(bias), _XP)

        def grad(dy, *_):
            dgamma, dbeta, slope, constant = formulas.backward_coefficients(
                layout.sum(dy), layout.sum(dy * d), count, offset, inv, scale
            )
            dx = formulas.input_gradient(
                dy,
                d,
                layout.spread(scale),
                layout.spread(slope),
                layout.spread(constant),
                _XP,
            )
            return dx, dgamma, dbeta

        return (y, shift + offset, variance), grad

    y, mean, variance = batch_norm(
        layout.view(x), layout.vector(gamma, 1.0), layout.vector(beta, 0.0)
    )
    return layout.restore(y, x), layout.statistics(mean), layout.statistics(variance)


def _fused_batch_normalize(x, plan: Plan, gamma, beta, epsilon: float):
    """BN with the fused kernel; ``(y, mean, variance)``.

    The ``tf.cond`` runs in the forward pass only: the gradient is the fused
    gradient kernel of whichever input the kernel saw (BN's gradient does not
    change with a constant shift), so nothing of the branch not taken is kept
    for the backward pass.
    """
    x4 = _fused_view(x, plan)

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

    @tf.custom_gradient
    def batch_norm(x4, scale, offset):
        y, mean, variance, *reserve = fused(x4, scale, offset)
        far = tf.reduce_any(
            formulas.far_from_zero(mean, variance, FUSED_MAX_MEAN_SPREADS)
        )

        def shifted():
            shift = tf.cast(x4[:1, :1, :1], tf.float32)
            # Exact in the input's dtype where x is close to its first sample.
            t = tf.cast(tf.cast(x4, tf.float32) - shift, x4.dtype)
            y, mean, variance, *reserve = fused(t, scale, offset)
            mean = mean + tf.reshape(shift, [plan.channels])
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

    vector = (plan.channels,)
    y, mean, variance = batch_norm(
        x4, _vector(gamma, plan, vector, 1.0), _vector(beta, plan, vector, 0.0)
    )
    count = plan.count
    if count is None:
        count = tf.cast(tf.size(x) // plan.channels, tf.float32)
    variance = formulas.biased_variance(variance, count)
    return (
        tf.reshape(y, _shape_of(x)),
        tf.reshape(mean, plan.keepdims_shape),
        tf.reshape(variance, plan.keepdims_shape),
    )


def batch_normalize(x, plan: Plan, gamma, beta, epsilon: float):
    """Training-mode BN of ``x`` as ``plan`` says (see :func:`formulation`).

    Args:
        x: the input tensor.
        plan: its training plan.
        gamma, beta: scale and offset broadcastable to ``x``, or None.
        epsilon: added to the variance.

    Returns:
        ``(y, mean, variance)``: the output in float32, and the batch mean and
        biased variance in float32 with the reduced axes kept (no gradient).

    Example:
        >>> x = tf.constant([[0.0], [2.0]])
        >>> y, mean, var = batch_normalize(x, formulation(x.shape, [0]), None, None, 0.0)
        >>> [round(float(v), 6) for v in (y[0, 0], y[1, 0], mean[0, 0], var[0, 0])]
        [-1.0, 1.0, 1.0, 1.0]
    """
    if plan.formulation == "fused":
        y, mean, variance = _fused_batch_normalize(x, plan, gamma, beta, epsilon)
    else:
        y, mean, variance = _composite_batch_normalize(x, plan, gamma, beta, epsilon)
    return tf.cast(y, tf.float32), mean, variance


# ------------------------------------------------------------------ inference
def normalize(x, plan: Plan, mean, variance, gamma, beta, epsilon: float):
    """Inference-mode BN of ``x`` as ``plan`` says (see :func:`formulation`).

    Args:
        x: the input tensor.
        plan: its inference plan.
        mean, variance, gamma, beta: per-channel values broadcastable to
            ``x`` (gamma and beta may be None).
        epsilon: added to the variance.

    Returns:
        ``gamma * (x - mean) / sqrt(variance + epsilon) + beta`` in float32.

    Example:
        >>> x = tf.constant([[0.0], [2.0]])
        >>> plan = formulation(x.shape, [0], training=False)
        >>> normalize(x, plan, tf.ones((1, 1)), tf.ones((1, 1)), None, None, 0.0)
        <tf.Tensor: shape=(2, 1), dtype=float32, numpy=
        array([[-1.],
               [ 1.]], dtype=float32)>
    """
    if plan.formulation == "fused":
        vector = (plan.channels,)
        y, *_ = tf.raw_ops.FusedBatchNormV3(
            x=_fused_view(x, plan),
            scale=_vector(gamma, plan, vector, 1.0),
            offset=_vector(beta, plan, vector, 0.0),
            mean=_vector(mean, plan, vector, 0.0),
            variance=_vector(variance, plan, vector, 1.0),
            epsilon=epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=False,
        )
        return tf.cast(tf.reshape(y, _shape_of(x)), tf.float32)
    layout = _Layout(plan)
    if layout.k == 1:
        return formulas.normalize(x, mean, variance, gamma, beta, epsilon)
    statistics = [
        None if v is None else layout.vector(v, 0.0)
        for v in (mean, variance, gamma, beta)
    ]
    scale, offset = formulas.affine_from_statistics(*statistics, epsilon, _XP)
    y = layout.view(x) * layout.spread(scale) + layout.spread(offset)
    return layout.restore(y, x)


# ------------------------------------------------------ non-finite guard
def all_finite(first, *others):
    """A scalar boolean: every element of every tensor is finite.

    ``IsFinite`` and ``All`` of :func:`kerasbn.formulas.finite_probe`: one op
    fewer than a sum on TensorFlow.

    Example:
        >>> bool(all_finite(tf.ones(2), tf.constant([0.0, float("inf")])))
        False
    """
    return tf.reduce_all(tf.math.is_finite(formulas.finite_probe(first, *others)))


# ------------------------------------------------ synchronized statistics
def global_moments(local: formulas.Moments) -> formulas.Moments:
    """Merges the local moments of every tf.distribute replica in sync.

    One ``all_gather`` (a single ``CollectiveGatherV2`` under the mirrored
    strategies) brings every replica's moments to every replica, and
    :func:`kerasbn.formulas.combine_moments` merges them exactly, weighted by
    the counts, so uneven or empty replicas give the statistics of the global
    batch. Every replica merges the same gathered tensor with the same ops, so
    all get bit-identical statistics; gradients flow through ``all_gather`` to
    every replica's inputs.

    Args:
        local: this replica's :class:`kerasbn.formulas.Moments`; all fields
            have the same shape on every replica.

    Returns:
        The moments of the global batch (the local ones where there is no
        cross-replica context to merge over).

    Example:
        >>> m = formulas.sufficient_moments(tf.ones((2, 3)), [0])
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
    return formulas.combine_moments(formulas.Moments(*tf.unstack(gathered, axis=1)))


def assert_divisible(x, group_size: int, message: str):
    """``x``, after an in-graph check that its batch size divides by ``group_size``.

    Example:
        >>> assert_divisible(tf.ones((4, 2)), 2, "must divide").shape
        TensorShape([4, 2])
    """
    check = tf.debugging.assert_equal(tf.shape(x)[0] % group_size, 0, message=message)
    with tf.control_dependencies([check]):
        return tf.identity(x)
