"""Argument and input checks of :class:`kerasbn.BatchNorm`.

Every error names the argument, the value received and what is allowed. Where
``keras.layers.BatchNormalization`` raises for the same bad argument or input,
the message also carries Keras's own phrase, so code and tests written against
Keras keep matching.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

__all__ = [
    "RENORM_CLIPPING_KEYS",
    "STATISTICS_MODES",
    "axis",
    "batch_has_spread",
    "channel_axes",
    "epsilon",
    "fraction",
    "mask_shape",
    "renorm_clipping",
    "statistics",
    "virtual_batch_size",
]

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
STATISTICS_MODES = ("auto", "moving", "batch")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def fraction(name: str, value) -> float:
    """``value`` as a float in [0, 1] (``momentum``, ``renorm_momentum``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number in [0, 1]; got {value!r}.")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must lie in [0, 1]; got {name}={value!r}.")
    return float(value)


def epsilon(value) -> float:
    """``value`` as a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`epsilon` must be a real number > 0; got {value!r}.")
    if not (float(value) > 0.0 and math.isfinite(value)):
        raise ValueError(f"`epsilon` must be finite and > 0; got epsilon={value!r}.")
    return float(value)


def axis(value) -> int | list[int]:
    """``value`` as an int, or a list of distinct ints."""
    if _is_int(value):
        return int(value)
    if isinstance(value, (list, tuple)) and value and all(map(_is_int, value)):
        if len(set(value)) != len(value):
            raise ValueError(f"`axis` must not repeat an axis; got axis={value!r}.")
        return [int(a) for a in value]
    raise TypeError(
        f"`axis` must be an int or a non-empty list/tuple of ints; got {value!r}."
    )


def channel_axes(axis_value, input_shape: Sequence) -> list[int]:
    """The sorted non-negative channel axes of ``axis_value`` for ``input_shape``.

    Raises:
        ValueError: an axis is out of range, named twice, or of unknown size.
    """
    ndim = len(input_shape)
    axes = axis_value if isinstance(axis_value, list) else [axis_value]
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"Axis {a} is out of bounds for input shape {tuple(input_shape)}: "
                f"`axis` must lie in {-ndim}..{ndim - 1} for an input of rank "
                f"{ndim}. Received: axis={axis_value!r}."
            )
    result = sorted(a % ndim for a in axes)
    if len(set(result)) != len(result):
        raise ValueError(
            f"`axis` names the same axis twice for rank {ndim}: axis={axis_value!r}."
        )
    unknown = [a for a in result if input_shape[a] is None]
    if unknown:
        raise ValueError(
            f"The normalized axis {unknown[0]} of input shape {tuple(input_shape)}"
            " has an unknown (None) size. Shapes used to initialize variables "
            "must be fully-defined: BatchNorm needs that size at build time."
        )
    return result


def statistics(value) -> str:
    """``value`` as one of :data:`STATISTICS_MODES`."""
    if not isinstance(value, str) or value not in STATISTICS_MODES:
        raise ValueError(
            f"`statistics` must be one of {list(STATISTICS_MODES)}; got "
            f"statistics={value!r}."
        )
    return value


def virtual_batch_size(value, synchronized: bool) -> int | None:
    """``value`` as a positive int or None; ghost batches exclude ``synchronized``."""
    if value is None:
        return None
    if not _is_int(value):
        raise TypeError(
            f"`virtual_batch_size` must be a positive int or None; got {value!r}."
        )
    if value <= 0:
        raise ValueError(
            f"`virtual_batch_size` must be a positive int; got virtual_batch_size={value}."
        )
    if synchronized:
        raise ValueError(
            "`virtual_batch_size` normalizes each ghost batch with its own local "
            "statistics, so it cannot be combined with synchronized=True; got "
            f"virtual_batch_size={value}, synchronized=True."
        )
    return int(value)


def renorm_clipping(clipping) -> dict | None:
    """``clipping`` as a dict with keys among ``rmax``, ``rmin``, ``dmax``, or None.

    Checked whether or not ``renorm`` is set (Keras checks it only with
    ``renorm=True``), so a bad value is caught where it is written.
    """
    if clipping is None:
        return None
    if not isinstance(clipping, Mapping):
        raise TypeError(
            "`renorm_clipping` must be a dict with keys among "
            f"{list(RENORM_CLIPPING_KEYS)}; got {clipping!r}."
        )
    unknown = set(clipping) - set(RENORM_CLIPPING_KEYS)
    if unknown:
        raise ValueError(
            f"Received invalid keys for `renorm_clipping` argument: {dict(clipping)}. "
            f"Supported values: {list(RENORM_CLIPPING_KEYS)}. Unknown keys: "
            f"{sorted(unknown)}."
        )
    rmin, rmax, dmax = (clipping.get(k) for k in ("rmin", "rmax", "dmax"))
    if rmin is not None and rmax is not None and rmax < rmin:
        raise ValueError(
            "rmax should be greater than rmin in the `renorm_clipping` argument "
            f"(rmax >= rmin). Received: rmax={rmax!r}, rmin={rmin!r}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            "dmax should be non-negative in the `renorm_clipping` argument "
            f"(dmax >= 0). Received: dmax={dmax!r}."
        )
    return dict(clipping)


def mask_shape(mask_shape: Sequence, input_shape: Sequence) -> bool:
    """Checks a mask's static shape against Keras's rule.

    Keras's rule: the mask has the input's rank minus one; it is expanded at
    the last axis and broadcast to the input, whatever the channel axis. A
    mask of the input's own rank that broadcasts to it is also accepted (a
    kerasbn extension). Unknown (None) sizes pass.

    Returns:
        Whether the mask must be expanded at the last axis first.

    Raises:
        ValueError: the mask has another rank or does not broadcast.
    """
    rule = (
        "the mask must have the input's rank minus one (it is expanded at the "
        "last axis and broadcast to the input, as in Keras) or the input's rank, "
        "and broadcast to the input"
    )
    mask_shape, input_shape = tuple(mask_shape), tuple(input_shape)
    if len(mask_shape) not in (len(input_shape) - 1, len(input_shape)):
        raise ValueError(
            "The mask provided should be one dimension less than the inputs. "
            f"Received: mask.shape={mask_shape}, inputs.shape={input_shape}; "
            f"{rule}."
        )
    expand = len(mask_shape) == len(input_shape) - 1
    expanded = mask_shape + (1,) if expand else mask_shape
    for m, d in zip(expanded, input_shape):
        if m not in (1, None) and d is not None and m != d:
            raise ValueError(
                f"`mask` of shape {mask_shape} does not broadcast to inputs of "
                f"shape {input_shape}: {rule}. Received: mask.shape={mask_shape}, "
                f"inputs.shape={input_shape}."
            )
    return expand


def batch_has_spread(sizes: Sequence, input_shape: Sequence, channel_axes) -> None:
    """Raises if training would see one value per channel (``sizes`` all known)."""
    if all(s is not None for s in sizes) and math.prod(sizes) == 1:
        raise ValueError(
            "BatchNorm in training needs more than one value per channel to "
            f"compute a variance; got inputs.shape={tuple(input_shape)} with "
            f"channel axes {channel_axes}. Use a batch larger than 1 or "
            "call it with training=False."
        )
