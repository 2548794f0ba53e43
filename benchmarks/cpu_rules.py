"""The measurement behind each CPU formulation choice: every candidate rule
timed against Keras's BN on this CPU (or capped with ``--isa avx2``).

kerasbn reads its CPU choices from per-instruction-set tables in its backend
modules (TensorFlow's ``CPU_RULES``, JAX's ``ROUGH_MIN_ELEMENTS``, PyTorch's
``MATVEC``). This script runs ``bench_layer.py`` once per candidate, in a
fresh process each, with the table entry of the CPU it runs on replaced by the
candidate, and prints kerasbn's speed-up over Keras's BN per shape and step
under each candidate, the train step's formulation in brackets:

* TensorFlow: ``composite`` (never fused nor widened: what an unmeasured CPU
  gets), ``eigen`` (the rules of TensorFlow without oneDNN), ``onednn`` (the
  rules measured with oneDNN);
* JAX: ``shifted`` (always the shifted statistics), ``rough`` (the rough
  statistics from the size measured on AVX-512, 2**20 elements);
* PyTorch: ``views`` (``torch.batch_norm`` on its views only), ``matvec``
  (the ``"matvec"`` rule).

Run:
    python benchmarks/cpu_rules.py --backend tensorflow --isa avx2
    python benchmarks/cpu_rules.py --backend torch --isa avx2 --rounds 21 --shapes 32,24,24,10 32,8,8,20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CANDIDATES = {
    "tensorflow": ("composite", "eigen", "onednn"),
    "jax": ("shifted", "rough"),
    "torch": ("views", "matvec"),
}


def patch(backend: str, candidate: str) -> str:
    """Replaces the running CPU's entry of ``backend``'s rule table with
    ``candidate``; returns the device name it replaced."""
    if backend == "tensorflow":
        from kerasbn.backends import tensorflow as module

        rules = {
            "composite": module.UNMEASURED_CPU,
            "eigen": module.CPU_RULES["cpu:avx2"],
            "onednn": module.CPU_RULES["cpu:avx512:onednn"],
        }
        module.CPU_RULES[module.CPU_DEVICE] = rules[candidate]
    elif backend == "jax":
        from kerasbn.backends import jax as module

        level = module.isa.device_isa(module.CPU_DEVICE)
        measured = module.ROUGH_MIN_ELEMENTS[module.isa.AVX512]
        module.ROUGH_MIN_ELEMENTS.pop(level, None)
        if candidate == "rough":
            module.ROUGH_MIN_ELEMENTS[level] = measured
    else:
        from kerasbn.backends import torch as module

        level = module.isa.device_isa(module.CPU_DEVICE)
        measured = module.MATVEC.get(level, module.MATVEC[module.isa.AVX512])
        module.MATVEC.pop(level, None)
        if candidate == "matvec":
            module.MATVEC[level] = measured
    return module.CPU_DEVICE


def child(candidate: str) -> None:
    """In a fresh process: ``bench_layer.py`` with the candidate's rules."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_layer

    device = patch(bench_layer.BACKEND, candidate)
    print(f"# candidate {candidate} on {device}", flush=True)
    bench_layer.main([a for a in sys.argv[1:] if a != "--rules-child"])


def main() -> None:
    if "--rules-child" in sys.argv:
        child(os.environ["KERASBN_RULES_CANDIDATE"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=tuple(CANDIDATES), required=True)
    parser.add_argument("--isa", default="native", choices=("native", "avx2"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--shapes", nargs="*", help="e.g. 32,24,24,10")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for candidate in CANDIDATES[args.backend]:
            path = os.path.join(folder, f"{candidate}.json")
            argv = ["--backend", args.backend, "--isa", args.isa, "--runs", "1"]
            argv += ["--rounds", str(args.rounds), "--json", path]
            argv += ["--shapes", *args.shapes] if args.shapes else []
            env = {**os.environ, "KERASBN_RULES_CANDIDATE": candidate}
            subprocess.run(
                [sys.executable, __file__, "--rules-child", *argv], env=env, check=True
            )
            with open(path) as f:
                results[candidate] = json.load(f)
    first = next(iter(results.values()))
    print(f"\n# {first['machine']}")
    header = ["shape (axis)", "step"] + [f"{c}: vs Keras 3" for c in results]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for index, row in enumerate(first["results"]):
        for step in ("train", "infer"):
            cells = []
            for payload in results.values():
                r = payload["results"][index]
                t = r["median_s"]
                tag = f" [{r['formulation']}]" if step == "train" else ""
                cells.append(f"{t[f'{step}/keras'] / t[f'{step}/kerasbn']:.2f}x{tag}")
            label = f"{tuple(row['shape'])} ({row['axis']})"
            print("| " + " | ".join([label, step, *cells]) + " |")


if __name__ == "__main__":
    main()
