"""``from_torch`` and ``to_torch``: PyTorch's batch-norm modules as kerasbn layers.

``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` differ from
Keras's conventions in four ways, each mapped here:

* momentum is the weight of the NEW value in torch (default 0.1) and of the
  OLD one in Keras (``1 - 0.1 = 0.9``);
* epsilon defaults to 1e-5 in torch and 1e-3 in Keras;
* torch moves the running variance towards the unbiased (n - 1) batch
  variance: ``unbiased_moving_variance=True``;
* torch's layout is channels first (``N, C, ...``); Keras models are
  usually channels last.

``affine=False`` is ``center=False, scale=False``, ``track_running_stats=False``
is ``statistics="batch"``, and ``SyncBatchNorm`` is ``synchronized=True``.
torch is imported only when these functions are called: they need PyTorch
installed, whatever the Keras backend.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Literal

import keras
import numpy as np

from kerasbn import _checks
from kerasbn.layer import BatchNorm

if TYPE_CHECKING:  # annotations only: torch is imported when a function is called
    import torch

DATA_FORMATS = ("channels_last", "channels_first")


def _torch():
    try:
        import torch
    except ImportError as error:  # pragma: no cover - torch is a test dependency
        raise ImportError(
            "kerasbn.from_torch and kerasbn.to_torch need PyTorch installed "
            "(`pip install torch`); the Keras backend may be any."
        ) from error
    return torch


def _complement(value: float) -> float:
    """``1 - value`` through decimals, so that ``_complement(_complement(m)) == m``
    for the momenta people write (``1 - 0.1`` gives 0.9, and 0.9 gives back
    0.1, where float arithmetic gives 0.09999999999999998)."""
    return float(Decimal(1) - Decimal(repr(float(value))))


def _ranks(torch, module) -> tuple[tuple[int, ...], int]:
    """The input ranks ``module`` accepts, and the one taken by default."""
    nn = torch.nn
    if isinstance(module, nn.SyncBatchNorm):
        return (), 4  # any rank >= 2; mostly converted 2-D conv nets
    if isinstance(module, nn.BatchNorm1d):
        return (2, 3), 2
    if isinstance(module, nn.BatchNorm2d):
        return (4,), 4
    return (5,), 5


def from_torch(
    module: torch.nn.Module,
    data_format: Literal["channels_last", "channels_first"] = "channels_last",
    *,
    input_rank: int | None = None,
) -> BatchNorm:
    """A built ``kerasbn.BatchNorm`` that computes what a torch BN module computes.

    Eval outputs are equal, and so are a training step's outputs, gradients
    and running statistics: momentum ``m`` becomes ``1 - m``, epsilon is kept,
    ``unbiased_moving_variance=True`` (torch's running variance), ``affine``
    becomes ``center`` and ``scale``, ``track_running_stats=False`` becomes
    ``statistics="batch"`` (batch statistics in eval too), and
    ``SyncBatchNorm`` becomes ``synchronized=True`` (its ``process_group`` is
    not carried: kerasbn synchronizes over the backend's engine). The weights
    and running statistics are copied; a float64 module gives a float64 layer,
    any other a float32 one. ``num_batches_tracked`` is not carried: it only
    drives ``momentum=None``, which is refused.

    Args:
        module: a ``torch.nn.BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``
            or ``SyncBatchNorm``.
        data_format: ``"channels_last"`` (the Keras layout: ``axis=-1``, for
            inputs such as ``(N, H, W, C)``) or ``"channels_first"`` (torch's
            layout, ``axis=1``).
        input_rank: the rank of the inputs the layer will see, batch
            included: 2 (``(N, C)``, the default) or 3 for ``BatchNorm1d``,
            any rank >= 2 for ``SyncBatchNorm`` (default 4); fixed for
            ``BatchNorm2d`` (4) and ``BatchNorm3d`` (5).

    Returns:
        The layer, built for ``input_rank`` with ``module.num_features``
        channels.

    Raises:
        TypeError: ``module`` is not one of the classes above.
        ValueError: ``data_format`` or ``input_rank`` is not allowed, or
            ``module.momentum`` is None (a cumulative average; set a float
            such as torch's default 0.1 first) or outside [0, 1].

    Example:
        >>> import numpy as np, torch, keras, kerasbn
        >>> bn = torch.nn.BatchNorm2d(3).eval()
        >>> layer = kerasbn.from_torch(bn)  # channels last, axis=-1
        >>> layer.momentum, layer.epsilon, layer.unbiased_moving_variance
        (0.9, 1e-05, True)
        >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype("float32")
        >>> y = bn(torch.from_numpy(x)).detach().numpy()
        >>> ours = keras.ops.convert_to_numpy(layer(np.moveaxis(x, 1, -1)))
        >>> bool(np.allclose(np.moveaxis(ours, -1, 1), y, atol=1e-6))
        True
    """
    torch = _torch()
    nn = torch.nn
    classes = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    if not isinstance(module, classes):
        raise TypeError(
            "`module` must be a torch.nn.BatchNorm1d, BatchNorm2d, BatchNorm3d or "
            f"SyncBatchNorm; got {type(module).__name__}."
        )
    if data_format not in DATA_FORMATS:
        raise ValueError(
            f"`data_format` must be one of {list(DATA_FORMATS)}; got "
            f"data_format={data_format!r}."
        )
    allowed, default_rank = _ranks(torch, module)
    rank = default_rank if input_rank is None else input_rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 2:
        raise ValueError(f"`input_rank` must be an int >= 2; got input_rank={rank!r}.")
    if allowed and rank not in allowed:
        raise ValueError(
            f"`input_rank` must be one of {list(allowed)} for "
            f"{type(module).__name__}; got input_rank={rank}."
        )
    if module.momentum is None:
        raise ValueError(
            "`momentum=None` (torch's cumulative moving average) has no kerasbn "
            "equivalent: kerasbn keeps an exponential moving average. Set "
            "module.momentum to a float (torch's default is 0.1) before "
            "converting, or recompute the statistics afterwards with "
            "kerasbn.recalibrate (exact population statistics). Received: "
            "momentum=None."
        )
    if not 0.0 <= module.momentum <= 1.0:
        raise ValueError(
            "`momentum` of the torch module must lie in [0, 1] (kerasbn's "
            f"momentum is 1 - momentum); got momentum={module.momentum!r}."
        )
    stored = [t for t in (module.weight, module.running_mean) if t is not None]
    float64 = bool(stored) and stored[0].dtype == torch.float64
    layer = BatchNorm(
        axis=1 if data_format == "channels_first" else -1,
        momentum=_complement(module.momentum),
        epsilon=module.eps,
        center=module.affine,
        scale=module.affine,
        synchronized=isinstance(module, nn.SyncBatchNorm),
        statistics="auto" if module.track_running_stats else "batch",
        unbiased_moving_variance=True,
        dtype="float64" if float64 else None,
    )
    shape = [None] * rank
    shape[1 if data_format == "channels_first" else -1] = module.num_features
    layer.build(tuple(shape))

    def value(tensor):
        return tensor.detach().cpu().numpy()

    if module.affine:
        layer.gamma.assign(value(module.weight).astype(layer.gamma.dtype))
        layer.beta.assign(value(module.bias).astype(layer.beta.dtype))
    if module.track_running_stats:
        mean, var = value(module.running_mean), value(module.running_var)
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(var.astype(layer.moving_variance.dtype))
    return layer


def to_torch(layer: BatchNorm) -> torch.nn.Module:
    """A ``torch.nn`` BN module that computes what a built ``kerasbn.BatchNorm`` does.

    The inverse of :func:`from_torch`: ``BatchNorm1d`` for inputs of rank 2
    or 3, ``BatchNorm2d`` for rank 4, ``BatchNorm3d`` for rank 5 and
    ``SyncBatchNorm`` for ``synchronized=True``, with momentum ``1 -
    layer.momentum``, the layer's epsilon, weights and moving statistics,
    ``track_running_stats=False`` for ``statistics="batch"``, in training
    mode (call ``.eval()`` for inference). The module takes channels-first
    inputs whatever the layer's axis (1 or -1). torch always moves its running
    variance towards the unbiased batch variance; a layer with
    ``unbiased_moving_variance=False`` (Keras's convention) converts with the
    same numbers, and its further training in torch follows torch's
    convention. A layer with only one of ``center`` and ``scale`` becomes an
    affine module whose other parameter is fixed (1 or 0,
    ``requires_grad=False``). ``num_batches_tracked`` starts at 0.

    Args:
        layer: a built ``kerasbn.BatchNorm``.

    Returns:
        The ``torch.nn`` module, float64 where the layer's statistics are.

    Raises:
        TypeError: ``layer`` is not a ``kerasbn.BatchNorm``.
        ValueError: the layer is not built, or has what torch's modules
            cannot express: an axis other than the channels-first or
            channels-last one, ``virtual_batch_size``, ``renorm``, or
            ``statistics="moving"`` (a torch module follows ``train()`` and
            ``eval()``; keep it in ``eval()`` mode instead).

    Example:
        >>> import numpy as np, torch, kerasbn
        >>> layer = kerasbn.BatchNorm(momentum=0.9, epsilon=1e-5)
        >>> layer.build((None, 8, 8, 3))
        >>> bn = kerasbn.to_torch(layer)
        >>> type(bn).__name__, bn.momentum, bn.eps, bn.num_features
        ('BatchNorm2d', 0.1, 1e-05, 3)
    """
    torch = _torch()
    if not isinstance(layer, BatchNorm):
        raise TypeError(
            f"`layer` must be a kerasbn.BatchNorm; got {type(layer).__name__}."
        )
    if not layer.built:
        raise ValueError(
            f"to_torch needs a built layer (its input rank and channel count); "
            f"{layer.name!r} is not built. Call it on an input or build it first."
        )
    input_shape = layer.get_build_config()["input_shape"]
    rank = len(input_shape)
    channels = _checks.channel_axes(layer.axis, input_shape)
    if channels not in ([1], [rank - 1]):
        raise ValueError(
            "torch's BN modules normalize one channel axis, first or last; got "
            f"axis={layer.axis!r} for inputs of rank {rank}."
        )
    for name, value, allowed in (
        ("virtual_batch_size", layer.virtual_batch_size, None),
        ("renorm", layer.renorm, False),
    ):
        if value != allowed:
            raise ValueError(
                f"torch's BN modules have no `{name}`; got {name}={value!r} "
                f"(allowed: {allowed!r})."
            )
    if layer.statistics == "moving":
        raise ValueError(
            "torch's BN modules have no statistics='moving': they use batch "
            "statistics in train() and running ones in eval(). Convert the layer "
            "with statistics='auto' and keep the module in eval() mode. Got "
            "statistics='moving'."
        )
    nn = torch.nn
    by_rank = {
        2: nn.BatchNorm1d,
        3: nn.BatchNorm1d,
        4: nn.BatchNorm2d,
        5: nn.BatchNorm3d,
    }
    cls = nn.SyncBatchNorm if layer.synchronized else by_rank.get(rank)
    if cls is None:
        raise ValueError(
            "torch's BatchNorm1d/2d/3d take inputs of rank 2 to 5; the layer was "
            f"built for rank {rank} (with synchronized=True it becomes a "
            "SyncBatchNorm, which takes any rank)."
        )
    dtype = keras.backend.standardize_dtype(layer.moving_mean.dtype)
    num_features = int(layer.moving_mean.shape[0])
    module = cls(
        num_features,
        eps=layer.epsilon,
        momentum=_complement(layer.momentum),
        affine=layer.center or layer.scale,
        track_running_stats=layer.statistics != "batch",
        dtype=getattr(torch, dtype),
    )

    def tensor(weight):
        return torch.from_numpy(np.array(keras.ops.convert_to_numpy(weight)))

    with torch.no_grad():
        if module.affine:
            for parameter, weight in (
                (module.weight, layer.gamma),
                (module.bias, layer.beta),
            ):
                if weight is None:  # fixed at its initial 1 (weight) or 0 (bias)
                    parameter.requires_grad_(False)
                else:
                    parameter.copy_(tensor(weight))
        if module.track_running_stats:
            module.running_mean.copy_(tensor(layer.moving_mean))
            module.running_var.copy_(tensor(layer.moving_variance))
    return module
