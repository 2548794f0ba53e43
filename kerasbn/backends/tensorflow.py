"""TensorFlow kernels: the fused kernel or one custom gradient; ``tf.distribute``.

:func:`formulation` picks, from static facts:

* ``"fused"``: ``FusedBatchNormV3`` and its gradient (oneDNN on x86 CPUs, cuDNN
  on GPUs) on an NHWC view of a channels-last input: fewest passes, but a fixed
  cost and, on a CPU, a scalar path off 4-channel multiples; so on a CPU only
  for large inputs (:data:`CPU_RULES`). Where a mean lies beyond
  ``FUSED_MAX_MEAN_SPREADS`` spreads from zero, a ``tf.cond`` reruns it on the
  input minus its first sample, which removes its float32 mean's rounding.
* ``"widened"``: else, for large inputs with few channels on a CPU, the composite
  viewed as ``(rows / k, k * C)``, so that channels fill whole SIMD vectors.
* ``"composite"``: else one ``tf.custom_gradient`` of :mod:`kerasbn.formulas`;
  in inference ``"affine"``, :func:`kerasbn.formulas.normalize`.

Outputs are float32. Declined: a mask, float64 and non-floating inputs, channel
axes that are not adjacent, an unknown rank or channel size, no reduction axis.

Example:
    >>> import tensorflow as tf
    >>> shapes = (32, 56, 56, 64), (32, 24, 24, 10), (8, 4, 4, 3)
    >>> [formulation(s, [0, 1, 2]).formulation for s in shapes]
    ['fused', 'widened', 'composite']
    >>> x = tf.random.normal(shapes[2])
    >>> y, mean, var = batch_normalize(x, formulation(x.shape, [0, 1, 2]), None, None, 0.0)
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
"""Beyond this many spreads from zero, a mean makes the fused kernel rerun shifted."""


@dataclasses.dataclass(frozen=True)
class CpuRules:
    """Formulation choices measured on one instruction set (``benchmarks/README.md``).

    Attributes:
        fused: ``(channel multiple, fewest elements)`` pairs from which the fused
            kernel serves a channels-last input.
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
"""The rules measured on each instruction set, oneDNN on or off, by device. Eigen
(oneDNN off) runs the binary's baseline code, so AVX-512 and AVX2 share theirs."""
UNMEASURED_CPU = CpuRules()
"""Any other CPU: the composite formulation, never slower than Keras's BN."""

_EMPTY = ()
_XP = formulas.Namespace(tf, rsqrt=tf.math.rsqrt)


def device(x) -> str | None:
    """An eager tensor's device, else where TensorFlow places ops."""
    if not tf.is_tensor(x):
        return None
    name = getattr(x, "device", "") or ""
    if name:
        kind = (tf.DeviceSpec.from_string(name).device_type or "CPU").lower()
        return isa.resolve(kind, CPU_DEVICE)
    return default_device()


def default_device() -> str:
    """``"gpu"`` where TensorFlow sees one, else :data:`CPU_DEVICE`."""
    return "gpu" if tf.config.list_logical_devices("GPU") else CPU_DEVICE


def onednn_enabled() -> bool:
    """Whether TensorFlow's CPU kernels use oneDNN: its default on x86 CPUs with
    AVX-512 VNNI, BF16 or AMX; ``TF_ENABLE_ONEDNN_OPTS`` overrides it."""
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
"""This process's CPU: its instruction set, capped by ``ONEDNN_MAX_CPU_ISA``,
and ``":onednn"`` where oneDNN is on."""


def formulation(
    shape: Sequence,
    axes: Sequence[int],
    *,
    dtype: str = "float32",
    epsilon: float = 1e-3,
    training: bool = True,
    device: str = CPU,
) -> Plan | None:
    """:meth:`kerasbn.backends.Kernels.formulation`, as the module says."""
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
    """The CPU ``device``'s rules (:data:`UNMEASURED_CPU` if unmeasured), or None."""
    if isa.device_type(device) != CPU:
        return None
    return CPU_RULES.get(device, UNMEASURED_CPU)


def _widening(plan: Plan) -> int:
    """``k`` of the widened view (``k * C`` a multiple of the vector width); or 1."""
    rules = cpu_rules(plan.device)
    return plan.widening(rules.vector_width if rules else 0)


def _shape_of(x):
    """``x``'s shape: a list if static, else a tensor."""
    return x.shape.as_list() if x.shape.is_fully_defined() else tf.shape(x)


class _Layout:
    """How the composite sees ``x`` and its vectors: widened by ``k``, ``(rows / k,
    k * C)`` and ``(C,)`` tiled ``k`` times; else ``x``'s shape and the channels'
    (channels last: the weights need no reshape) or the keepdims shape."""

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
        """Each channel's first sample (0 if empty), summed for a static shape
        unless the sizes are known."""
        if self.k > 1:
            return tf.reduce_sum(xv[:1, : self.plan.channels], axis=0)
        if not self.inner_axes and self.plan.count:  # known and not empty
            return xv[(0,) * len(self.outer_axes)]
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
    """Channels-last ``x`` as NHWC images of ``gcd(rows, image_rows)`` rows."""
    rules = cpu_rules(plan.device) or UNMEASURED_CPU
    rows = math.gcd(plan.known_outer, rules.image_rows)
    return tf.reshape(x, [-1, rows, 1, plan.channels])


def _composite_batch_normalize(x, plan: Plan, gamma, beta, epsilon: float):
    """``(y, mean, variance)`` from one ``tf.custom_gradient``."""
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
    """``(y, mean, variance)`` of the fused kernels, whose gradient no shift changes."""
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
    """:meth:`kerasbn.backends.Kernels.batch_normalize`; ``y`` in float32."""
    if plan.formulation == "fused":
        y, mean, variance = _fused_batch_normalize(x, plan, gamma, beta, epsilon)
    else:
        y, mean, variance = _composite_batch_normalize(x, plan, gamma, beta, epsilon)
    return tf.cast(y, tf.float32), mean, variance


def normalize(x, plan: Plan, mean, variance, gamma, beta, epsilon: float):
    """:meth:`kerasbn.backends.Kernels.normalize`, in float32."""
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


def all_finite(first, *others):
    """``all(isfinite(finite_probe(...)))``: one op fewer than a sum."""
    return tf.reduce_all(tf.math.is_finite(formulas.finite_probe(first, *others)))


moving_average = formulas.ema_update  # Keras's own ops, which the compiler fuses


def assign_where(usable, updates) -> None:
    """One ``tf.where`` per variable."""
    for variable, current, value in updates:
        variable.assign(tf.where(usable, tf.cast(value, current.dtype), current))


def global_moments(local: formulas.Moments) -> formulas.Moments:
    """:meth:`kerasbn.backends.Kernels.global_moments` by one ``all_gather``."""
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
    """``x``, after an in-graph ``assert_equal`` of the batch size modulo the group."""
    check = tf.debugging.assert_equal(tf.shape(x)[0] % group_size, 0, message=message)
    with tf.control_dependencies([check]):
        return tf.identity(x)


def gather_workers(array: np.ndarray, variable=None) -> np.ndarray:
    """:meth:`kerasbn.backends.Kernels.gather_workers`: one ``strategy.gather``
    where the strategy spans several workers (one copy per worker kept)."""
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
    """The ``num_replicas_in_sync`` of the strategy in scope (1 outside any)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def jit(function):
    """Eager for ``EAGER_CALLS`` calls (about what tracing costs, measured by
    ``benchmarks/bench_diagnose.py``), then one ``tf.function`` of relaxed shapes."""
    compiled = tf.function(function, reduce_retracing=True)
    calls = itertools.count()

    def call(*args):
        return (function if next(calls) < EAGER_CALLS else compiled)(*args)

    return call
