"""The keras.applications table: the tools on every architecture with BN, per backend.

Runs ``tests/test_applications.py`` once per backend, each in a child process
with ``KERAS_BACKEND`` set, and prints the figures those tests measured and
asserted: one row per architecture, one column per backend. A cell reads

    inference / training / statistics / fold, save, to_keras

* inference: largest |from_keras(model) - model| in inference, relative to
  the largest output;
* training: the same for the outputs of one training-mode call;
* statistics: the same for every BN's moving mean and variance after it;
* fold: largest |fold_batch_norms(model) - model| in inference, relative;
* save: ``exact`` when the ``.keras`` file of the converted model loads back
  with the same weights and bit-identical outputs;
* to_keras: ``exact`` when ``to_keras(from_keras(model))`` has the original
  model's config and weights.

A ``-`` is a figure not measured: Keras does not build that architecture on
that backend (NASNetMobile on PyTorch in Keras 3.15), or the test failed
before measuring it.

Below it, Keras's own float32 error (float32 against float64, same weights
and input) for the same quantities, which the tests use as the tolerance
(see the module docstring of ``tests/test_applications.py``).

Usage::

    python benchmarks/applications_table.py [--backends tensorflow jax torch]
        [--parallel] [--timeout SECONDS] [--load BACKEND=PATH ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "jax", "torch")
QUANTITIES = ("inference", "training", "statistics", "fold")


def start_backend(backend: str, folder: str) -> tuple[subprocess.Popen, str, float]:
    """Starts one backend's run of the suite; returns the process, the path of
    its figures and the start time."""
    path = os.path.join(folder, f"{backend}.json")
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "KERASBN_APPLICATIONS_JSON": path,
        # every architecture, unless the caller names some
        "KERASBN_APPLICATIONS": os.environ.get("KERASBN_APPLICATIONS", "all"),
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore::DeprecationWarning",
        "-W",
        "ignore::UserWarning",
        str(ROOT / "tests" / "test_applications.py"),
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    return process, path, time.perf_counter()


def finish_backend(
    process, path: str, start: float, timeout: float | None = None
) -> tuple[dict, str, float]:
    """The figures of one backend's run, pytest's summary line and the wall time.

    A run still going ``timeout`` seconds after ``start`` is stopped; the
    figures it measured until then are kept.
    """
    remaining = (
        None if timeout is None else max(1.0, start + timeout - time.perf_counter())
    )
    try:
        stdout, stderr = process.communicate(timeout=remaining)
        cut = False
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        cut = True
    seconds = time.perf_counter() - start
    lines = [line for line in stdout.decode().splitlines() if line.strip()]
    summary = lines[-1] if lines else stderr.decode().strip()[-300:]
    if cut:
        summary = f"stopped after {timeout:.0f} s, progress: {summary}"
    figures = {}
    if os.path.exists(path):
        with open(path) as file:
            figures = json.load(file)["figures"]
    return figures, summary, seconds


def number(value) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.1e}"


def flag(value) -> str:
    return {True: "exact", False: "DIFFERS", None: "-"}[value]


def cell(figures: dict) -> str:
    numbers = " / ".join(number(figures.get(q)) for q in QUANTITIES)
    flags = ", ".join(flag(figures.get(k)) for k in ("save exact", "to_keras exact"))
    return f"{numbers}, {flags}"


def keras_cell(figures: dict) -> str:
    return " / ".join(
        number(figures.get(f"{q}: keras float32 vs float64")) for q in QUANTITIES[:3]
    )


def table(title: str, results: dict, format_cell) -> list[str]:
    backends = list(results)
    architectures = sorted({a for figures, *_ in results.values() for a in figures})
    lines = [
        f"### {title}",
        "",
        "| architecture | " + " | ".join(backends) + " |",
        "|---" * (len(backends) + 1) + "|",
    ]
    for arch in architectures:
        cells = [format_cell(results[b][0].get(arch, {})) for b in backends]
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="run the backends at the same time (faster in all, slower each)",
    )
    parser.add_argument(
        "--load",
        nargs="+",
        default=[],
        metavar="BACKEND=PATH",
        help="print figures that a run with KERASBN_APPLICATIONS_JSON=PATH wrote "
        "instead of running that backend",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="stop a backend's run after this many seconds, keeping its figures",
    )
    args = parser.parse_args()
    loaded = dict(item.split("=", 1) for item in args.load)
    args.backends = [b for b in args.backends if b not in loaded]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        if args.parallel:
            started = {b: start_backend(b, folder) for b in args.backends}
            results = {
                b: finish_backend(*run, args.timeout) for b, run in started.items()
            }
        else:
            for backend in args.backends:
                run = start_backend(backend, folder)
                results[backend] = finish_backend(*run, args.timeout)
    for backend, path in loaded.items():
        with open(path) as file:
            results[backend] = (json.load(file)["figures"], f"loaded from {path}", 0.0)
    for backend, (_, summary, seconds) in results.items():
        print(f"{backend}: {summary} ({seconds:.0f} s)")
    print()
    lines = table(
        "kerasbn against Keras: inference / training / statistics / fold, "
        "save, to_keras",
        results,
        cell,
    )
    lines += [""] + table(
        "Keras's own float32 error (float32 vs float64): "
        "inference / training / statistics",
        results,
        keras_cell,
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
