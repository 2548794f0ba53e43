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

In training the kernel sees the input shifted by its first sample per
channel, ``x - shift``, as :mod:`kerasbn.ops` shifts it: the kernel
computes its mean in float32, and around a large mean that mean is off by
an ulp, which ``1 / sqrt(epsilon)`` amplifies (a constant channel of 9984
came out as 0.117 rather than 0 with ``epsilon=1e-5``). Shifted, a constant
channel is exactly 0 and a mean that dwarfs the spread keeps its variance.
The subtraction is one element-wise op (it also casts float16 and bfloat16
to float32, which the kernel needs anyway) and nothing is decided on the
host: no value is read back from the device, so ``torch.compile`` and
``torch.export`` trace the call without a data-dependent branch. The
kernel keeps the batch mean and the unbiased batch variance in the running
buffers that it is handed (momentum 1 replaces their contents); the
variance is scaled by ``(n - 1) / n`` to the biased one that the moving
average takes. That is exact to float32 rounding, unlike ``1 / invstd**2 -
epsilon`` from the kernel's saved inverse deviation, which loses the
variance wherever it is small next to epsilon.

Trace-safe choices: the formulation depends only on the rank, the channel
axes and static sizes. A symbolic dimension (``torch.export`` with
``dynamic_shapes``, ``torch.compile(dynamic=True)``) counts as
``NOMINAL_DIM`` where the size matters, and inference makes no
size-dependent choice at all. Permutations name their axes with
non-negative indices, so that ONNX exporters write a valid ``perm``.

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

import numpy as np
import torch

from kerasbn import backends, ops

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MATVEC_MIN_SAMPLES = 4096  # values per channel from which "matvec" may serve
NOMINAL_DIM = 32  # stands for a symbolic dimension when sizing the input


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


def _view(
    shape: Sequence[int],
    channel_axes: Sequence[int],
    training: bool = True,
    device: str = "cpu",
) -> _View | None:
    """The view for adjacent channel axes, else None.

    ``training`` False (inference) never takes ``"matvec"``, a training-only
    formulation, so inference makes no size-dependent choice. ``device`` is
    the input's device type (``x.device.type``).
    """
    axes = sorted(channel_axes)
    if not axes or axes != list(range(axes[0], axes[-1] + 1)):
        return None
    start, stop = axes[0], axes[-1] + 1
    outer, channels = math.prod(shape[:start]), math.prod(shape[start:stop])
    inner = math.prod(shape[stop:])
    samples = _nominal_samples(shape, start, stop) if training else 0
    layout = _layout(len(shape), start, stop, samples, channels, device)
    return _View(start, stop, outer, channels, inner, layout)


def _nominal_samples(shape: Sequence, start: int, stop: int) -> int:
    """Values per channel, a symbolic dimension counting as ``NOMINAL_DIM``.

    A plain int: comparing it with a threshold adds no guard to a trace.
    """
    sizes = [*shape[:start], *shape[stop:]]
    return math.prod(d if isinstance(d, int) else NOMINAL_DIM for d in sizes)


def _layout(
    rank: int, start: int, stop: int, samples: int, channels: int, device: str = "cpu"
) -> str:
    """How a rank-``rank`` input with channel axes ``start:stop`` is computed.

    ``samples`` is the number of values per channel (a static int, 0 in
    inference). ``"matvec"`` works around the CPU kernel's scalar tail for
    channel counts off the CPU's vector width, measured on a CPU only: on
    any other ``device`` the kernel serves (cuDNN on NVIDIA GPUs). See
    :func:`formulation`.
    """
    if stop < rank:
        return "planes"
    few = channels < 32 and channels % 8
    if device == "cpu" and MATVEC_MIN_SAMPLES <= samples and few:
        return "matvec"
    if rank in (4, 5) and start == rank - 1:
        return "channels_last"
    return "rows"


def _view_of_reduction(
    shape: Sequence[int], axes: Sequence[int], device: str = "cpu"
) -> _View | None:
    channel_axes = backends.channels_of_reduction(len(shape), axes)
    if channel_axes is None:
        return None
    return _view(shape, channel_axes, device=device)


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


def formulation(shape: Sequence[int], axes: Sequence[int], device: str = "cpu") -> str:
    """How the kernel sees an input of ``shape`` reduced over ``axes``.

    Args:
        shape: the input's shape.
        axes: the reduction axes; the call must be one that :func:`applies`
            accepts.
        device: the input's device type (``"cpu"``, ``"cuda"``...);
            ``"matvec"`` is for the CPU only.

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
        >>> formulation((32, 24, 24, 10), [0, 1, 2], device="cuda")
        'channels_last'
    """
    return _view_of_reduction(tuple(shape), axes, device).layout


# ------------------------------------------------------------------- layouts
def _kernel_dtype(x) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kernel_view(x, view: _View, cast: bool = True):
    """``x`` in the layout (and, if ``cast``, the dtype) that the kernel takes.

    No copy where it can: channels last is a permutation to PyTorch's
    ``channels_last`` memory format, spelled with non-negative axes.
    """
    if cast:
        x = x.to(_kernel_dtype(x))
    if view.layout == "channels_last":
        rank = x.dim()
        return x.permute(0, rank - 1, *range(1, rank - 1))
    shape = (
        (view.outer, view.channels)
        if view.layout in ("rows", "matvec")
        else (view.outer, view.channels, view.inner)
    )
    return x if x.shape == shape else x.reshape(shape)


def _restore(y, shape, view: _View):
    """The kernel's output ``y`` back in the input's ``shape``."""
    if view.layout == "channels_last":
        return y.permute(0, *range(2, y.dim()), 1)
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


def _first_sample(xv):
    """The first value of each channel of a kernel view (channels at axis 1)."""
    index = [slice(0, 1)] * xv.dim()
    index[1] = slice(None)
    return xv[tuple(index)].detach()


def _kernel_batch_normalize(xv, gamma, beta, epsilon: float, view: _View):
    """``(y, mean, variance)`` of the view ``xv`` from ``torch.batch_norm``.

    The kernel sees ``xv - shift`` (see the module docstring); the
    subtraction casts half types to the kernel's dtype on the way.
    """
    dtype = _kernel_dtype(xv)
    shift = _first_sample(xv).to(dtype)
    xs = xv - shift
    # Momentum 1 overwrites these with the batch mean and unbiased variance.
    running_mean = torch.zeros(view.channels, dtype=dtype, device=xv.device)
    running_var = torch.zeros(view.channels, dtype=dtype, device=xv.device)
    y = _batch_norm(
        xs,
        gamma,
        beta,
        running_mean,
        running_var,
        training=True,
        momentum=1.0,
        epsilon=epsilon,
    )
    n = xv.numel() // view.channels
    mean = shift.reshape(view.channels) + running_mean
    return y, mean, running_var * ((n - 1) / n)


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
    view = _view_of_reduction(shape, axes, x.device.type)
    # The kernel's formulation casts while it shifts; matvec casts first.
    xv = _kernel_view(x, view, cast=view.layout == "matvec")
    dtype = _kernel_dtype(x)
    gamma = _channel_vector(gamma, view, shape, dtype)
    beta = _channel_vector(beta, view, shape, dtype)
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
    if channel_axes is None:
        return None
    return _view(tuple(x.shape), channel_axes, training=False)


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


# ------------------------------------------------ host-side worker gather
def gather_workers(array: np.ndarray, variable=None) -> np.ndarray:
    """Every process's float64 ``array``, stacked in rank order, bit for bit.

    With an initialized ``torch.distributed`` process group of more than one
    process, one ``all_gather`` of float64 tensors (on the current CUDA
    device for the NCCL backend, on the CPU otherwise) brings each process's
    array to every process. Otherwise ``array[None]``. Every process must
    call it, with arrays of the same shape.

    Args:
        array: this process's array.
        variable: unused (the process group is torch's own).

    Returns:
        ``(world_size, *array.shape)`` float64.

    Example:
        >>> gather_workers(np.arange(3.0)).shape  # no process group
        (1, 3)
    """
    array = np.ascontiguousarray(array, np.float64)
    if not _distributed():
        return array[np.newaxis]
    dist = torch.distributed
    device = "cpu"
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.from_numpy(array).to(device)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.stack(parts).cpu().numpy()
