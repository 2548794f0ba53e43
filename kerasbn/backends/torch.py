"""PyTorch kernels: the fused kernel on a copy-free view; ``torch.distributed``.

A call is one ``torch.batch_norm`` (ATen's CPU kernels, cuDNN or MIOpen) with its
autograd, on the view that :func:`formulation` picks from static facts:
``"channels_last"`` (4-D and 5-D, permuted to ``(N, C, ...)``), ``"rows"``
``(rows, C)``, ``"planes"`` ``(outer, C, inner)``; or, in training on a CPU where
few channels off the kernel's vector width would take its scalar path,
``"matvec"``: ``(rows, C)`` summed by matrix-vector products of the formulas.

In training the kernel sees ``x`` minus each channel's first sample: a constant
channel stays exactly 0. Trace-safe: static choices (a symbolic size counts as
:data:`~kerasbn.backends.plan.NOMINAL_DIM`), no host reads, non-negative
permutations. Outputs are float32 (float64 for float64). Declined: a mask, what
is not a floating ``torch.Tensor``, an empty input, non-adjacent channel axes, no
reduction axis; in inference, statistics that require a gradient.

Example:
    >>> import torch
    >>> [formulation(*c).formulation for c in [((32, 64, 56, 56), [0, 2, 3]),
    ...     ((32, 100), [0]), ((32, 24, 24, 10), [0, 1, 2]), ((8, 4, 4, 3), [0, 1, 2])]]
    ['planes', 'rows', 'matvec', 'channels_last']
    >>> x = torch.randn(8, 4, 4, 3)
    >>> y, mean, var = batch_normalize(x, formulation(x.shape, [0, 1, 2]), None, None, 0.0)
    >>> tuple(y.shape), tuple(mean.shape)
    ((8, 4, 4, 3), (1, 1, 1, 3))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from kerasbn import _isa as isa
from kerasbn import formulas
from kerasbn.backends.plan import CPU, KERNEL_FUNCTIONS, Plan, channel_vector

__all__ = [*KERNEL_FUNCTIONS, "CPU_DEVICE", "DTYPES", "MATVEC", "MatVecRule"]

DTYPES = ("float16", "bfloat16", "float32", "float64")


class MatVecRule(NamedTuple):
    """When ``"matvec"`` serves on a measured instruction set: ``min_samples`` per
    channel, under ``max_channels`` channels, off ``channel_multiple`` (SIMD width);
    its view widened to rows of whole vectors of ``vector_width`` float32 lanes."""

    min_samples: int
    max_channels: int
    channel_multiple: int
    vector_width: int


MATVEC = {isa.AVX512: MatVecRule(4096, 32, 8, 16), isa.AVX2: MatVecRule(4096, 32, 8, 8)}
"""Measured per instruction set (``benchmarks/README.md``); unmeasured CPUs take
``torch.batch_norm``'s views, never slower than Keras's BN."""

_XP = formulas.Namespace(
    torch,
    maximum=torch.clamp_min,
    multiply_add=lambda a, b, c: torch.addcmul(c, a, b),
)


def device(x) -> str | None:
    """``x.device.type``, a CPU as :data:`CPU_DEVICE`."""
    if not isinstance(x, torch.Tensor):
        return None
    kind = x.device.type
    return isa.resolve(kind, CPU_DEVICE)


def default_device() -> str:
    """``torch.get_default_device()``'s type, a CPU as :data:`CPU_DEVICE`."""
    kind = torch.empty(0).device.type
    return isa.resolve(kind, CPU_DEVICE)


def _cpu_instruction_set() -> str:
    """ATen's kernels' instruction set, which ``ATEN_CPU_CAPABILITY`` caps."""
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
    """:meth:`kerasbn.backends.Kernels.formulation`; no size decides in inference.

    Eager calls look their plan up (making one costs more than a small
    ``torch.batch_norm``); under ``torch.compile`` it is made afresh, so the
    compiler guards on no cache."""
    del epsilon
    if torch.compiler.is_compiling():
        return _formulation(tuple(shape), tuple(axes), dtype, training, device)
    return _cached_formulation(tuple(shape), tuple(axes), dtype, training, device)


def _formulation(shape, axes, dtype, training, device) -> Plan | None:
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


_cached_formulation = functools.lru_cache(maxsize=1024)(_formulation)


def _kernel_dtype(x) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kernel_view(x, plan: Plan):
    """``x`` as the kernel takes it (channels at axis 1), copying nothing if it can."""
    if plan.formulation == "channels_last":
        rank = x.dim()
        return x.permute(0, rank - 1, *range(1, rank - 1))
    outer = math.prod(x.shape[: plan.start])
    if plan.formulation in ("rows", "matvec"):
        k = _widening(plan)
        shape = (outer // k, k * plan.channels)
    else:
        shape = (outer, plan.channels, math.prod(x.shape[plan.stop :]))
    return x if tuple(x.shape) == shape else x.reshape(shape)


def _widening(plan: Plan) -> int:
    """``k`` of the ``"matvec"`` kernel's view ``(rows / k, k * C)`` in training
    (:meth:`Plan.widening`); 1 elsewhere."""
    rule = MATVEC.get(isa.device_isa(plan.device))
    if plan.formulation != "matvec" or not plan.training or rule is None:
        return 1
    return plan.widening(rule.vector_width)


def _restore(y, x, plan: Plan):
    """The kernel's output ``y`` back in ``x``'s shape."""
    if plan.formulation == "channels_last":
        return y.permute(0, *range(2, y.dim()), 1)
    return y if y.shape == x.shape else y.reshape(x.shape)


def _vector(value, plan: Plan, dtype, default: float | None = None):
    """A per-channel ``value`` as ``(C,)`` of ``dtype``; ``default`` if None."""
    if value is None:
        if default is None:
            return None
        return torch.full((plan.channels,), default, dtype=dtype)
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    return channel_vector(value.to(dtype), plan, torch)


def _batch_norm(x, weight, bias, mean, variance, training, momentum, epsilon):
    """``torch.batch_norm`` without ``F.batch_norm``'s checks; ``epsilon=0`` passes."""
    cudnn = torch.backends.cudnn.enabled
    args = (x, weight, bias, mean, variance, training, momentum, epsilon, cudnn)
    return torch.batch_norm(*args)


class _MatVecBatchNorm(torch.autograd.Function):
    """BN of ``(rows, C)`` viewed as ``(rows / k, k * C)``, by matrix-vector sums:
    ``(y, mean, variance)``; the backward pass recomputes ``d = x - shift``
    rather than keep it alive."""

    @staticmethod
    def forward(ctx, x, gamma, beta, epsilon):
        n, sums, spread = _wide_sums(x, gamma.shape[0])
        shift = x[0, : gamma.shape[0]]
        d = x - spread(shift)
        offset, variance = formulas.shifted_statistics(sums(d), sums(d * d), n, _XP)
        inv = formulas.inverse_std(variance, epsilon, _XP)
        scale, bias = formulas.affine(inv, offset, gamma, beta)
        y = formulas.normalized(d, spread(scale), spread(bias), _XP)
        mean = shift + offset
        ctx.save_for_backward(x, shift, offset, inv, scale)
        ctx.mark_non_differentiable(mean, variance)
        return y, mean, variance

    @staticmethod
    def backward(ctx, dy, _mean, _variance):
        x, shift, offset, inv, scale = ctx.saved_tensors
        n, sums, spread = _wide_sums(x, shift.shape[0])
        d = x - spread(shift)
        dgamma, dbeta, slope, constant = formulas.backward_coefficients(
            sums(dy), sums(dy * d), n, offset, inv, scale
        )
        vectors = map(spread, (scale, slope, constant))
        dx = formulas.input_gradient(dy, d, *vectors, _XP)
        return dx, dgamma, dbeta, None


def _wide_sums(x, channels: int):
    """``(samples per channel, sums, spread)`` of ``x`` viewed as ``(rows / k, k *
    channels)``: ``sums`` adds rows into a ``(C,)`` vector (one matrix-vector
    product), ``spread`` tiles one ``k`` times (by ``cat``: ``repeat`` costs
    four times as much on eager PyTorch)."""
    k = x.shape[1] // channels
    ones = x.new_ones(x.shape[0])  # ones @ t: the column sums of t
    if k == 1:
        return x.shape[0], ones.__matmul__, lambda v: v
    return (
        x.shape[0] * k,
        lambda t: (ones @ t).reshape(k, channels).sum(0),
        lambda v: torch.cat([v] * k),
    )


def _kernel_batch_normalize(xv, gamma, beta, epsilon: float, plan: Plan):
    """``(y, mean, variance)`` of ``torch.batch_norm`` of ``xv - shift``; momentum 1
    hands it the unbiased variance, scaled back exactly (``1 / invstd**2 -
    epsilon`` would lose a variance small next to epsilon)."""
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
    """:meth:`kerasbn.backends.Kernels.batch_normalize`."""
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


def normalize(x, plan: Plan, mean, variance, gamma, beta, epsilon: float):
    """One ``torch.batch_norm``; the formulas where the statistics need a gradient."""
    if any(
        not isinstance(s, torch.Tensor) or s.requires_grad for s in (mean, variance)
    ):
        return formulas.normalize(x, mean, variance, gamma, beta, epsilon)
    dtype = _kernel_dtype(x)
    vectors = (_vector(v, plan, dtype) for v in (gamma, beta, mean, variance))
    xv = _kernel_view(x.to(dtype), plan)
    y = _batch_norm(xv, *vectors, False, 0.0, epsilon)
    return _restore(y, x, plan)


def all_finite(first, *others):
    """Whether ``p - p == p - p`` everywhere, ``p`` the tensors stacked where
    their shapes agree (the layer's statistics), else their
    :func:`~kerasbn.formulas.finite_probe`: ``p - p`` is 0 exactly where ``p``
    is finite and NaN elsewhere. Four small ops in all, where
    ``torch.isfinite`` alone runs four and ``t * 0.0`` wraps a Python number."""
    tensors = [torch.as_tensor(t) for t in (first, *others)]
    if all(t.shape == tensors[0].shape for t in tensors):
        probe = torch.stack(tensors)
    else:
        probe = formulas.finite_probe(*tensors)
    zeros = probe - probe
    return (zeros == zeros).all()


def moving_average(moving, value, momentum: float):
    """One ``torch.lerp(moving, value, 1 - momentum)``: ``moving * momentum``
    alone costs more, wrapping the Python number in a tensor on every call."""
    return torch.lerp(moving, value.to(moving.dtype), 1.0 - momentum)


def assign_where(usable, updates) -> None:
    """One ``torch.where`` per variable, without Keras's dispatch."""
    usable = torch.as_tensor(usable)
    with torch.no_grad():
        for variable, current, value in updates:
            variable.assign(torch.where(usable, value.to(current.dtype), current))


def global_moments(local: formulas.Moments) -> formulas.Moments:
    """:meth:`kerasbn.backends.Kernels.global_moments` by one differentiable
    ``all_gather``; ``local`` on "meta". Every process calls the layer as often."""
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


def gather_workers(array: np.ndarray, variable=None) -> np.ndarray:
    """:meth:`kerasbn.backends.Kernels.gather_workers`: one ``all_gather`` (on
    the current CUDA device under NCCL)."""
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
    """1: Keras's PyTorch trainer does not scale a loss by the replicas."""
    return 1


def jit(function):
    """``function``: a ``torch.compile`` per pass costs more than it saves."""
    return function
