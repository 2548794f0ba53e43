"""The instruction set a CPU computes with, and the device names that carry it.

A formulation measured on one CPU applies where it was measured. A backend's
``device(x)`` therefore names a CPU with what its framework computes with:
``"cpu:avx512"``, ``"cpu:avx2"`` or ``"cpu:other"``, followed by the vendor
libraries that run its kernels where that changes them (``"cpu:avx2:onednn"``:
TensorFlow with oneDNN on). Other devices keep their plain type (``"gpu"``,
``"cuda"``...). The instruction set is the widest of :data:`AVX512` (the
AVX-512 foundation, byte/word, double/quad-word and vector-length extensions,
which x86 kernels take as one level) and :data:`AVX2` (with FMA) that the CPU
has and the framework uses: each framework can be capped below what the CPU
has (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``,
``--xla_cpu_max_isa``), and a backend module reads that cap (its framework's
own report where there is one) and passes it to :func:`instruction_set`.

Framework-free: the standard library only. The CPU's flags are read once.

Example:
    >>> device = cpu_device(AVX2, ONEDNN)
    >>> device, device_type(device), device_isa(device), uses(device, ONEDNN)
    ('cpu:avx2:onednn', 'cpu', 'avx2', True)
    >>> instruction_set("AVX2", flags={"avx2", "fma", "avx512f", "avx512bw",
    ...                                "avx512vl", "avx512dq"})
    'avx2'
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

__all__ = [
    "AVX2",
    "AVX512",
    "INSTRUCTION_SETS",
    "ONEDNN",
    "OTHER",
    "cpu_device",
    "cpu_flags",
    "device_isa",
    "device_type",
    "instruction_set",
    "resolve",
    "uses",
]

AVX512 = "avx512"
AVX2 = "avx2"
OTHER = "other"
"""A CPU with neither AVX-512 nor AVX2 and FMA (another architecture, an
older x86), or one whose flags cannot be read."""
INSTRUCTION_SETS = (OTHER, AVX2, AVX512)  # from the narrowest to the widest
ONEDNN = "onednn"  # TensorFlow computes its CPU kernels with oneDNN

_REQUIRED = {
    AVX512: {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    AVX2: {"avx2", "fma"},
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, lower case (``/proc/cpuinfo``'s names, else
    NumPy's view of the CPU); empty where neither can be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:  # other systems: NumPy's dispatch table (AVX512F, AVX2, FMA3...)
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:  # NumPy 1
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return frozenset()
    names = {"FMA3": "fma", "AVX512F": "avx512f", "AVX512BW": "avx512bw"}
    names.update(AVX512VL="avx512vl", AVX512DQ="avx512dq", AVX2="avx2")
    return frozenset(names[k] for k, on in features.items() if on and k in names)


def _cap_level(cap: str | None) -> int:
    """The widest instruction set a framework's cap allows, as an index of
    :data:`INSTRUCTION_SETS`: ``"AVX512_CORE"``, ``"AVX512_BF16"`` and
    ``"AMX"`` allow AVX-512, ``"AVX2"`` and ``"AVX2_VNNI"`` AVX2, ``"AVX"``
    and ``"SSE4_2"`` neither; None, ``""``, ``"ALL"`` and ``"DEFAULT"`` cap
    nothing."""
    name = (cap or "").strip().upper()
    if name in ("", "ALL", "DEFAULT"):
        return len(INSTRUCTION_SETS) - 1
    if name.startswith(("AVX512", "AVX10", "AMX")):
        return INSTRUCTION_SETS.index(AVX512)
    if name.startswith("AVX2"):
        return INSTRUCTION_SETS.index(AVX2)
    return INSTRUCTION_SETS.index(OTHER)


def instruction_set(cap: str | None = None, flags: Iterable[str] | None = None) -> str:
    """The widest of :data:`AVX512` and :data:`AVX2` that the CPU has and
    ``cap`` allows, else :data:`OTHER`.

    Args:
        cap: the framework's own cap, in its own spelling (``"AVX2"``,
            ``"AVX512_CORE"``, ``"avx2"``...), or None for none.
        flags: the CPU's flags; :func:`cpu_flags` by default.

    Returns:
        ``"avx512"``, ``"avx2"`` or ``"other"``.

    Example:
        >>> instruction_set(flags={"avx2", "fma"})
        'avx2'
        >>> instruction_set("SSE4_2", flags={"avx2", "fma"})
        'other'
    """
    flags = cpu_flags() if flags is None else frozenset(flags)
    level = _cap_level(cap)
    for isa in (AVX512, AVX2):
        if INSTRUCTION_SETS.index(isa) <= level and _REQUIRED[isa] <= flags:
            return isa
    return OTHER


def cpu_device(isa: str, *libraries: str) -> str:
    """The device name of a CPU computing with ``isa`` and ``libraries``.

    Raises:
        ValueError: ``isa`` is not one of :data:`INSTRUCTION_SETS`.

    Example:
        >>> cpu_device(AVX512)
        'cpu:avx512'
    """
    if isa not in INSTRUCTION_SETS:
        raise ValueError(f"`isa` must be one of {INSTRUCTION_SETS}; got isa={isa!r}.")
    return ":".join(("cpu", isa, *libraries))


def resolve(device: str, cpu_device: str) -> str:
    """``device``, or ``cpu_device`` (this process's CPU, as a backend module
    names it) where ``device`` is the bare ``"cpu"``.

    Example:
        >>> resolve("cpu", "cpu:avx2"), resolve("cpu:avx512", "cpu:avx2")
        ('cpu:avx2', 'cpu:avx512')
    """
    return cpu_device if device == "cpu" else device


def device_type(device: str) -> str:
    """The device's type: ``"cpu"``, ``"gpu"``, ``"cuda"``...

    Example:
        >>> device_type("cpu:avx2"), device_type("gpu")
        ('cpu', 'gpu')
    """
    return device.split(":", 1)[0]


def device_isa(device: str) -> str | None:
    """The instruction set a CPU device computes with (:data:`OTHER` where its
    name does not say: nothing was measured for it); None off the CPU.

    Example:
        >>> device_isa("cpu:avx512"), device_isa("cpu"), device_isa("cuda")
        ('avx512', 'other', None)
    """
    parts = device.split(":")
    if parts[0] != "cpu":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in INSTRUCTION_SETS else OTHER


def uses(device: str, library: str) -> bool:
    """Whether a CPU device computes with the vendor ``library`` (:data:`ONEDNN`).

    Example:
        >>> uses("cpu:avx512:onednn", ONEDNN), uses("cpu:avx512", ONEDNN)
        (True, False)
    """
    return device_type(device) == "cpu" and library in device.split(":")[2:]
