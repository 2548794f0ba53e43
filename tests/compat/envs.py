"""The Keras releases kerasbn supports, each with frameworks of its own time.

One row a Keras minor release (its newest patch), with the JAX and
TensorFlow releases that were current when it came out (TensorFlow's own
``keras`` pin admits it) and the CPU-only PyTorch wheel. ``create(row)``
makes its virtual environment under ``/work/venvs`` (or ``$KERASBN_VENVS``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["ROWS", "Row", "create", "python_of"]

ROOT = Path(__file__).resolve().parents[2]
VENVS = Path(os.environ.get("KERASBN_VENVS", "/work/venvs"))
# The CPU-only PyTorch wheel, from a local wheel folder where one has it.
WHEELS = os.environ.get("KERASBN_WHEELS", "/opt/wheels")
TORCH = "torch==2.13.0+cpu" if Path(WHEELS).is_dir() else "torch==2.13.0"


class Row(tuple):
    """``(keras, jax, tensorflow)`` version strings."""

    keras = property(lambda self: self[0])
    jax = property(lambda self: self[1])
    tensorflow = property(lambda self: self[2])

    @property
    def minor(self) -> str:
        return ".".join(self.keras.split(".")[:2])


ROWS = [
    Row(("3.3.3", "0.4.30", "2.16.2")),
    Row(("3.4.1", "0.4.30", "2.17.1")),
    Row(("3.5.0", "0.4.31", "2.17.1")),
    Row(("3.6.0", "0.4.33", "2.18.0")),
    Row(("3.7.0", "0.4.35", "2.18.0")),
    Row(("3.8.0", "0.4.38", "2.18.1")),
    Row(("3.9.2", "0.5.3", "2.19.0")),
    Row(("3.10.0", "0.6.0", "2.19.0")),
    Row(("3.11.3", "0.7.0", "2.20.0")),
    Row(("3.12.4", "0.8.0", "2.20.0")),
    Row(("3.13.2", "0.8.2", "2.20.0")),
    Row(("3.14.1", "0.9.0", "2.21.0")),
    Row(("3.15.1", "0.10.2", "2.21.0")),
]


def python_of(row: Row) -> Path:
    return VENVS / f"keras-{row.minor}" / "bin" / "python"


def create(row: Row) -> dict[str, str]:
    """Makes (or completes) ``row``'s venv with ``uv``: Keras, JAX, TensorFlow
    with its tf_keras, the CPU-only PyTorch. Returns, by framework, the last
    line of what failed to install."""
    folder = VENVS / f"keras-{row.minor}"
    if not python_of(row).exists():
        subprocess.run(["uv", "venv", "-q", "-p", "3.11", str(folder)], check=True)
    minor_tf = ".".join(row.tensorflow.split(".")[:2])
    wanted = {
        "jax": [f"jax[cpu]=={row.jax}"],
        "tensorflow": [f"tensorflow=={row.tensorflow}", f"tf-keras~={minor_tf}.0"],
        "torch": [TORCH],
    }
    failed = {}
    installed: list[str] = [f"keras=={row.keras}", "packaging", "pytest", "h5py"]
    for framework, packages in wanted.items():
        command = ["uv", "pip", "install", "-q", "--python", str(python_of(row))]
        if Path(WHEELS).is_dir():
            command += ["--find-links", WHEELS]
        done = subprocess.run(
            [*command, *installed, *packages], capture_output=True, text=True
        )
        if done.returncode:
            failed[framework] = (done.stderr.strip().splitlines() or ["?"])[-1]
        else:
            installed += packages
    return failed


if __name__ == "__main__":
    for row in (
        ROWS[:-1] if len(sys.argv) < 2 else [r for r in ROWS if r.minor in sys.argv[1:]]
    ):
        print(row.keras, create(row) or "ok", flush=True)
