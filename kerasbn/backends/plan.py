"""How a fast path sees one call: the channel view and the formulation, decided once.

Every fast path views the input as ``(outer, channels, inner)``: the channel axes
must be adjacent and of known size (:meth:`Plan.of`). A plan holds static facts
only, never a tensor's value or a symbolic size compared with a number, so
exporters and compilers trace the choice as they trace Keras's own BN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["CPU", "KERNEL_FUNCTIONS", "NOMINAL_DIM", "Plan", "channel_vector"]

KERNEL_FUNCTIONS = (
    *("device", "default_device", "formulation", "batch_normalize", "normalize"),
    *("all_finite", "moving_average", "assign_where"),
    *("global_moments", "assert_divisible"),
    "gather_workers",
    *("replicas_in_sync", "jit"),
)
"""The functions of every backend module: :class:`kerasbn.backends.Kernels`."""

NOMINAL_DIM = 32
"""Stands for an unknown or symbolic size where a choice depends on a size."""

CPU = "cpu"
"""The CPU's device type (a device is a lower-case type: ``"gpu"``, ``"cuda"``...)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """A call's view ``(outer, channels, inner)`` and how it is computed; hashable.

    Attributes:
        shape: the input's static shape: ints, None or symbolic sizes.
        start, stop: the channel axes are ``start .. stop - 1``.
        formulation: the backend's name for how the call is computed.
        device: the device type the call runs on (see :data:`CPU`).
        training: whether the call uses batch statistics.

    Example:
        >>> plan = Plan.of((8, 5, 5, 3), [0, 1, 2])
        >>> plan.channels, plan.count, plan.keepdims_shape, plan.channels_last
        (3, 200, (1, 1, 1, 3), True)
        >>> Plan.of((8, 5, 3), [1]) is None  # channel axes 0 and 2: not adjacent
        True
    """

    shape: tuple[Any, ...]
    start: int
    stop: int
    formulation: str = ""
    device: str = CPU
    training: bool = True

    @classmethod
    def of(cls, shape: Sequence, axes: Sequence[int], **fields) -> Plan | None:
        """The plan of ``shape`` reduced over ``axes``, or None where nothing is
        reduced or left, or the channel axes are not adjacent or not known."""
        shape = tuple(shape)
        reduced = {a % len(shape) for a in axes}
        channel_axes = [a for a in range(len(shape)) if a not in reduced]
        if not reduced or not channel_axes:
            return None
        start, stop = channel_axes[0], channel_axes[-1] + 1
        if channel_axes != list(range(start, stop)):
            return None
        if not all(isinstance(shape[a], int) for a in channel_axes):
            return None
        return cls(shape, start, stop, **fields)

    def using(self, formulation: str) -> Plan:
        """This plan with another formulation (``dataclasses.replace``, without
        its field-by-field introspection: a plan is made on every call)."""
        fields = (self.shape, self.start, self.stop, formulation, self.device)
        return Plan(*fields, self.training)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def channels(self) -> int:
        """The product of the channel axes' sizes."""
        return math.prod(self.shape[self.start : self.stop])

    @property
    def outer(self):
        """The product of the sizes before the channel axes (None if unknown)."""
        return _product(self.shape[: self.start])

    @property
    def inner(self):
        """The product of the sizes after the channel axes (None if unknown)."""
        return _product(self.shape[self.stop :])

    @property
    def count(self):
        """Values per channel, ``outer * inner`` (None if unknown)."""
        return _product((self.outer, self.inner))

    @property
    def nominal_count(self) -> int:
        """Values per channel, unknown and symbolic sizes as :data:`NOMINAL_DIM`."""
        sizes = self.shape[: self.start] + self.shape[self.stop :]
        return math.prod(d if isinstance(d, int) else NOMINAL_DIM for d in sizes)

    @property
    def nominal_size(self) -> int:
        """The number of elements, counted as :attr:`nominal_count` counts."""
        return self.nominal_count * self.channels

    @property
    def known_outer(self) -> int:
        """The product of the known sizes before the channel axes."""
        return math.prod([d for d in self.shape[: self.start] if isinstance(d, int)])

    @property
    def static(self) -> bool:
        """Whether every size is a plain int."""
        return all(isinstance(d, int) for d in self.shape)

    @property
    def empty(self) -> bool:
        """Whether a known size is 0 (comparing a symbolic one adds a guard)."""
        return any(isinstance(d, int) and d == 0 for d in self.shape)

    @property
    def channels_last(self) -> bool:
        return self.stop == self.rank

    def widening(self, width: int) -> int:
        """``k`` of the view ``(rows / k, k * channels)`` whose rows fill whole
        vectors of ``width`` lanes, halved until it divides the known rows; 1
        without ``width``, channels not last, or ``4 * width`` channels or more.

        Example:
            >>> Plan.of((32, 24, 24, 10), [0, 1, 2]).widening(16)
            8
        """
        channels = self.channels
        if not width or not self.channels_last or channels >= 4 * width:
            return 1
        k = width // math.gcd(channels, width)
        while self.known_outer % k:
            k //= 2
        return k

    @property
    def keepdims_shape(self) -> tuple[int, ...]:
        """The statistics' shape: the channel sizes, 1 on the reduced axes."""
        return tuple(
            d if self.start <= a < self.stop else 1 for a, d in enumerate(self.shape)
        )


def _product(sizes: Sequence):
    return None if any(d is None for d in sizes) else math.prod(sizes)


def channel_vector(value, plan: Plan, xp, shape: Sequence[int] | None = None):
    """``value``, broadcastable to :attr:`Plan.keepdims_shape`, as a vector of
    ``shape`` (``(channels,)``) by ``xp.broadcast_to`` and ``xp.reshape``; one of
    that shape already (the weights, channels last) comes back with no op.

    Example:
        >>> import numpy as np
        >>> channel_vector(np.ones((1, 3, 1)), Plan.of((4, 3, 2), [0, 2]), np).shape
        (3,)
    """
    shape = (plan.channels,) if shape is None else tuple(shape)
    if tuple(value.shape) == shape:
        return value
    if tuple(value.shape) != plan.keepdims_shape:
        value = xp.broadcast_to(value, plan.keepdims_shape)
    return xp.reshape(value, shape)
