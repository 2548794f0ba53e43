"""PyTorch fast path: batch normalization with PyTorch's own fused kernel.

:func:`kerasbn.backends.implementation` picks this module on the torch
backend when :func:`applies` accepts a call. It computes what
:mod:`kerasbn.ops` computes (the same outputs, gradients and biased batch
statistics, to float32 rounding) with one call of ``torch.batch_norm`` (what
``torch.nn.functional.batch_norm`` calls) and its registered autograd (the
ATen CPU kernels, cuDNN or MIOpen on GPUs), on a view of the input that
costs no copy (see :func:`formulation`):

* ``"channels_last"``: a 4-D or 5-D input with its channels last,
  ``(N, H, W, C)``, is permuted to ``(N, C, H, W)``, which is PyTorch's
  ``channels_last`` memory format, the layout its NHWC kernels take;
* ``"rows"``: other inputs whose channel axes come last are the matrix
  ``(rows, C)``;
* ``"planes"``: channel axes followed by others, e.g. channels first, are
  ``(outer, C, inner)``.

Measured per shape, the kernel beat a custom ``autograd.Function`` of
element-wise ops and Keras's own formulation everywhere but at channels-last
inputs with few channels that are not a multiple of the CPU's vector width
(the lecture CNN's (32, 24, 24, 10)), where the kernel runs its scalar path.
There training takes ``"matvec"``: the ``(rows, C)`` matrix, summed by
matrix-vector products in one ``autograd.Function``
(:class:`_MatVecBatchNorm`), 1.6 times faster there on two threads.

The kernel keeps the batch mean and the unbiased batch variance in the
running buffers that it is handed (momentum 1 replaces their contents); the
variance is scaled by ``(n - 1) / n`` to the biased one that the moving
average takes. That is exact to float32 rounding, unlike ``1 / invstd**2 -
epsilon`` from the kernel's saved inverse deviation, which loses the
variance wherever it is small next to epsilon. The kernel computes the
variance around its float32 mean, so where a channel's mean is more than
``FAR_MEAN`` spreads from zero, one more pass over the input recomputes the
statistics around that mean, as :mod:`kerasbn.ops` does around a sample
(see :func:`_refine`). Deciding that reads one boolean from the device.

Inference is one ``torch.batch_norm`` call with the given statistics on the
same views. Outputs are float32 (float64 for float64 inputs), as :mod:`kerasbn.ops`
returns them, also for float16 and bfloat16 inputs, which are cast to
float32 first; the statistics returned in training carry no gradient (the
layer feeds them only to its moving averages), while the gradients of the
output are PyTorch's exact ones.

Declined (:func:`applies` is False and :mod:`kerasbn.ops` serves the call):

* a mask;
* non-floating inputs, and anything that is not a ``torch.Tensor``;
* an empty input;
* channel axes that are not adjacent, e.g. ``axis=[1, 3]`` or the grouping of
  ghost batches;
* no reduction axis.

In inference the generic path also serves statistics that require a gradient
(the kernel has none for them).

Synchronized statistics: :func:`global_moments` merges each process's
moments over ``torch.distributed`` (see there); the layer computes the local
moments and the output with :mod:`kerasbn.ops`, as it does renormalization.

Example:
    >>> import torch
    >>> x = torch.randn(8, 4, 4, 3)
    >>> applies(x, [0, 1, 2]), applies(x.to(torch.int32), [0, 1, 2])
    (True, False)
    >>> y, mean, var = batch_normalize(x, [0, 1, 2], None, None, 1e-3)
    >>> tuple(y.shape), tuple(mean.shape)
    ((8, 4, 4, 3), (1, 1, 1, 3))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from kerasbn import backends, ops

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FAR_MEAN = 100.0  # spreads from zero beyond which the kernel's mean is refined
MATVEC_MIN_SAMPLES = 4096  # values per channel from which "matvec" may serve


class _View(NamedTuple):
    """The input seen as ``(outer, channels, inner)``.

    Attributes:
        start, stop: the channel axes are ``start .. stop - 1``.
        outer, channels, inner: the products of the sizes before, of and
            after the channel axes.
        layout: how the kernel sees the input (see :func:`formulation`).
    """

    start: int
    stop: int
    outer: int
    channels: int
    inner: int
    layout: str


def _view(shape: Sequence[int], channel_axes: Sequence[int]) -> _View | None:
    """The view for adjacent channel axes, else None."""
    axes = sorted(channel_axes)
    if not axes or axes != list(range(axes[0], axes[-1] + 1)):
        return None
    start, stop = axes[0], axes[-1] + 1
    outer, channels = math.prod(shape[:start]), math.prod(shape[start:stop])
    inner = math.prod(shape[stop:])
    layout = _layout(len(shape), start, stop, outer * inner, channels)
    return _View(start, stop, outer, channels, inner, layout)


def _layout(rank: int, start: int, stop: int, samples: int, channels: int) -> str:
    """How a rank-``rank`` input with channel axes ``start:stop`` is computed.

    ``samples`` is the number of values per channel. See :func:`formulation`.
    """
    if stop < rank:
        return "planes"
    if MATVEC_MIN_SAMPLES <= samples and channels < 32 and channels % 8:
        return "matvec"
    if rank in (4, 5) and start == rank - 1:
        return "channels_last"
    return "rows"


def _view_of_reduction(shape: Sequence[int], axes: Sequence[int]) -> _View | None:
    channel_axes = backends.channels_of_reduction(len(shape), axes)
    return None if channel_axes is None else _view(shape, channel_axes)


def applies(x, axes: Sequence[int], mask=None) -> bool:
    """Whether this module computes the call exactly.

    Args:
        x: the input.
        axes: the reduction axes.
        mask: the broadcastable mask, or None.

    Returns:
        True for non-empty float16, bfloat16, float32 and float64 tensors
        without a mask whose channel axes (those not in ``axes``) are
        adjacent.

    Example:
        >>> x = torch.zeros(8, 5, 3)
        >>> applies(x, [0]), applies(x, [1]), applies(x, [0], mask=x > 0)
        (True, False, False)
    """
    if mask is not None or not isinstance(x, torch.Tensor):
        return False
    if x.dtype not in DTYPES or x.numel() == 0:
        return False
    return _view_of_reduction(x.shape, axes) is not None


def formulation(shape: Sequence[int], axes: Sequence[int]) -> str:
    """How the kernel sees an input of ``shape`` reduced over ``axes``.

    Args:
        shape: the input's shape.
        axes: the reduction axes; the call must be one that :func:`applies`
            accepts.

    Returns:
        ``"channels_last"`` (a 4-D or 5-D input with its channels last,
        permuted to PyTorch's ``channels_last`` memory format), ``"rows"``
        (other channels-last inputs as a ``(rows, C)`` matrix),
        ``"planes"`` (``(outer, C, inner)``, e.g. channels first), or
        ``"matvec"`` (channels last, fewer than 32 of them and not a multiple
        of 8, at least ``MATVEC_MIN_SAMPLES`` values each: training computes
        the sums as matrix-vector products, see :class:`_MatVecBatchNorm`).

    Example:
        >>> formulation((32, 56, 56, 64), [0, 1, 2])
        'channels_last'
        >>> formulation((32, 64, 56, 56), [0, 2, 3])
        'planes'
        >>> formulation((32, 100), [0]), formulation((32, 24, 24, 10), [0, 1, 2])
        ('rows', 'matvec')
    """
    return _view_of_reduction(tuple(shape), axes).layout


# ------------------------------------------------------------------- layouts
def _kernel_dtype(x) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kernel_view(x, view: _View):
    """``x`` in the dtype and layout that the kernel takes (no copy if it can)."""
    x = x.to(_kernel_dtype(x))
    if view.layout == "channels_last":
        return x.movedim(-1, 1)
    shape = (
        (view.outer, view.channels)
        if view.layout in ("rows", "matvec")
        else (view.outer, view.channels, view.inner)
    )
    return x if x.shape == shape else x.reshape(shape)


def _restore(y, shape, view: _View):
    """The kernel's output ``y`` back in the input's ``shape``."""
    if view.layout == "channels_last":
        return y.movedim(1, -1)
    return y if y.shape == shape else y.reshape(shape)


def _statistics_shape(shape, view: _View) -> list[int]:
    """The keepdims shape of the statistics: size 1 on the reduced axes."""
    return [d if view.start <= a < view.stop else 1 for a, d in enumerate(shape)]


def _channel_vector(value, view: _View, shape, dtype):
    """A broadcastable per-channel ``value`` as a ``(C,)`` vector, or None."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    value = value.to(dtype)
    if value.numel() != view.channels:  # e.g. a scalar
        value = value.broadcast_to(_statistics_shape(shape, view))
    return value.reshape(view.channels)


def _batch_norm(x, weight, bias, mean, variance, training, momentum, epsilon):
    """``torch.batch_norm``, what ``torch.nn.functional.batch_norm`` calls.

    Called directly, it skips that wrapper's Python checks (the layer has
    made them) and accepts ``epsilon=0`` as :mod:`kerasbn.ops` does.
    """
    return torch.batch_norm(
        x,
        weight,
        bias,
        mean,
        variance,
        training,
        momentum,
        epsilon,
        torch.backends.cudnn.enabled,
    )


def _refine(xv, mean, variance):
    """The kernel's statistics, made exact where the mean is far from zero.

    The kernel sums squared deviations from its float32 mean, so its variance
    is too large by the square of that mean's rounding: a relative error near
    ``(eps * mean)**2 / variance`` (2e-3 for a mean of 1e4 and a spread of
    1e-2, more where the kernel's mean is off by more than its rounding).
    Where some channel's mean exceeds ``FAR_MEAN`` spreads, the deviations
    from the kernel's mean, exact in float32 there, give the variance and the
    mean's correction in one ``var_mean``; elsewhere (almost always) this
    costs one comparison of two ``(C,)`` vectors.
    """
    if xv.device.type == "meta":
        return mean, variance
    if not torch.gt(mean.square(), variance * FAR_MEAN**2).any():
        return mean, variance
    shape = [1] * xv.dim()
    shape[1] = -1
    dims = [d for d in range(xv.dim()) if d != 1]
    variance, offset = torch.var_mean(
        xv.detach() - mean.reshape(shape), dim=dims, correction=0
    )
    return mean + offset, variance


# ------------------------------------------------------------------- training
class _MatVecBatchNorm(torch.autograd.Function):
    """BN of a ``(rows, C)`` matrix with its sums as matrix-vector products.

    PyTorch's CPU kernel vectorizes over channels, so a channel count that is
    not a multiple of the vector width runs its scalar tail: at (32, 24, 24,
    10) the kernel's train step took 1.44 ms on two threads (0.93 ms on one)
    where this took 0.88 ms (0.84 ms), about what Keras's own formulation
    costs. ``ones @ t`` sums the rows with BLAS, vectorized and threaded.
    As in :mod:`kerasbn.ops`, the sums are of ``d = x - shift`` with the first
    row as the shift, exact where the mean dwarfs the spread; the backward
    pass recomputes ``d`` rather than keeping a copy of the input alive.

    ``forward(x, gamma, beta, epsilon) -> (y, mean, variance)``; gamma and
    beta are ``(C,)`` tensors, the statistics carry no gradient.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, epsilon):
        n = x.shape[0]
        ones = x.new_ones(1, n)
        shift = x[:1]
        d = x - shift
        offset = (ones @ d)[0] / n
        variance = ((ones @ (d * d))[0] / n - offset * offset).clamp_min(0.0)
        inv = torch.rsqrt(variance + epsilon)
        scale = gamma * inv
        y = torch.addcmul(beta - offset * scale, d, scale)
        mean = shift[0] + offset
        ctx.save_for_backward(x, shift, offset, inv, scale)
        ctx.mark_non_differentiable(mean, variance)
        return y, mean, variance

    @staticmethod
    def backward(ctx, dy, _mean, _variance):
        x, shift, offset, inv, scale = ctx.saved_tensors
        n = x.shape[0]
        ones = x.new_ones(1, n)
        d = x - shift
        dbeta = (ones @ dy)[0]
        projection = (ones @ (dy * d))[0] - offset * dbeta
        slope = scale * inv * inv * projection / n
        constant = scale * dbeta / n - offset * slope
        dx = dy * scale - torch.addcmul(constant, d, slope)
        return dx, projection * inv, dbeta, None


def _kernel_batch_normalize(xv, gamma, beta, epsilon: float, view: _View):
    """``(y, mean, variance)`` of the view ``xv`` from ``torch.batch_norm``."""
    # Momentum 1 overwrites these with the batch mean and unbiased variance.
    running_mean = torch.zeros(view.channels, dtype=xv.dtype, device=xv.device)
    running_var = torch.zeros(view.channels, dtype=xv.dtype, device=xv.device)
    y = _batch_norm(
        xv,
        gamma,
        beta,
        running_mean,
        running_var,
        training=True,
        momentum=1.0,
        epsilon=epsilon,
    )
    n = xv.numel() // view.channels
    return (y, *_refine(xv, running_mean, running_var * ((n - 1) / n)))


def batch_normalize(x, axes: Sequence[int], gamma, beta, epsilon: float, mask=None):
    """Training-mode batch normalization, as :func:`kerasbn.ops.batch_normalize`.

    Args:
        x: input tensor; :func:`applies` must accept the call.
        axes: the reduction axes.
        gamma, beta: scale and offset broadcastable to ``x``, or None.
        epsilon: added to the variance.
        mask: must be None.

    Returns:
        ``(y, mean, variance)``: the output in float32 (float64 for float64
        inputs), and the batch mean and biased variance in that dtype with
        the reduced axes kept (no gradient).

    Raises:
        ValueError: if :func:`applies` declines the call.

    Example:
        >>> x = torch.tensor([[0.0], [2.0]])
        >>> y, mean, var = batch_normalize(x, [0], None, None, 0.0)
        >>> [round(float(v), 6) for v in (y[0, 0], y[1, 0], mean[0, 0], var[0, 0])]
        [-1.0, 1.0, 1.0, 1.0]
    """
    if not applies(x, axes, mask):
        raise ValueError(
            f"The torch fast path does not apply to this call (dtype "
            f"{getattr(x, 'dtype', type(x).__name__)}, shape "
            f"{tuple(getattr(x, 'shape', ()))}, axes {list(axes)}, mask "
            f"{'given' if mask is not None else 'None'}); use kerasbn.ops."
        )
    shape = tuple(x.shape)
    view = _view_of_reduction(shape, axes)
    xv = _kernel_view(x, view)
    gamma = _channel_vector(gamma, view, shape, xv.dtype)
    beta = _channel_vector(beta, view, shape, xv.dtype)
    if view.layout == "matvec":
        if gamma is None:
            gamma = xv.new_ones(view.channels)
        if beta is None:
            beta = xv.new_zeros(view.channels)
        y, mean, variance = _MatVecBatchNorm.apply(xv, gamma, beta, epsilon)
    else:
        y, mean, variance = _kernel_batch_normalize(xv, gamma, beta, epsilon, view)
    statistics_shape = _statistics_shape(shape, view)
    return (
        _restore(y, shape, view),
        mean.reshape(statistics_shape),
        variance.reshape(statistics_shape),
    )


# ------------------------------------------------------------------ inference
def normalize(x, mean, variance, gamma, beta, epsilon: float):
    """Inference-mode normalization, as :func:`kerasbn.ops.normalize`.

    One ``torch.batch_norm`` call with the given statistics; the generic
    :func:`kerasbn.ops.normalize` where the view does not apply or the
    statistics require a gradient.

    Args:
        x: input tensor.
        mean, variance: per-channel statistics broadcastable to ``x``: the
            layer's weights as they are where the channels trail, else with
            ``x``'s rank and size 1 on the reduced axes.
        gamma, beta: scale and offset broadcastable to ``x``, or None.
        epsilon: added to the variance.

    Returns:
        ``gamma * (x - mean) / sqrt(variance + epsilon) + beta`` in float32
        (float64 for float64 inputs).

    Example:
        >>> x = torch.tensor([[0.0], [2.0]])
        >>> normalize(x, torch.ones(1, 1), torch.ones(1, 1), None, None, 0.0)
        tensor([[-1.],
                [ 1.]])
    """
    view = _inference_view(x, mean, variance)
    if view is None:
        return ops.normalize(x, mean, variance, gamma, beta, epsilon)
    shape = tuple(x.shape)
    xv = _kernel_view(x, view)
    dtype = xv.dtype
    y = _batch_norm(
        xv,
        _channel_vector(gamma, view, shape, dtype),
        _channel_vector(beta, view, shape, dtype),
        _channel_vector(mean, view, shape, dtype),
        _channel_vector(variance, view, shape, dtype),
        training=False,
        momentum=0.0,
        epsilon=epsilon,
    )
    return _restore(y, shape, view)


def _inference_view(x, mean, variance) -> _View | None:
    """The view whose channel axes are those along which ``mean`` varies.

    None where the kernel cannot serve the call: another dtype, an empty
    input, statistics that are not tensors, that have a higher rank than
    ``x`` or that require a gradient.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in DTYPES or x.numel() == 0:
        return None
    for statistic in (mean, variance):
        if not isinstance(statistic, torch.Tensor) or statistic.requires_grad:
            return None
    channel_axes = backends.channels_of_statistic(mean.shape, x.dim())
    return None if channel_axes is None else _view(tuple(x.shape), channel_axes)


# ------------------------------------------------ synchronized statistics
def global_moments(local: ops.Moments) -> ops.Moments:
    """Merges the local moments of every ``torch.distributed`` process.

    With an initialized process group of more than one process, one
    ``all_gather`` brings every process's shifted moments ``(count, shift,
    offset, m2)`` to every process, and :func:`kerasbn.ops.combine_moments`
    merges them exactly (Chan et al.), weighted by the counts, so uneven or
    empty local batches give the statistics of the global batch. Every
    process merges the same gathered tensor with the same ops, so all get
    bit-identical statistics. The gather is differentiable: its backward
    sums every process's gradient for each process's moments (one
    ``all_reduce``), so each process gets the gradient of the global-batch
    BN for its own inputs, as ``torch.nn.SyncBatchNorm`` gives. Every process
    must call the layer the same number of times, as with any collective.

    Args:
        local: this process's :class:`kerasbn.ops.Moments`; all fields have
            the same shape and dtype on every process.

    Returns:
        The moments of the global batch; the local ones without a process
        group (or with one process), and on the "meta" device, where Keras
        traces shapes.

    Example:
        >>> m = ops.sufficient_moments(torch.ones(2, 3), [0])
        >>> tuple(global_moments(m).count.shape)  # no process group: local
        (1, 3)
    """
    if not _distributed() or local.count.device.type == "meta":
        return local
    gathered = _AllGather.apply(torch.stack(list(local)))
    return ops.combine_moments(ops.Moments(*gathered.unbind(1)))


def _distributed() -> bool:
    """Whether a process group of more than one process is initialized."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """``(...) -> (world_size, ...)``: every process's tensor, in rank order.

    Backward: the gradients of all processes for this process's slice,
    summed by one ``all_reduce``.
    """

    @staticmethod
    def forward(ctx, tensor):
        dist = torch.distributed
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rank = dist.get_rank()
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank]


# ------------------------------------------------------ non-finite guard
def all_finite(first, *others):
    """A scalar boolean tensor: every element of every tensor is finite.

    What :func:`kerasbn.ops.all_finite` computes, with PyTorch's own ops:
    ``first + t * 0`` is finite exactly where all are (adding 0 cannot
    overflow). Eager PyTorch pays each Keras op's dispatch (5 to 25 µs),
    which is most of a small layer's step; these are three native calls.
    The result stays on the device: nothing is read on the host.

    Example:
        >>> all_finite(torch.ones(2), torch.tensor([0.0, float("inf")]))
        tensor(False)
    """
    probe = torch.as_tensor(first)
    for t in others:
        probe = probe + torch.as_tensor(t) * 0.0
    return torch.isfinite(probe).all()
