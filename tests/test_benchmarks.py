"""The benchmark scripts: the GPU benchmark runs on the CPU and prints its
table, and the harness computes spreads and caps as stated.

No timing is asserted: only that the script exits 0 and that its table has a
line for every contender of the backend under test, train and inference, in
float32 and bfloat16.
"""

from __future__ import annotations

import json
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


def test_bench_layer_self_check_times_keras_bn_in_kerasbns_place(tmp_path):
    """``--self-check`` builds Keras's BN where kerasbn's stands; without it
    that slot holds ``kerasbn.BatchNorm``."""
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_layer.py")]
    command += [
        "--runs",
        "1",
        "--rounds",
        "1",
        "--budget",
        "0.001",
        "--shapes",
        "32,100",
    ]
    slots = {}
    for extra in ([], ["--self-check"]):
        path = tmp_path / f"run{len(extra)}.json"
        done = subprocess.run(
            [*command, "--json", str(path), *extra],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": pythonpath},
        )
        assert done.returncode == 0, (
            f"bench_layer.py failed:\n{done.stdout}\n{done.stderr}"
        )
        (result,) = json.loads(path.read_text())["results"]
        slots[bool(extra)] = (result["layers"]["kerasbn"], result["layers"]["keras"])
    assert slots[False][0] == "kerasbn.layer.BatchNorm", slots
    assert slots[True][0] == slots[True][1] == slots[False][1], slots
    assert slots[False][1].endswith(".BatchNormalization"), slots


def _harness():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import harness
    finally:
        sys.path.pop(0)
    return harness


def test_ratio_spreads_give_each_cell_its_median_range_and_verdict():
    harness = _harness()
    runs = [  # kerasbn 1 ms; Keras 3 ms per run as below
        {
            "results": [
                {
                    "shape": [8, 4],
                    "axis": -1,
                    "formulation": "f",
                    "median_s": {
                        "train/kerasbn": 1.0,
                        "train/keras": k,
                        "infer/kerasbn": 2.0,
                        "infer/keras": i,
                    },
                }
            ]
        }
        for k, i in ((1.5, 2.1), (1.2, 1.9), (1.4, 2.0))
    ]
    train, infer = harness.ratio_spreads(runs, ["keras"], ["train", "infer"])
    assert (train["ratio"], train["low"], train["high"]) == (1.4, 1.2, 1.5)
    assert train["counts"]  # a range of 0.3 under a gap of 0.4
    assert (infer["ratio"], infer["low"], infer["high"]) == (1.0, 0.95, 1.05)
    assert not infer["counts"]  # a range of 0.1 over a gap of 0
    table = harness.spread_table([train, infer], {"keras": "Keras 3"})
    assert "| (8, 4) (-1) [f] | train | vs Keras 3 | 1.40x | 1.20-1.50 |" in table
    assert "| ~1.00x | 0.95-1.05 |" in table


def test_isa_caps_reach_every_framework_and_keep_other_xla_flags():
    harness = _harness()
    env = harness.isa_environment(
        "avx2", {"XLA_FLAGS": "--a=1 --xla_cpu_max_isa=AVX512"}
    )
    assert env["XLA_FLAGS"] == "--a=1 --xla_cpu_max_isa=AVX2"
    assert env["TF_ENABLE_ONEDNN_OPTS"] == "0"
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert harness.isa_environment("native", {"A": "1"}) == {"A": "1"}
