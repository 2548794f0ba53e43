"""Backend fast paths, chosen in one place.

Each backend module exposes the same ``batch_normalize`` and ``normalize`` as
:mod:`kerasbn.ops` (which is the fallback everywhere) plus ``applies(x, axes,
mask)``, which says whether it computes that call exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from kerasbn import ops


def implementation(x, axes: Sequence[int], mask=None):
    """The module whose ``batch_normalize``/``normalize`` serve this call.

    Args:
        x: the layer's input.
        axes: the reduction axes.
        mask: the broadcastable mask, or None.

    Returns:
        A backend module when its ``applies`` accepts the call, else
        :mod:`kerasbn.ops`.
    """
    return ops
