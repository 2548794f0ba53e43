"""The PyTorch kernels: PyTorch's own fused kernel on a view that copies nothing,
and ``torch.distributed`` statistics.

A call is one ``torch.batch_norm`` (what ``torch.nn.functional.batch_norm``
calls: the ATen CPU kernels, cuDNN or MIOpen on GPUs) with its registered
autograd, on a view of the input chosen from static facts
(:func:`formulation`):

* ``"channels_last"``: a 4-D or 5-D input with its channels last,
  ``(N, H, W, C)``, permuted to ``(N, C, H, W)``: PyTorch's ``channels_last``
  memory format, the layout its NHWC kernels take;
* ``"rows"``: other inputs whose channel axes come last, as ``(rows, C)``;
* ``"planes"``: channel axes followed by others (channels first), as
  ``(outer, C, inner)``;
* ``"matvec"`` (training on the CPU only): channels-last inputs with few
  channels off the vector width (``MATVEC_MAX_CHANNELS``, not a multiple of
  ``MATVEC_CHANNEL_MULTIPLE``), where the CPU kernel runs its scalar path:
  the ``(rows, C)`` matrix summed by matrix-vector products (``ones @ t``,
  vectorized and threaded by BLAS) in one ``autograd.Function`` of the
  formulas of :mod:`kerasbn.formulas`.

In training the kernel sees ``x - shift``, the input shifted by its first
sample per channel: the kernel computes its mean in float32, and around a
large mean that mean is off by an ulp, which ``1 / sqrt(epsilon)`` amplifies.
Shifted, a constant channel is exactly 0 and a mean that dwarfs the spread
keeps its variance. The subtraction also casts float16 and bfloat16 to
float32, which the kernel needs anyway. The kernel keeps the batch mean and
the unbiased variance in the running buffers it is handed (momentum 1
replaces their contents); the variance is scaled back to the biased one
(:func:`~kerasbn.formulas.biased_variance`), exact to float32 rounding,
unlike ``1 / invstd**2 - epsilon``, which loses a variance small next to
epsilon.

Trace-safe: the formulation depends only on the rank, the channel axes and
static sizes (a symbolic dimension counts as
:data:`~kerasbn.backends.plan.NOMINAL_DIM`), inference makes no
size-dependent choice, nothing is read back from the device, and
permutations name non-negative axes, so ``torch.compile``, ``torch.export``
and ONNX exporters trace the call as they trace Keras's BN.

Outputs are float32 (float64 for float64 inputs); the statistics returned in
training carry no gradient. Declined (the generic formulas serve the call):
a mask, what is not a floating ``torch.Tensor``, an empty input, channel axes
that are not adjacent (``axis=[1, 3]``, ghost batches), no reduction axis.
Inference also falls back to :func:`kerasbn.formulas.normalize` for
statistics that require a gradient (the kernel has none for them).

Example:
    >>> x = torch.randn(8, 4, 4, 3)
    >>> plan = formulation(x.shape, [0, 1, 2])
    >>> plan.formulation, formulation(x.shape, [0, 1, 2], dtype="int32")
    ('channels_last', None)
    >>> y, mean, var = batch_normalize(x, plan, None, None, 1e-3)
    >>> tuple(y.shape), tuple(mean.shape)
    ((8, 4, 4, 3), (1, 1, 1, 3))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kerasbn import formulas
from kerasbn.backends.plan import CPU, Plan, channel_vector

__all__ = [
    "DTYPES",
    "MATVEC_CHANNEL_MULTIPLE",
    "MATVEC_MAX_CHANNELS",
    "MATVEC_MIN_SAMPLES",
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
MATVEC_MIN_SAMPLES = 4096
"""Values per channel from which ``"matvec"`` may serve."""
MATVEC_MAX_CHANNELS = 32
"""``"matvec"`` serves fewer channels than this..."""
MATVEC_CHANNEL_MULTIPLE = 8
"""...that are not a multiple of this (the CPU kernel's vector width)."""

_XP = formulas.Namespace(
    torch,
    maximum=torch.clamp_min,
    multiply_add=lambda a, b, c: torch.addcmul(c, a, b),
)


def device(x) -> str | None:
    """``x.device.type`` (``"cpu"``, ``"cuda"``, ``"meta"``...), or None for
    what is not a ``torch.Tensor``."""
    return x.device.type if isinstance(x, torch.Tensor) else None


def default_device() -> str:
    """The device type of a new tensor (``torch.get_default_device()``)."""
    return torch.empty(0).device.type


def formulation(
    shape: Sequence,
    axes: Sequence[int],
    *,
    dtype: str = "float32",
    epsilon: float = 1e-3,
    training: bool = True,
    device: str = CPU,
) -> Plan | None:
    """How the kernel sees an input of ``shape`` (see the module docstring).

    Args:
        shape: the input's shape (ints or symbolic sizes).
        axes: the reduction axes.
        dtype: the input's dtype.
        epsilon: the layer's epsilon (no choice depends on it).
        training: whether the call uses batch statistics; ``"matvec"`` is
            for training only, so inference makes no size-dependent choice.
        device: the device type; ``"matvec"`` is for the CPU only.

    Returns:
        The plan, or None for a call that the fast path declines.

    Example:
        >>> formulation((32, 56, 56, 64), [0, 1, 2]).formulation
        'channels_last'
        >>> formulation((32, 64, 56, 56), [0, 2, 3]).formulation
        'planes'
        >>> formulation((32, 100), [0]).formulation
        'rows'
        >>> formulation((32, 24, 24, 10), [0, 1, 2]).formulation
        'matvec'
        >>> formulation((32, 24, 24, 10), [0, 1, 2], device="cuda").formulation
        'channels_last'
    """
    del epsilon
    plan = Plan.of(shape, axes, device=device, training=training)
    if plan is None or dtype not in DTYPES or plan.empty:
        return None
    if not plan.channels_last:
        return plan.using("planes")
    few = (
        plan.channels < MATVEC_MAX_CHANNELS and plan.channels % MATVEC_CHANNEL_MULTIPLE
    )
    if training and device == CPU and few and plan.nominal_count >= MATVEC_MIN_SAMPLES:
        return plan.using("matvec")
    if plan.rank in (4, 5) and plan.start == plan.rank - 1:
        return plan.using("channels_last")
    return plan.using("rows")


# ------------------------------------------------------------------- layouts
def _kernel_dtype(x) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kernel_view(x, plan: Plan):
    """``x`` in the layout that the kernel takes, with channels at axis 1 (no
    copy where it can: channels last is a permutation to PyTorch's
    ``channels_last`` memory format, spelled with non-negative axes)."""
    if plan.formulation == "channels_last":
        rank = x.dim()
        return x.permute(0, rank - 1, *range(1, rank - 1))
    outer = _product(x.shape[: plan.start])
    if plan.formulation in ("rows", "matvec"):
        shape = (outer, plan.channels)
    else:
        shape = (outer, plan.channels, _product(x.shape[plan.stop :]))
    return x if tuple(x.shape) == shape else x.reshape(shape)


def _product(sizes):
    result = 1
    for size in sizes:
        result = result * size
    return result


def _restore(y, x, plan: Plan):
    """The kernel's output ``y`` back in ``x``'s shape."""
    if plan.formulation == "channels_last":
        return y.permute(0, *range(2, y.dim()), 1)
    return y if y.shape == x.shape else y.reshape(x.shape)


def _vector(value, plan: Plan, dtype, default: float | None = None):
    """A broadcastable per-channel ``value`` as a ``(C,)`` vector of ``dtype``;
    ``default`` (or None) where ``value`` is None."""
    if value is None:
        if default is None:
            return None
        return torch.full((plan.channels,), default, dtype=dtype)
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    return channel_vector(value.to(dtype), plan, torch)


def _batch_norm(x, weight, bias, mean, variance, training, momentum, epsilon):
    """``torch.batch_norm``, what ``torch.nn.functional.batch_norm`` calls.

    Called directly, it skips that wrapper's Python checks (the layer has
    made them) and accepts ``epsilon=0`` as :mod:`kerasbn.formulas` does.
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

    The sums are of ``d = x - shift`` with the first row as the shift, as in
    :mod:`kerasbn.formulas`; the backward pass recomputes ``d`` rather than
    keeping a copy of the input alive.

    ``forward(x, gamma, beta, epsilon) -> (y, mean, variance)``; gamma and
    beta are ``(C,)`` tensors, the statistics carry no gradient.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, epsilon):
        n = x.shape[0]
        ones = x.new_ones(1, n)
        shift = x[:1]
        d = x - shift
        offset, variance = formulas.shifted_statistics(
            (ones @ d)[0], (ones @ (d * d))[0], n, _XP
        )
        inv = formulas.inverse_std(variance, epsilon, _XP)
        scale, bias = formulas.affine(inv, offset, gamma, beta)
        y = formulas.normalized(d, scale, bias, _XP)
        mean = shift[0] + offset
        ctx.save_for_backward(x, shift, offset, inv, scale)
        ctx.mark_non_differentiable(mean, variance)
        return y, mean, variance

    @staticmethod
    def backward(ctx, dy, _mean, _variance):
        x, shift, offset, inv, scale = ctx.saved_tensors
        ones = x.new_ones(1, x.shape[0])
        d = x - shift
        dgamma, dbeta, slope, constant = formulas.backward_coefficients(
            (ones @ dy)[0], (ones @ (dy * d))[0], x.shape[0], offset, inv, scale
        )
        dx = formulas.input_gradient(dy, d, scale, slope, constant, _XP)
        return dx, dgamma, dbeta, None


def _kernel_batch_normalize(xv, gamma, beta, epsilon: float, plan: Plan):
    """``(y, mean, variance)`` of the view ``xv`` from ``torch.batch_norm``,
    which sees ``xv - shift`` (the subtraction casts half types on the way)."""
    dtype = _kernel_dtype(xv)
    shift = xv[formulas.shift_index(xv.dim(), [0, *range(2, xv.dim())])]
    shift = shift.detach().to(dtype)
    # Momentum 1 overwrites these with the batch mean and unbiased variance.
    running_mean = torch.zeros(plan.channels, dtype=dtype, device=xv.device)
    running_var = torch.zeros(plan.channels, dtype=dtype, device=xv.device)
    y = _batch_norm(
        xv - shift,
        gamma,
        beta,
        running_mean,
        running_var,
        training=True,
        momentum=1.0,
        epsilon=epsilon,
    )
    mean = shift.reshape(plan.channels) + running_mean
    variance = formulas.biased_variance(running_var, xv.numel() // plan.channels)
    return y, mean, variance


def batch_normalize(x, plan: Plan, gamma, beta, epsilon: float):
    """Training-mode BN of ``x`` as ``plan`` says (see :func:`formulation`).

    Args:
        x: the input tensor.
        plan: its training plan.
        gamma, beta: scale and offset broadcastable to ``x``, or None.
        epsilon: added to the variance.

    Returns:
        ``(y, mean, variance)``: the output in float32 (float64 for float64
        inputs), and the batch mean and biased variance in that dtype with
        the reduced axes kept (no gradient).

    Example:
        >>> x = torch.tensor([[0.0], [2.0]])
        >>> y, mean, var = batch_normalize(x, formulation(x.shape, [0]), None, None, 0.0)
        >>> [round(float(v), 6) for v in (y[0, 0], y[1, 0], mean[0, 0], var[0, 0])]
        [-1.0, 1.0, 1.0, 1.0]
    """
    dtype = _kernel_dtype(x)
    xv = _kernel_view(x, plan)
    if plan.formulation == "matvec":
        y, mean, variance = _MatVecBatchNorm.apply(
            xv.to(dtype),
            _vector(gamma, plan, dtype, 1.0),
            _vector(beta, plan, dtype, 0.0),
            epsilon,
        )
    else:
        y, mean, variance = _kernel_batch_normalize(
            xv, _vector(gamma, plan, dtype), _vector(beta, plan, dtype), epsilon, plan
        )
    return (
        _restore(y, x, plan),
        mean.reshape(plan.keepdims_shape),
        variance.reshape(plan.keepdims_shape),
    )


# ------------------------------------------------------------------ inference
def normalize(x, plan: Plan, mean, variance, gamma, beta, epsilon: float):
    """Inference-mode BN: one ``torch.batch_norm`` call with the given
    statistics on the plan's view (``"matvec"`` views rows), or
    :func:`kerasbn.formulas.normalize` where the statistics require a
    gradient.

    Args:
        x: the input tensor.
        plan: its inference plan.
        mean, variance, gamma, beta: per-channel values broadcastable to
            ``x`` (gamma and beta may be None).
        epsilon: added to the variance.

    Returns:
        ``gamma * (x - mean) / sqrt(variance + epsilon) + beta`` in float32
        (float64 for float64 inputs).

    Example:
        >>> x = torch.tensor([[0.0], [2.0]])
        >>> plan = formulation(x.shape, [0], training=False)
        >>> normalize(x, plan, torch.ones(1, 1), torch.ones(1, 1), None, None, 0.0)
        tensor([[-1.],
                [ 1.]])
    """
    if any(
        not isinstance(s, torch.Tensor) or s.requires_grad for s in (mean, variance)
    ):
        return formulas.normalize(x, mean, variance, gamma, beta, epsilon)
    dtype = _kernel_dtype(x)
    y = _batch_norm(
        _kernel_view(x.to(dtype), plan),
        _vector(gamma, plan, dtype),
        _vector(beta, plan, dtype),
        _vector(mean, plan, dtype),
        _vector(variance, plan, dtype),
        training=False,
        momentum=0.0,
        epsilon=epsilon,
    )
    return _restore(y, x, plan)


# ------------------------------------------------------ non-finite guard
def all_finite(first, *others):
    """A scalar boolean tensor: every element of every tensor is finite.

    ``isfinite(...).all()`` of :func:`kerasbn.formulas.finite_probe`, in
    PyTorch's own ops: eager PyTorch pays each Keras op's dispatch, which is
    much of a small layer's step. The result stays on the device.

    Example:
        >>> all_finite(torch.ones(2), torch.tensor([0.0, float("inf")]))
        tensor(False)
    """
    probe = formulas.finite_probe(
        torch.as_tensor(first), *(torch.as_tensor(t) for t in others)
    )
    return torch.isfinite(probe).all()


# ------------------------------------------------ synchronized statistics
def global_moments(local: formulas.Moments) -> formulas.Moments:
    """Merges the local moments of every ``torch.distributed`` process.

    With an initialized process group of more than one process, one
    ``all_gather`` brings every process's moments to every process, and
    :func:`kerasbn.formulas.combine_moments` merges them exactly, weighted by
    the counts, so uneven or empty local batches give the statistics of the
    global batch; every process gets bit-identical statistics. The gather is
    differentiable: its backward sums every process's gradient for each
    process's moments (one ``all_reduce``), so each process gets the gradient
    of the global-batch BN for its own inputs, as ``torch.nn.SyncBatchNorm``
    gives. Every process must call the layer the same number of times, as
    with any collective.

    Args:
        local: this process's :class:`kerasbn.formulas.Moments`; all fields
            have the same shape and dtype on every process.

    Returns:
        The moments of the global batch; the local ones without a process
        group (or with one process), and on the "meta" device, where Keras
        traces shapes.

    Example:
        >>> m = formulas.sufficient_moments(torch.ones(2, 3), [0])
        >>> tuple(global_moments(m).count.shape)  # no process group: local
        (1, 3)
    """
    if not _distributed() or local.count.device.type == "meta":
        return local
    gathered = _AllGather.apply(torch.stack(list(local)))
    return formulas.combine_moments(formulas.Moments(*gathered.unbind(1)))


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


def assert_divisible(x, group_size: int, message: str):
    """``x``: eager PyTorch knows every size, which the layer has checked."""
    del group_size, message
    return x
