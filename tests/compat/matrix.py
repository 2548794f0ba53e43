"""The version x backend x tool table of kerasbn's supported Keras range.

For each Keras minor release in ``tests/compat/envs.py`` (its newest patch,
with the JAX and TensorFlow of its time and the CPU-only PyTorch), makes its
virtual environment if missing, then runs ``check_tools.py`` there once per
backend and prints a Markdown table, one row per Keras release and backend::

    python tests/compat/matrix.py [3.3 3.8 ...]   # default: every release

A framework that does not install next to that Keras (see envs.py) is shown
as such, and its row's tools as not run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[2])]
from check_tools import CHECKS  # noqa: E402
from envs import ROOT, ROWS, create, python_of  # noqa: E402

BACKENDS = ("jax", "tensorflow", "torch")


def run(row, backend: str) -> dict:
    python = python_of(row)
    framework = "tensorflow" if backend == "tensorflow" else backend
    probe = subprocess.run(
        [str(python), "-c", f"import {framework}"], capture_output=True, text=True
    )
    if probe.returncode:
        return {"error": f"{framework} not importable"}
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    done = subprocess.run(
        [str(python), str(Path(__file__).parent / "check_tools.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    result = json.loads(lines[-1])
    result["seconds"] = round(time.monotonic() - started)
    return result


def mark(outcome: str) -> str:
    if outcome == "pass":
        return "✅"
    if outcome.startswith("skip"):
        return "–"
    return "❌"


def main(selected: list[str]) -> None:
    rows = [r for r in ROWS if not selected or r.minor in selected]
    print("| Keras | backend | framework | " + " | ".join(CHECKS) + " |")
    print("|---|---|---|" + "---|" * len(CHECKS))
    failures = []
    for row in rows:
        missing = create(row)
        for backend in BACKENDS:
            if backend in missing:
                cells = ["not installable: " + missing[backend]] + [""] * len(CHECKS)
                print(f"| {row.keras} | {backend} | " + " | ".join(cells) + " |")
                continue
            result = run(row, backend)
            if "error" in result:
                print(
                    f"| {row.keras} | {backend} | {result['error']} |"
                    + " |" * len(CHECKS)
                )
                failures.append((row.keras, backend, result["error"]))
                continue
            version = result["versions"].get(backend)
            cells = [mark(result["results"][name]) for name in CHECKS]
            print(
                f"| {row.keras} | {backend} | {version} | " + " | ".join(cells) + " |"
            )
            failures += [
                (row.keras, backend, f"{name}: {outcome}")
                for name, outcome in result["results"].items()
                if outcome != "pass" and not outcome.startswith("skip")
            ]
            sys.stdout.flush()
    for failure in failures:
        print("failed:", *failure)


if __name__ == "__main__":
    main(sys.argv[1:])
