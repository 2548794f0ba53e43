"""The TensorFlow kernels: the fused kernel or one custom gradient, and
``tf.distribute`` statistics.

A call is computed one of three ways, chosen from static facts
(:func:`formulation`):

* ``"fused"``: ``FusedBatchNormV3`` and its registered gradient (oneDNN on x86
  CPUs, cuDNN on GPUs) on a 4-D NHWC view of a channels-last input: the
  fewest passes over memory, but a fixed cost per step and a scalar path for
  channel counts off a multiple of 4 on the CPU, so there only for large
  inputs (``FUSED_THRESHOLDS``, measured on a CPU); elsewhere always. Its
  Bessel-corrected variance is scaled back
  (:func:`~kerasbn.formulas.biased_variance`), and where a mean lies more than
  ``FUSED_MAX_MEAN_SPREADS`` spreads from zero, a ``tf.cond`` runs it again on
  the input shifted by its first sample: its float32 mean's rounding, which
  ``1 / sqrt(variance + epsilon)`` amplifies, is then gone.
* ``"composite"``: one ``tf.custom_gradient`` of the formulas of
  :mod:`kerasbn.formulas`: the sums of ``d = x - shift`` and ``d * d``, ``y =
  d * scale + bias``; backward, the sums of ``dy`` and ``dy * d`` and ``dx``.
* ``"widened"``: the composite on a channels-last input seen as ``(rows / k,
  k * C)`` with ``k * C`` a multiple of the CPU's ``VECTOR_WIDTH``, for large
  inputs with few channels: per-channel vectors then fill whole SIMD vectors.

Inference takes the fused kernel or the widened view where training would,
else :func:`kerasbn.formulas.normalize` (``"affine"``). Outputs are float32.
Declined: a mask, float64 (the fused kernels have none) and non-floating
inputs, channel axes that are not adjacent, an unknown rank or channel size,
no reduction axis.

Example:
    >>> import tensorflow as tf
    >>> x = tf.random.normal((8, 4, 4, 3))
    >>> plan = formulation(x.shape, [0, 1, 2])
    >>> plan.formulation, formulation(x.shape, [0, 1, 2], dtype="float64")
    ('composite', None)
    >>> y, mean, var = batch_normalize(x, plan, None, None, 1e-3)
    >>> y.shape, mean.shape
    (TensorShape([8, 4, 4, 3]), TensorShape([1, 1, 1, 3]))
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from kerasbn import _isa as isa
from kerasbn import formulas
from kerasbn.backends.plan import CPU, KERNEL_FUNCTIONS, Plan, channel_vector

__all__ = [
    *KERNEL_FUNCTIONS,
    "CPU_DEVICE",
    "CPU_RULES",
    "DTYPES",
    "FUSED_MAX_MEAN_SPREADS",
    "FUSED_MIN_EPSILON",
    "UNMEASURED_CPU",
    "CpuRules",
    "onednn_enabled",
]

DTYPES = ("float16", "bfloat16", "float32")
FUSED_MIN_EPSILON = 1.001e-5  # cuDNN's smallest epsilon
EAGER_CALLS = 8  # calls of a tool's pass function run eagerly before tracing it
FUSED_MAX_MEAN_SPREADS = 100.0
"""The fused kernel sees the input as it is while every mean lies within this
many spreads of zero: its float32 mean's rounding does not show there."""


@dataclasses.dataclass(frozen=True)
class CpuRules:
    """The formulation choices measured on one kind of CPU (see
    ``benchmarks/README.md`` for the figures behind each).

    Attributes:
        fused: ``(channel multiple, fewest elements)`` pairs: the fused kernel
            serves a channels-last input whose channels are a multiple of the
            first and whose size reaches the second.
        image_rows: rows per image of the fused kernel's 4-D view.
        vector_width: float32 lanes that a widened view fills (0: none is).
        widen_min_elements: below this size nothing is widened.
    """

    fused: tuple[tuple[int, int], ...] = ()
    image_rows: int = 16
    vector_width: int = 0
    widen_min_elements: int = 1 << 15


_ONEDNN = CpuRules(fused=((8, 1 << 17), (4, 1 << 19)), image_rows=16, vector_width=16)
_EIGEN = CpuRules(fused=((4, 1 << 17),), image_rows=16, vector_width=8)
CPU_RULES = {
    isa.cpu_device(isa.AVX512, isa.ONEDNN): _ONEDNN,
    isa.cpu_device(isa.AVX2, isa.ONEDNN): _ONEDNN,
    isa.cpu_device(isa.AVX512): _EIGEN,
    isa.cpu_device(isa.AVX2): _EIGEN,
}
"""The rules of each CPU they were measured on, by device name. With oneDNN
off, TensorFlow's own kernels run code built for the binary's baseline, so
AVX-512 and AVX2 CPUs share their rules."""
UNMEASURED_CPU = CpuRules()
"""Any other CPU: the composite formulation, never slower than Keras's BN."""

_EMPTY = ()
_XP = formulas.Namespace(tf, rsqrt=tf.math.rsqrt)


def device(x) -> str | None:
    """The device ``x``'s ops run on, or None for a non-TensorFlow object:
    the one an eager tensor names, else where TensorFlow places ops; a CPU
    as :data:`CPU_DEVICE`."""
    if not tf.is_tensor(x):
        return None
    name = getattr(x, "device", "") or ""
    if name:
        kind = (tf.DeviceSpec.from_string(name).device_type or "CPU").lower()
        return CPU_DEVICE if kind == CPU else kind
    return default_device()


def default_device() -> str:
    """``"gpu"`` where TensorFlow sees a GPU, else :data:`CPU_DEVICE`."""
    return "gpu" if tf.config.list_logical_devices("GPU") else CPU_DEVICE


def onednn_enabled() -> bool:
    """Whether TensorFlow computes its CPU kernels with oneDNN: its default on
    x86 CPUs with AVX-512 VNNI, BF16 or AMX; ``TF_ENABLE_ONEDNN_OPTS`` turns
    it on or off."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # the report moved: what TF_ENABLE_ONEDNN_OPTS asks
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "0").lower() in ("1", "true")
    return bool(_pywrap_util_port.IsMklEnabled())


CPU_DEVICE = isa.cpu_device(
    isa.instruction_set(
        os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    ),
    *((isa.ONEDNN,) if onednn_enabled() else ()),
)
"""This process's CPU: the instruction set oneDNN computes with (the CPU's,
capped by ``ONEDNN_MAX_CPU_ISA``), and ``":onednn"`` where oneDNN is on.
Without oneDNN, TensorFlow's own (Eigen) kernels run code compiled for the
binary's baseline, whatever the CPU."""


def formulation(
    shape: Sequence,
    axes: Sequence[int],
    *,
    dtype: str = "float32",
    epsilon: float = 1e-3,
    training: bool = True,
    device: str = CPU,
) -> Plan | None:
    """The plan of a call (see :class:`kerasbn.backends.Kernels`): ``"fused"``,
    ``"widened"``, else ``"composite"`` in training and ``"affine"`` in
    inference; an unknown size counts as ``NOMINAL_DIM``.

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
    device = isa.resolve(device, CPU_DEVICE)
    plan = Plan.of(shape, axes, device=device, training=training)
    if plan is None or dtype not in DTYPES:
        return None
    rules, size = cpu_rules(device), plan.nominal_size
    if plan.channels_last and epsilon >= FUSED_MIN_EPSILON:
        if rules is None or any(
            plan.channels % m == 0 and size >= n for m, n in rules.fused
        ):
            return plan.using("fused")
    if rules and size >= rules.widen_min_elements and _widening(plan) > 1:
        return plan.using("widened")
    return plan.using("composite" if training else "affine")


def cpu_rules(device: str) -> CpuRules | None:
    """The rules measured on the CPU ``device`` names, :data:`UNMEASURED_CPU`
    for a CPU without measurements; None off the CPU (the fused kernel is
    cuDNN's there)."""
    if isa.device_type(device) != CPU:
        return None
    return CPU_RULES.get(device, UNMEASURED_CPU)


def _widening(plan: Plan) -> int:
    """``k`` of the ``(rows / k, k * C)`` view: ``k * C`` a multiple of the
    CPU's vector width, ``k`` dividing the rows; 1 where nothing is widened."""
    rules, channels = cpu_rules(plan.device), plan.channels
    width = rules.vector_width if rules else 0
    if not width or not plan.channels_last or channels >= 4 * width:
        return 1
    k = width // math.gcd(channels, width)
    while plan.known_outer % k:
        k //= 2
    return k


# ------------------------------------------------------------------- layouts
def _shape_of(x):
    """``x``'s shape: a list if static, else a tensor."""
    return x.shape.as_list() if x.shape.is_fully_defined() else tf.shape(x)


class _Layout:
    """How the composite formulation sees ``x`` and its per-channel vectors.

    Unwidened, ``x`` keeps its shape; with trailing channels a vector has the
    channels' shape (the layer's weights and their gradients need no
    reshape), else the keepdims shape, reduced over the contiguous trailing
    axes first. Widened by ``k``, ``x`` is ``(rows / k, k * C)`` and a vector
    ``(C,)``, repeated ``k`` times along a row.
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
        """The first sample of each channel (0 for an empty batch): a sum over
        a one-sample slice has the vector's static shape."""
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


def _fused(x4, scale, offset, mean, variance, epsilon: float, training: bool):
    """``FusedBatchNormV3`` on the NHWC ``x4`` (empty statistics in training)."""
    mean, variance = (tf.convert_to_tensor(v, tf.float32) for v in (mean, variance))
    return tf.raw_ops.FusedBatchNormV3(
        **dict(x=x4, scale=scale, offset=offset, mean=mean, variance=variance),
        epsilon=epsilon,
        exponential_avg_factor=1.0,
        data_format="NHWC",
        is_training=training,
    )


def _fused_view(x, plan: Plan):
    """Channels-last ``x`` as NHWC ``(rows / r, r, 1, C)``, ``r`` dividing the
    CPU's ``image_rows`` (16 off the CPU)."""
    rules = cpu_rules(plan.device) or UNMEASURED_CPU
    rows = math.gcd(plan.known_outer, rules.image_rows)
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
            vectors = map(layout.spread, (scale, slope, constant))
            dx = formulas.input_gradient(dy, d, *vectors, _XP)
            return dx, dgamma, dbeta

        return (y, shift + offset, variance), grad

    y, mean, variance = batch_norm(
        layout.view(x), layout.vector(gamma, 1.0), layout.vector(beta, 0.0)
    )
    return layout.restore(y, x), layout.statistics(mean), layout.statistics(variance)


def _fused_batch_normalize(x, plan: Plan, gamma, beta, epsilon: float):
    """BN with the fused kernel; ``(y, mean, variance)``. The gradient is the
    fused gradient kernel of the input the kernel saw (a shift does not change
    it), so nothing of the ``tf.cond``'s other branch is kept."""
    x4 = _fused_view(x, plan)

    def fused(t, scale, offset):
        return _fused(t, scale, offset, _EMPTY, _EMPTY, epsilon, training=True)

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
    """Training-mode BN of ``x`` as ``plan`` says: ``(y, mean, variance)`` as
    :func:`kerasbn.formulas.batch_normalize` returns them, in float32.

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
    """Inference-mode BN of ``x`` as ``plan`` says, as
    :func:`kerasbn.formulas.normalize` computes it, in float32.

    Example:
        >>> x = tf.constant([[0.0], [2.0]])
        >>> plan = formulation(x.shape, [0], training=False)
        >>> normalize(x, plan, tf.ones((1, 1)), tf.ones((1, 1)), None, None, 0.0)
        <tf.Tensor: shape=(2, 1), dtype=float32, numpy=
        array([[-1.],
               [ 1.]], dtype=float32)>
    """
    if plan.formulation == "fused":
        defaults = ((gamma, 1.0), (beta, 0.0), (mean, 0.0), (variance, 1.0))
        vectors = [_vector(v, plan, (plan.channels,), d) for v, d in defaults]
        y, *_ = _fused(_fused_view(x, plan), *vectors, epsilon, training=False)
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
    """A scalar boolean: ``IsFinite`` and ``All`` of
    :func:`kerasbn.formulas.finite_probe`, one op fewer than a sum.

    Example:
        >>> bool(all_finite(tf.ones(2), tf.constant([0.0, float("inf")])))
        False
    """
    return tf.reduce_all(tf.math.is_finite(formulas.finite_probe(first, *others)))


# ------------------------------------------------ synchronized statistics
def global_moments(local: formulas.Moments) -> formulas.Moments:
    """The moments of all tf.distribute replicas in sync (``local`` outside).

    One ``all_gather`` (a single ``CollectiveGatherV2`` under the mirrored
    strategies) brings every replica's moments to every replica, and
    :func:`kerasbn.formulas.combine_moments` merges them exactly, weighted by
    the counts: every replica gets bit-identical statistics of the global
    batch, uneven or empty replicas included, and gradients flow back to every
    replica's inputs. ``local``'s fields have the same shape on every replica.

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

    Tracing a model costs about as much as ``EAGER_CALLS`` eager calls of it
    (measured with ``benchmarks/bench_diagnose.py``; the figures are in
    ``benchmarks/README.md``), so a pass of a few batches runs eagerly and a
    long one pays the trace once.

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
