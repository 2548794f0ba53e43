"""Timing helpers shared by the kerasbn benchmark scripts.

Contenders are timed in interleaved rounds: every round runs each contender
once, in an order that rotates from round to round, so that a slow spell of a
shared machine hits all of them alike. The scripts report medians over rounds.

Example:
    >>> medians = interleaved_medians({"a": lambda: None, "b": lambda: None}, 3)
    >>> sorted(medians)
    ['a', 'b']
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence


def interleaved_times(
    contenders: Mapping[str, Callable[[], object]], rounds: int, repeats: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each contender in every one of interleaved rounds.

    Args:
        contenders: name -> a callable that runs one call to completion.
        rounds: the number of rounds.
        repeats: calls per contender per round; a round's time is their mean.

    Returns:
        name -> the seconds per call of each round, in round order.
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(repeats):
                contenders[name]()
            times[name].append((time.perf_counter() - start) / repeats)
    return times


def interleaved_medians(
    contenders: Mapping[str, Callable[[], object]], rounds: int, repeats: int = 1
) -> dict[str, float]:
    """Median seconds per call of each contender (see :func:`interleaved_times`)."""
    times = interleaved_times(contenders, rounds, repeats)
    return {name: statistics.median(values) for name, values in times.items()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the figures were measured on, for the log and the JSON file."""
    import keras

    info = {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "malloc": {k: os.environ[k] for k in WARM_HEAP if k in os.environ}
        or "glibc defaults",
        **instruction_sets(),
    }
    for package in ("tensorflow", "jax", "torch", "flax", "tf-keras"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MiB, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """This process's resident set size now, in MiB."""
    current = _status_mb("VmRSS")
    return peak_rss_mb() if current is None else current


def peak_rss_mb() -> float:
    """This process's peak resident set size since the last reset, in MiB."""
    peak = _status_mb("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return peak


def reset_peak_rss() -> None:
    """Restarts the peak RSS from the current RSS (Linux >= 4.0; else no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def release_free_memory() -> None:
    """Returns the C heap's free memory to the system (glibc; else no-op)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def step_memory_mb(run: Callable[[], object]) -> dict[str, float]:
    """Peak RSS while ``run()`` runs: absolute, and above the RSS before it.

    Free heap memory is returned to the system first, so that the difference
    counts what ``run`` needs rather than what earlier allocations left behind.
    """
    release_free_memory()
    before = rss_mb()
    reset_peak_rss()
    run()
    peak = peak_rss_mb()
    return {"peak_rss_mb": round(peak, 1), "step_rss_mb": round(peak - before, 1)}


def memory_in_child(script: str, args: Sequence[str]) -> dict[str, float]:
    """Runs ``script --rss-child *args`` in a fresh process; returns its memory.

    The child must print, as its last line, the JSON of :func:`step_memory_mb`.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, script, "--rss-child", *args],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table of ``rows`` under ``header``.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, 2]]))
        | a | b |
        |---|---|
        | 1 | 2 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    """Writes ``payload`` to ``path`` (no-op for None)."""
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def add_output_flags(parser, memory_help: str) -> None:
    """Adds the flags every layer benchmark shares: --memory, --json and the
    hidden --rss-child that runs one contender in a fresh process."""
    parser.add_argument("--memory", action="store_true", help=memory_help)
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)


BACKENDS = ("tensorflow", "jax", "torch")

# glibc malloc settings of ``--warm-heap``: one arena, no mmap'd chunks, no
# trimming, so that freed memory stays mapped and is reused. By default
# glibc returns large blocks to the system, and every later allocation of
# that size faults its pages in again (about 6,300 page faults, some
# milliseconds here, for one (32, 56, 56, 64) float32 array): a cost that
# depends on what the previous contender freed, and that XLA's CPU runtime,
# which allocates from worker threads (one arena each), pays on every call.
WARM_HEAP = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
    "MALLOC_TOP_PAD_": str(1 << 28),
}


# Environment caps of ``--isa avx2``: each framework computes with AVX2 (and
# FMA) at most, as on a CPU without AVX-512. TensorFlow turns oneDNN off on
# such CPUs by default (its own Eigen kernels run, built for the binary's
# baseline); ONEDNN_MAX_CPU_ISA caps the oneDNN that PyTorch's convolutions
# (and TensorFlow's, where it is turned on) still use; XLA compiles for AVX2;
# ATen dispatches its AVX2 kernels.
ISA_CAPS = {
    "avx2": {
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
    },
}


def isa_environment(isa: str, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with the caps of ``--isa isa`` (``"native"``: none);
    ``XLA_FLAGS`` keeps its other flags.

    Example:
        >>> isa_environment("avx2", {"XLA_FLAGS": "--a=1"})["XLA_FLAGS"]
        '--a=1 --xla_cpu_max_isa=AVX2'
    """
    env = dict(environ)
    for key, value in ISA_CAPS.get(isa, {}).items():
        if key == "XLA_FLAGS":
            kept = [f for f in env.get(key, "").split() if "xla_cpu_max_isa" not in f]
            value = " ".join([*kept, value])
        env[key] = value
    return env


def select_backend(argv: Sequence[str] | None = None) -> str:
    """Sets ``KERAS_BACKEND`` from ``--backend`` and the caps of ``--isa``
    before any framework is imported.

    The default is ``KERAS_BACKEND`` if set, else TensorFlow. Child processes
    (``--memory``) inherit the choices through the environment. With the warm
    heap (the default; ``--no-warm-heap`` turns it off) the script restarts
    itself once with :data:`WARM_HEAP` in its environment (glibc reads it
    only at start).
    """
    parser = argparse.ArgumentParser(add_help=False)
    add_backend_flag(parser)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    os.environ["KERAS_BACKEND"] = known.backend
    os.environ.update(isa_environment(known.isa, os.environ))
    if known.warm_heap and any(os.environ.get(k) != v for k, v in WARM_HEAP.items()):
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, **WARM_HEAP}
        )
    return known.backend


def instruction_sets() -> dict[str, str]:
    """What each imported framework computes with on the CPU, as it reports
    it, and the device name that kerasbn's formulation choices read (where
    the kerasbn on ``PYTHONPATH`` names one)."""
    info = {"cpu flags": " ".join(_isa_flags())}
    try:
        from kerasbn import backends

        info["kerasbn device"] = backends.current().default_device()
    except (ImportError, AttributeError):  # a kerasbn without the contract
        pass
    if "tensorflow" in sys.modules:
        from tensorflow.python.util import _pywrap_util_port

        info["tensorflow onednn"] = "on" if _pywrap_util_port.IsMklEnabled() else "off"
    if "jax" in sys.modules:
        info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    if "torch" in sys.modules:
        import torch

        info["torch cpu capability"] = torch.backends.cpu.get_cpu_capability()
    info["onednn max cpu isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "all")
    return info


def _isa_flags() -> list[str]:
    """The CPU's AVX2, FMA and AVX-512 foundation flags (``/proc/cpuinfo``)."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(
                (
                    line.split(":", 1)[1].split()
                    for line in f
                    if line.startswith("flags")
                ),
                [],
            )
    except OSError:
        flags = []
    return [flag for flag in wanted if flag in flags]


def add_backend_flag(parser) -> None:
    """Adds ``--backend tensorflow|jax|torch`` (see :func:`select_backend`)."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
        help="the Keras backend (default: $KERAS_BACKEND, else tensorflow)",
    )
    parser.add_argument(
        "--warm-heap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run with glibc malloc keeping freed memory mapped (see "
        "harness.WARM_HEAP; on by default: freed blocks otherwise fault their "
        "pages in again, a cost that swings from run to run)",
    )
    parser.add_argument(
        "--isa",
        choices=("native", *ISA_CAPS),
        default="native",
        help="cap every framework at this instruction set (see harness.ISA_CAPS); "
        "native: what the CPU has",
    )


def runs_in_children(script: str, argv: Sequence[str], runs: int) -> list[dict]:
    """Runs ``script *argv --runs 1 --json FILE`` ``runs`` times, each in a fresh
    process (its own heap, compilation and thread pools), one after another;
    returns each run's JSON payload. A child's output streams through."""
    import tempfile

    payloads = []
    with tempfile.TemporaryDirectory() as folder:
        for run in range(runs):
            path = os.path.join(folder, f"run{run}.json")
            print(f"# run {run + 1} of {runs}", flush=True)
            subprocess.run(
                [sys.executable, script, *argv, "--runs", "1", "--json", path],
                check=True,
            )
            with open(path) as f:
                payloads.append(json.load(f))
    return payloads


def ratio_spreads(
    payloads: Sequence[dict], peers: Sequence[str], steps: Sequence[str]
) -> list[dict]:
    """kerasbn's speed-up over each peer in every cell, over runs.

    Each payload's ``results`` hold a ``median_s`` per contender (keyed
    ``"<step>/<name>"``, or ``"<name>"`` for the step ``""``). A cell's
    ``ratio`` is the median over runs of ``peer time / kerasbn time``,
    ``low`` and ``high`` its range, and it ``counts`` only where the range
    (its spread) is below the gap the ratio claims, ``|ratio - 1|``.

    Example:
        >>> runs = [{"results": [{"shape": [2], "axis": -1, "median_s":
        ...     {"kerasbn": 1.0, "keras": t}}]} for t in (1.5, 1.6, 1.4)]
        >>> cell = ratio_spreads(runs, ["keras"], [""])[0]
        >>> cell["ratio"], cell["low"], cell["high"], cell["counts"]
        (1.5, 1.4, 1.6, True)
    """
    cells = []
    for index, first in enumerate(payloads[0]["results"]):
        for step in steps:
            prefix = f"{step}/" if step else ""
            for peer in peers:
                ratios = [
                    p["results"][index]["median_s"][prefix + peer]
                    / p["results"][index]["median_s"][prefix + "kerasbn"]
                    for p in payloads
                    if prefix + peer in p["results"][index]["median_s"]
                ]
                if not ratios:
                    continue
                ratio = statistics.median(ratios)
                low, high = min(ratios), max(ratios)
                cells.append(
                    {
                        "shape": first["shape"],
                        "axis": first["axis"],
                        "step": step or "block",
                        "formulation": first.get("formulation", ""),
                        "peer": peer,
                        "ratio": round(ratio, 4),
                        "low": round(low, 4),
                        "high": round(high, 4),
                        "counts": high - low < abs(ratio - 1),
                        "runs": ratios,
                    }
                )
    return cells


def spread_table(cells: Sequence[dict], labels: Mapping[str, str]) -> str:
    """The cells of :func:`ratio_spreads` as a Markdown table: a ratio that
    does not count (its spread reaches past its gap) is marked ``~``."""
    rows = [
        [
            f"{tuple(c['shape'])} ({c['axis']})"
            + (f" [{c['formulation']}]" if c.get("formulation") else ""),
            c["step"],
            f"vs {labels.get(c['peer'], c['peer'])}",
            f"{'' if c['counts'] else '~'}{c['ratio']:.2f}x",
            f"{c['low']:.2f}-{c['high']:.2f}",
        ]
        for c in cells
    ]
    return markdown_table(
        ["shape (axis)", "step", "peer", "speed-up (median of runs)", "range"], rows
    )
