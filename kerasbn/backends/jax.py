"""JAX fast path and synchronized statistics under ``keras.distribution``.

:func:`kerasbn.backends.implementation` picks this module on the JAX backend
when :func:`applies` accepts a call. A training call is one
``jax.custom_vjp`` that computes what :mod:`kerasbn.ops` computes (the same
outputs, gradients and biased batch statistics, to float32 rounding) in the
fewest passes over memory that XLA's CPU backend allows:

* the input is viewed, at no cost, as ``(outer, C, inner)`` (``(rows, C)``
  for channels-last inputs, ``(B, C, H * W)`` for channels-first ones);
* forward: the per-channel statistics, then one loop
  ``y = (x - shift) * scale + (beta - offset * scale)``;
* backward: the per-channel sums of ``dy`` and ``dy * (x - shift)`` and one
  loop for ``dx``; the gradients of gamma and beta come from the same sums.

The statistics are computed one of two ways (:func:`formulation`):

* ``"shifted"``: ``shift`` is the first sample (as in
  :func:`kerasbn.ops.sufficient_moments`) and the sums of ``d = x - shift``
  and ``d * d`` give the mean and variance, exact where the mean dwarfs the
  spread (mean 1e4, std 1e-2). XLA materializes ``d`` before a reduction
  (its CPU reductions do not fuse a broadcast subtraction), so this costs
  two passes over memory more than the sums of ``x`` itself.
* ``"rough"`` (static shapes of ``ROUGH_MIN_ELEMENTS`` or more; a symbolic
  dimension always takes ``"shifted"``): ``shift`` is 0 and
  the sums of ``x`` and ``x * x`` give the statistics, and the sum of
  ``dy * x`` the backward projection. Their relative error grows like
  ``(1 + (mean / std)**2) * eps``, so where some channel's mean lies more
  than ``FAR_MEAN`` spreads from zero, a ``lax.cond`` (one branch runs)
  switches to the shifted statistics and the backward pass follows. Below
  that, the variance is within about 2e-6 of the exact one (float32).
  Inside a whole compiled train step a ``lax.cond`` costs more than the two
  passes it saves on small inputs: with the lecture CNN's BN inputs (at most
  184,320 elements) rough statistics made ``fit`` 7.6 ms a step against 6.3
  ms shifted, while at (32, 56, 56, 64) in a model of 1x1 convolutions they
  saved 7%. Hence the threshold of 2**20 elements.

In all, a training step makes 10 passes over memory of ``x``'s size ("rough":
read ``x`` twice, read ``x`` and write ``y``; read ``dy``, read ``dy`` and
``x``, read both and write ``dx``), 12 when shifted, against about 15 for
autodiff of the generic formula (what ``keras.layers.BatchNormalization``
runs on JAX). A matrix-vector product (``ones @ x``) instead of a reduction
measured slower than XLA's reductions here (2-core CPU, XLA's YNNPACK
reductions), so reductions are used throughout.

The outputs are float32 (float64 for float64 inputs), as :mod:`kerasbn.ops`
returns them, also for float16 and bfloat16 inputs; the layer casts them to
its compute dtype. The gradient with respect to ``x`` has ``x``'s dtype. The
statistics returned in training carry no gradient (the layer feeds them only
to its moving averages), while the gradient of the output is exact.

Inference is :func:`kerasbn.ops.normalize` itself: one fused multiply-add
over ``x``, which is already what XLA makes of it.

Declined (:func:`applies` is False and :mod:`kerasbn.ops` serves the call):

* a mask;
* non-floating inputs;
* channel axes that are not adjacent, e.g. ``axis=[1, 3]`` or the grouping of
  ghost batches;
* an unknown rank or dimension, no reduction axis, or an empty batch.

**Synchronized statistics.** Under ``keras.distribution`` (``DataParallel``,
``ModelParallel``, also over several processes joined by
``jax.distributed``),
Keras's JAX trainer compiles the train step once for the whole device mesh
(SPMD): the batch axis is sharded across devices, but a reduction over it is
a reduction over the *global* batch, and XLA inserts the cross-device sums
itself. So :func:`global_moments` returns the moments as they are computed:
they already are those of the global batch, on every device and process,
which hold one copy of the moving statistics. For the same reason
``synchronized=False`` gives the same global statistics on JAX: per-device
statistics (what ``synchronized=False`` means under ``tf.distribute``) are
not what an SPMD program computes. ``synchronized=True`` is accepted so that
models written for TensorFlow's engines run unchanged; it computes the
statistics with :mod:`kerasbn.ops` (shifted moments, exact for large means)
rather than with this fast path. Tested (``tests/test_sync_jax.py``):
``DataParallel`` over 2 CPU devices, and over 2 processes joined by
``jax.distributed`` with gloo collectives; ``ModelParallel`` shards the batch
the same way. Not covered: a layer called inside ``jax.pmap`` or
``shard_map`` by hand, where each shard computes its own statistics (the
axis name to merge over is not known here).

Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.zeros((8, 4, 4, 3))
    >>> applies(x, [0, 1, 2]), applies(x, [0, 1])
    (True, True)
    >>> y, mean, var = batch_normalize(x + 1.0, [0, 1, 2], None, None, 1e-3)
    >>> y.shape, mean.shape, float(mean[0, 0, 0, 0])
    ((8, 4, 4, 3), (1, 1, 1, 3), 1.0)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import keras
import numpy as np

from kerasbn import ops

DTYPES = ("float16", "bfloat16", "float32", "float64")
FAR_MEAN = 3.0  # spreads from zero beyond which the statistics are shifted
ROUGH_MIN_ELEMENTS = 1 << 20  # below this, always the shifted statistics


class _View(NamedTuple):
    """The input seen as ``(outer, channels, inner)``.

    Hashable: it is a static argument of the ``custom_vjp``.

    Attributes:
        start, stop: the channel axes are ``start .. stop - 1``.
        outer, channels, inner: the products of the sizes before, of and
            after the channel axes.
        rough: whether the statistics come from the plain sums of ``x`` and
            ``x * x`` where the mean is within ``FAR_MEAN`` spreads of zero.
    """

    start: int
    stop: int
    outer: int
    channels: int
    inner: int
    rough: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """The view's shape: size-1 ends dropped, so reductions run over at
        most two axes of a contiguous array."""
        if self.inner == 1:
            return (self.outer, self.channels)
        if self.outer == 1:
            return (self.channels, self.inner)
        return (self.outer, self.channels, self.inner)

    @property
    def axes(self) -> tuple[int, ...]:
        """The reduction axes of :attr:`shape`."""
        if self.inner == 1:
            return (0,)
        if self.outer == 1:
            return (1,)
        return (0, 2)

    @property
    def count(self) -> int:
        """Samples per channel."""
        return self.outer * self.inner

    @property
    def vector_shape(self) -> tuple[int, ...]:
        """The shape of a per-channel vector: :attr:`shape` with size 1 on the
        reduced axes."""
        return tuple(1 if a in self.axes else d for a, d in enumerate(self.shape))

    def sum(self, t):
        """``t`` (in the view) summed to a per-channel vector."""
        return jnp.sum(t, self.axes, keepdims=True)

    def first(self, x):
        """The first sample of each channel, as a per-channel vector."""
        index = [slice(0, 1) if a in self.axes else slice(None) for a in range(x.ndim)]
        return x[tuple(index)]


def _view(
    shape: Sequence[int | None], axes: Sequence[int], platform: str | None = None
) -> _View | None:
    """The view for adjacent channel axes of known size, else None.

    ``platform`` is where the call runs (see :func:`_rough`).
    """
    rank = len(shape)
    if not axes or None in shape:
        return None
    reduced = {a % rank for a in axes}
    channel_axes = [a for a in range(rank) if a not in reduced]
    if not channel_axes or channel_axes != list(
        range(channel_axes[0], channel_axes[-1] + 1)
    ):
        return None
    start, stop = channel_axes[0], channel_axes[-1] + 1
    outer, channels = math.prod(shape[:start]), math.prod(shape[start:stop])
    inner = math.prod(shape[stop:])
    return _View(start, stop, outer, channels, inner, _rough(shape, platform))


def _rough(shape: Sequence, platform: str | None = None) -> bool:
    """Whether an input of ``shape`` takes the rough statistics.

    Only a fully static shape of ``ROUGH_MIN_ELEMENTS`` or more does: a
    symbolic dimension (``jax.export``, ``model.export`` with a variable
    batch) cannot be compared with a number, and the shifted statistics serve
    every size exactly. And only on the CPU: the threshold and the two
    passes it saves were measured with XLA's CPU reductions, nowhere else.
    ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``) defaults to JAX's default
    backend, where Keras's JAX backend computes.
    """
    if (platform or jax.default_backend()) != "cpu":
        return False
    if not all(isinstance(d, int) for d in shape):
        return False
    return math.prod(shape) >= ROUGH_MIN_ELEMENTS


def _shape(x) -> tuple | None:
    shape = getattr(x, "shape", None)
    return None if shape is None else tuple(shape)


def applies(x, axes: Sequence[int], mask=None) -> bool:
    """Whether this module computes the call exactly.

    Args:
        x: the input.
        axes: the reduction axes.
        mask: the broadcastable mask, or None.

    Returns:
        True for non-empty floating inputs of known shape without a mask
        whose channel axes (those not in ``axes``) are adjacent.

    Example:
        >>> x = jnp.zeros((8, 5, 3))
        >>> applies(x, [0]), applies(x, [1]), applies(x, [0], mask=x > 0)
        (True, False, False)
    """
    if mask is not None:
        return False
    shape = _shape(x)
    if shape is None:
        return False
    if keras.backend.standardize_dtype(x.dtype) not in DTYPES:
        return False
    # A symbolic dimension is at least 1 (jax.export's assumption).
    return _view(shape, axes) is not None and 0 not in shape


def formulation(
    shape: Sequence[int], axes: Sequence[int], platform: str | None = None
) -> str:
    """How a training call of this shape is computed.

    Args:
        shape: the input's shape.
        axes: the reduction axes.
        platform: where it runs (``"cpu"``, ``"gpu"``...); by default JAX's
            default backend. ``"rough"`` is for the CPU only.

    Returns:
        ``"generic"`` where :func:`applies` would decline the call (for a
        float32 input without a mask), else ``"shifted"`` or ``"rough"``
        (see the module docstring).

    Example:
        >>> formulation((32, 56, 56, 64), [0, 1, 2]), formulation((4, 5, 6), [1])
        ('rough', 'generic')
        >>> formulation((32, 24, 24, 10), [0, 1, 2]), formulation((32, 100), [0])
        ('shifted', 'shifted')
        >>> formulation((32, 56, 56, 64), [0, 1, 2], platform="gpu")
        'shifted'
    """
    view = _view(tuple(shape), axes, platform)
    if view is None or 0 in tuple(shape):
        return "generic"
    return "rough" if view.rough else "shifted"


# ------------------------------------------------------------------- training
def _statistics(x, view: _View):
    """``(shift, offset, variance, far)`` of the view ``x`` (statistics dtype).

    The mean is ``shift + offset``. Shifted: ``shift`` is the first sample,
    and the sums of ``d = x - shift`` and ``d * d`` give the rest, exact where
    the mean dwarfs the spread. Rough (large inputs): ``shift`` is 0 and the
    plain sums of ``x`` and ``x * x`` give the rest, two passes fewer (XLA
    materializes ``d`` before a reduction); where some channel's mean is
    more than ``FAR_MEAN`` spreads from zero (``far``), a ``lax.cond`` takes
    the shifted statistics instead, and the backward pass follows.
    """
    n = view.count

    def shifted():
        shift = jax.lax.stop_gradient(view.first(x))
        d = x - shift  # exact where x is close to its first sample
        offset = view.sum(d) / n
        return shift, offset, view.sum(d * d) / n - offset * offset

    if not view.rough:
        return (*shifted(), jnp.asarray(True))
    mean = view.sum(x) / n
    variance = view.sum(x * x) / n - mean * mean
    far = jnp.any(mean * mean > FAR_MEAN**2 * variance)
    shift, offset, variance = jax.lax.cond(
        far, shifted, lambda: (jnp.zeros_like(mean), mean, variance)
    )
    return shift, offset, variance, far


def _forward(x, gamma, beta, epsilon: float, view: _View):
    """Returns ``((y, mean, variance), residuals)`` on the view ``x``."""
    dtype = ops.statistics_dtype(x.dtype)
    xs = x.astype(dtype)
    shift, offset, variance, far = _statistics(xs, view)
    variance = jnp.maximum(variance, 0.0)
    inv = jax.lax.rsqrt(variance + epsilon)
    scale = gamma.astype(dtype) * inv
    y = (xs - shift) * scale + (beta.astype(dtype) - offset * scale)
    return (y, shift + offset, variance), (x, shift, offset, inv, scale, far)


def _backward(epsilon: float, view: _View, residuals, cotangents):
    """The gradients w.r.t. ``x``, gamma and beta of ``sum(y * dy)``.

    ``dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat))``, from the sums
    of ``dy`` and ``dy * d`` (``d = x - shift``, as in the forward pass; the
    plain ``dy * x`` where the forward pass took the rough statistics). The
    cotangents of the statistics are ignored: they carry no gradient.
    """
    del epsilon
    x, shift, offset, inv, scale, far = residuals
    n = view.count
    dy = cotangents[0].astype(shift.dtype)
    xs = x.astype(shift.dtype)
    dbeta = view.sum(dy)

    def shifted():
        return view.sum(dy * (xs - shift))

    if view.rough:
        dot = jax.lax.cond(far, shifted, lambda: view.sum(dy * xs))
    else:
        dot = shifted()
    projection = dot - offset * dbeta
    slope = scale * inv * inv * projection / n
    constant = scale * dbeta / n - offset * slope
    dx = dy * scale - ((xs - shift) * slope + constant)
    return dx.astype(x.dtype), projection * inv, dbeta


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm(x, gamma, beta, epsilon: float, view: _View):
    """BN of the view ``x`` with its own statistics: ``(y, mean, variance)``."""
    return _forward(x, gamma, beta, epsilon, view)[0]


_batch_norm.defvjp(_forward, _backward)


def _vector(value, shape: Sequence[int], view: _View, dtype, default: float):
    """A broadcastable per-channel ``value`` (or ``default``) as a view vector."""
    if value is None:
        return jnp.full(view.vector_shape, default, dtype)
    value = jnp.broadcast_to(jnp.asarray(value), _keepdims_shape(shape, view))
    return jnp.reshape(value, view.vector_shape)


def _keepdims_shape(shape: Sequence[int], view: _View) -> tuple[int, ...]:
    """The statistics' keepdims shape: size 1 on the reduced axes."""
    return tuple(d if view.start <= a < view.stop else 1 for a, d in enumerate(shape))


def batch_normalize(x, axes: Sequence[int], gamma, beta, epsilon: float, mask=None):
    """Training-mode batch normalization, as :func:`kerasbn.ops.batch_normalize`.

    Args:
        x: input array; :func:`applies` must accept the call.
        axes: the reduction axes.
        gamma, beta: scale and offset broadcastable to ``x`` with one value
            per channel, or None.
        epsilon: added to the variance.
        mask: must be None.

    Returns:
        ``(y, mean, variance)``: the output in float32 (float64 for float64
        inputs), and the batch mean and biased variance in that dtype with
        the reduced axes kept (no gradient).

    Raises:
        ValueError: if :func:`applies` declines the call.

    Example:
        >>> x = jnp.array([[0.0], [2.0]])
        >>> y, mean, var = batch_normalize(x, [0], None, None, 0.0)
        >>> [float(v) for v in (y[0, 0], y[1, 0], mean[0, 0], var[0, 0])]
        [-1.0, 1.0, 1.0, 1.0]
    """
    x = jnp.asarray(x)
    if not applies(x, axes, mask):
        raise ValueError(
            f"The JAX fast path does not apply to this call (dtype {x.dtype}, "
            f"shape {_shape(x)}, axes {list(axes)}, mask "
            f"{'given' if mask is not None else 'None'}); use kerasbn.ops."
        )
    view = _view(x.shape, axes)
    dtype = ops.statistics_dtype(x.dtype)
    y, mean, variance = _batch_norm(
        jnp.reshape(x, view.shape),
        _vector(gamma, x.shape, view, dtype, 1.0),
        _vector(beta, x.shape, view, dtype, 0.0),
        float(epsilon),
        view,
    )
    stats_shape = _keepdims_shape(x.shape, view)
    return (
        jnp.reshape(y, x.shape),
        jax.lax.stop_gradient(jnp.reshape(mean, stats_shape)),
        jax.lax.stop_gradient(jnp.reshape(variance, stats_shape)),
    )


# ------------------------------------------------------------------ inference
def normalize(x, mean, variance, gamma, beta, epsilon: float):
    """Inference-mode normalization: :func:`kerasbn.ops.normalize` itself.

    XLA already fuses it into one multiply-add over ``x``.

    Example:
        >>> y = normalize(jnp.array([[0.0], [2.0]]), 1.0, 1.0, None, None, 0.0)
        >>> [float(v) for v in y.ravel()]
        [-1.0, 1.0]
    """
    return ops.normalize(x, mean, variance, gamma, beta, epsilon)


# ------------------------------------------------ synchronized statistics
def global_moments(local: ops.Moments) -> ops.Moments:
    """The moments of the global batch: ``local`` itself under SPMD.

    Keras's JAX trainer compiles one program for the whole device mesh of a
    ``keras.distribution`` (also across ``jax.distributed`` processes), in
    which a reduction over the sharded batch axis already is a reduction
    over the global batch. The moments computed by
    :func:`kerasbn.ops.sufficient_moments` inside it are therefore global;
    nothing is left to merge.

    Args:
        local: the :class:`kerasbn.ops.Moments` computed in the step.

    Returns:
        ``local``, unchanged.

    Example:
        >>> m = ops.sufficient_moments(jnp.ones((2, 3)), [0])
        >>> global_moments(m) is m
        True
    """
    return local


# ------------------------------------------------------ non-finite guard
GUARD_LANES = 32  # XLA's CPU runtime splits a longer reduction in two kernels


def all_finite(first, *others):
    """A scalar boolean: every element of every array is finite.

    What :func:`kerasbn.ops.all_finite` computes, in one XLA kernel where that
    takes three: ``t * 0`` is 0 where ``t`` is finite and NaN elsewhere, and
    the sum of those probes is 0 exactly when all are. XLA's CPU runtime
    splits a reduction of more than 32 elements into a reduce-window and a
    reduce that do not fuse with the probe, so a longer probe is summed to
    ``GUARD_LANES`` partial sums (one reduce that fuses the probe), and those
    are added as ``GUARD_LANES`` scalars, which XLA fuses into the kernel that
    consumes the result. In a train step of ``(32, 100)`` the guard costs one
    kernel (11 in all, Keras's BN 12) where it cost three (13).

    Args:
        first, *others: arrays that broadcast together.

    Example:
        >>> bool(all_finite(jnp.ones(40), jnp.zeros(40))), bool(all_finite(jnp.array([jnp.inf])))
        (True, False)
    """
    probe = jnp.asarray(first)
    for t in others:
        probe = probe + jnp.asarray(t) * 0.0
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
