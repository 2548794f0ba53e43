"""The jax backend: no fast path yet; :mod:`kerasbn.ops` serves every call."""

from __future__ import annotations

from collections.abc import Sequence

from kerasbn import ops


def applies(x, axes: Sequence[int], mask=None) -> bool:
    """Whether this module computes the call: never, for now."""
    return False


def global_moments(local: ops.Moments) -> ops.Moments:
    """The local moments: synchronized statistics are not yet served here."""
    return local
