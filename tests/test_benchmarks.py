"""The GPU benchmark's smoke run: it runs on the CPU and prints its table.

No timing is asserted: only that the script exits 0 and that its table has a
line for every contender of the backend under test, train and inference, in
float32 and bfloat16.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras

ROOT = Path(__file__).resolve().parent.parent
BENCH_GPU = ROOT / "benchmarks" / "bench_gpu.py"
CONTENDERS = {
    "tensorflow": ["kerasbn", "keras"],
    "jax": ["kerasbn", "keras", "flax"],
    "torch": ["kerasbn", "keras", "torch_nn", "torch_nn_nchw"],
}


def test_bench_gpu_smoke_prints_a_table_line_per_contender():
    backend = keras.backend.backend()
    # The script imports this checkout's kerasbn, as the tests do.
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(BENCH_GPU), "--smoke", "--backends", backend],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": pythonpath},
    )
    assert done.returncode == 0, f"bench_gpu.py failed:\n{done.stdout}\n{done.stderr}"
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in done.stdout.splitlines()
        if line.startswith("| (")
    ]
    found = {(r[1], r[2], r[3]) for r in rows}
    for dtype in ("float32", "bfloat16"):
        for step in ("train", "infer"):
            for name in CONTENDERS[backend]:
                assert (dtype, step, name) in found, (dtype, step, name, done.stdout)
    assert "copy bandwidth" in done.stdout
