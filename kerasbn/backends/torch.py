"""The PyTorch kernels: PyTorch's fused kernel on a view that copies nothing,
and ``torch.distributed`` statistics.

A call is one ``torch.batch_norm`` (the ATen CPU kernels, cuDNN or MIOpen)
with its registered autograd, on a view chosen from static facts
(:func:`formulation`): ``"channels_last"`` (4-D and 5-D channels-last inputs
permuted to ``(N, C, ...)``, PyTorch's ``channels_last`` memory format),
``"rows"`` (other channels-last inputs as ``(rows, C)``), ``"planes"``
(``(outer, C, inner)``, e.g. channels first), or, in training on the CPU,
``"matvec"``: for few channels off the CPU kernel's vector width, where it
runs its scalar path, the ``(rows, C)`` matrix summed by matrix-vector
products (BLAS) in one ``autograd.Function`` of :mod:`kerasbn.formulas`.

In training the kernel sees ``x - shift`` (the first sample per channel): its
float32 mean of a large-mean input is off by an ulp, which ``1 / sqrt(
epsilon)`` amplifies, while the shifted input keeps a constant channel at
exactly 0. Its running buffers, handed over with momentum 1, receive the
batch mean and the unbiased variance, scaled back exactly
(:func:`~kerasbn.formulas.biased_variance`; ``1 / invstd**2 - epsilon``
would lose a variance small next to epsilon).

Trace-safe: choices depend on the rank, the axes and static sizes (a
symbolic one counts as :data:`~kerasbn.backends.plan.NOMINAL_DIM`), nothing
is read on the host, and permutations name non-negative axes, so
``torch.compile``, ``torch.export`` and ONNX exporters trace the call.
Outputs are float32 (float64 for float64 inputs). Declined: a mask, what is
not a floating ``torch.Tensor``, an empty input, channel axes that are not
adjacent, no reduction axis; inference also leaves statistics that require a
gradient to :func:`kerasbn.formulas.normalize`.

Example:
    >>> import torch
    >>> x = torch.randn(8, 4, 4, 3)
    >>> plan = formulation(x.shape, [0, 1, 2])
    >>> plan.formulation, formulation(x.shape, [0, 1, 2], dtype="int32")
    ('channels_last', None)
    >>> y, mean, var = batch_normalize(x, plan, None, None, 1e-3)
    >>> tuple(y.shape), tuple(mean.shape)
    ((8, 4, 4, 3), (1, 1, 1, 3))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from kerasbn import _isa as isa
from kerasbn import formulas
from kerasbn.backends.plan import CPU, KERNEL_FUNCTIONS, Plan, channel_vector

__all__ = [
    *KERNEL_FUNCTIONS,
    "CPU_DEVICE",
    "DTYPES",
    "MATVEC",
    "MatVecRule",
]

DTYPES = ("float16", "bfloat16", "float32", "float64")


class MatVecRule(NamedTuple):
    """When ``"matvec"`` serves a training call on one instruction set: from
    ``min_samples`` values per channel, for fewer than ``max_channels``
    channels that are not a multiple of ``channel_multiple`` (the CPU
    kernel's vector width, below which it runs scalar code)."""

    min_samples: int
    max_channels: int
    channel_multiple: int


MATVEC = {isa.AVX512: MatVecRule(4096, 32, 8), isa.AVX2: MatVecRule(4096, 32, 8)}
"""The ``"matvec"`` rule of each instruction set it was measured on; other
CPUs take ``torch.batch_norm``'s views."""

_XP = formulas.Namespace(
    torch,
    maximum=torch.clamp_min,
    multiply_add=lambda a, b, c: torch.addcmul(c, a, b),
)


def device(x) -> str | None:
    """``x.device.type`` (a CPU as :data:`CPU_DEVICE`), or None for what is
    not a ``torch.Tensor``."""
    if not isinstance(x, torch.Tensor):
        return None
    kind = x.device.type
    return CPU_DEVICE if kind == CPU else kind


def default_device() -> str:
    """The device of a new tensor (``torch.get_default_device()``), a CPU as
    :data:`CPU_DEVICE`."""
    kind = torch.empty(0).device.type
    return CPU_DEVICE if kind == CPU else kind


def _cpu_instruction_set() -> str:
    """What ATen's CPU kernels were dispatched to: PyTorch's own report
    (``torch.backends.cpu.get_cpu_capability()``, which
    ``ATEN_CPU_CAPABILITY`` caps)."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # PyTorch < 2.1
        return isa.instruction_set()
    return {"AVX512": isa.AVX512, "AVX2": isa.AVX2}.get(capability, isa.OTHER)


CPU_DEVICE = isa.cpu_device(_cpu_instruction_set())
"""This process's CPU: the instruction set of ATen's CPU kernels."""


def formulation(
    shape: Sequence,
    axes: Sequence[int],
    *,
    dtype: str = "float32",
    epsilon: float = 1e-3,
    training: bool = True,
    device: str = CPU,
) -> Plan | None:
    """The plan of a call (see :class:`kerasbn.backends.Kernels`): the view
    the kernel takes; ``"matvec"`` in training on the CPU only, so that
    inference makes no size-dependent choice.

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
    device = isa.resolve(device, CPU_DEVICE)
    plan = Plan.of(shape, axes, device=device, training=training)
    if plan is None or dtype not in DTYPES or plan.empty:
        return None
    if not plan.channels_last:
        return plan.using("planes")
    rule = MATVEC.get(isa.device_isa(device)) if training else None
    if (
        rule
        and plan.channels < rule.max_channels
        and plan.channels % rule.channel_multiple
        and plan.nominal_count >= rule.min_samples
    ):
        return plan.using("matvec")
    if plan.rank in (4, 5) and plan.start == plan.rank - 1:
        return plan.using("channels_last")
    return plan.using("rows")


# ------------------------------------------------------------------- layouts
def _kernel_dtype(x) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kernel_view(x, plan: Plan):
    """``x`` as the kernel takes it, channels at axis 1, with no copy where it
    can (channels last is a permutation, with non-negative axes)."""
    if plan.formulation == "channels_last":
        rank = x.dim()
        return x.permute(0, rank - 1, *range(1, rank - 1))
    outer = math.prod(x.shape[: plan.start])
    if plan.formulation in ("rows", "matvec"):
        shape = (outer, plan.channels)
    else:
        shape = (outer, plan.channels, math.prod(x.shape[plan.stop :]))
    return x if tuple(x.shape) == shape else x.reshape(shape)


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
    """``torch.batch_norm`` itself: without ``torch.nn.functional``'s Python
    checks (the layer made them), and with ``epsilon=0`` allowed."""
    cudnn = torch.backends.cudnn.enabled
    args = (x, weight, bias, mean, variance, training, momentum, epsilon, cudnn)
    return torch.batch_norm(*args)


# ------------------------------------------------------------------- training
class _MatVecBatchNorm(torch.autograd.Function):
    """BN of a ``(rows, C)`` matrix, its sums matrix-vector products:
    ``forward(x, gamma, beta, epsilon) -> (y, mean, variance)`` with ``(C,)``
    gamma and beta. The backward pass recomputes ``d = x - shift`` rather
    than keep a copy alive."""

    @staticmethod
    def forward(ctx, x, gamma, beta, epsilon):
        n = x.shape[0]
        ones = x.new_ones(n)  # ones @ t: the column sums of t, as a (C,) vector
        shift = x[0]
        d = x - shift
        offset, variance = formulas.shifted_statistics(ones @ d, ones @ (d * d), n, _XP)
        inv = formulas.inverse_std(variance, epsilon, _XP)
        scale, bias = formulas.affine(inv, offset, gamma, beta)
        y = formulas.normalized(d, scale, bias, _XP)
        mean = shift + offset
        ctx.save_for_backward(x, shift, offset, inv, scale)
        ctx.mark_non_differentiable(mean, variance)
        return y, mean, variance

    @staticmethod
    def backward(ctx, dy, _mean, _variance):
        x, shift, offset, inv, scale = ctx.saved_tensors
        ones = x.new_ones(x.shape[0])
        d = x - shift
        dgamma, dbeta, slope, constant = formulas.backward_coefficients(
            ones @ dy, ones @ (dy * d), x.shape[0], offset, inv, scale
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
        xv - shift, gamma, beta, running_mean, running_var, True, 1.0, epsilon
    )
    mean = shift.reshape(plan.channels) + running_mean
    variance = formulas.biased_variance(running_var, xv.numel() // plan.channels)
    return y, mean, variance


def batch_normalize(x, plan: Plan, gamma, beta, epsilon: float):
    """Training-mode BN of ``x`` as ``plan`` says: ``(y, mean, variance)`` as
    :func:`kerasbn.formulas.batch_normalize` returns them.

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
    """Inference-mode BN as :func:`kerasbn.formulas.normalize`: one
    ``torch.batch_norm`` on the plan's view, or that function itself where the
    statistics require a gradient (the kernel has none for them).

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
    vectors = (_vector(v, plan, dtype) for v in (gamma, beta, mean, variance))
    xv = _kernel_view(x.to(dtype), plan)
    y = _batch_norm(xv, *vectors, False, 0.0, epsilon)
    return _restore(y, x, plan)


# ------------------------------------------------------ non-finite guard
def all_finite(first, *others):
    """A scalar boolean tensor, on the device: ``isfinite(...).all()`` of
    :func:`kerasbn.formulas.finite_probe`, in PyTorch's ops (eager PyTorch
    pays each Keras op's dispatch).

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
    """The moments of all ``torch.distributed`` processes; ``local`` without a
    group of several processes, and on the "meta" device (Keras's tracing).

    One differentiable ``all_gather`` brings every process's moments to every
    process, and :func:`kerasbn.formulas.combine_moments` merges them exactly,
    weighted by the counts: bit-identical statistics of the global batch, and
    each process gets the gradient of the global-batch BN for its inputs, as
    with ``torch.nn.SyncBatchNorm``. Every process calls the layer as often.

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
    """``(...) -> (world_size, ...)``, in rank order; backward sums every
    process's gradient for this process's slice (one ``all_reduce``)."""

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


def replicas_in_sync() -> int:
    """1: Keras's PyTorch trainer does not scale a loss by the replicas.

    Example:
        >>> replicas_in_sync()
        1
    """
    return 1


def jit(function):
    """``function`` itself: eager PyTorch ops need no compiling, and a
    ``torch.compile`` of a model per pass costs more than it saves.

    Example:
        >>> jit(abs) is abs
        True
    """
    return function
