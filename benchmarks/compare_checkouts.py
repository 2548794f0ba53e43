"""Two checkouts of kerasbn, timed in alternating runs of ``bench_layer.py``.

A checkout is a directory that holds a ``kerasbn`` package (a git worktree of
another commit, for instance). The script runs this directory's
``bench_layer.py`` with the given arguments once per checkout and round, the
checkouts alternating (A, B, B, A, A, B...), each run in a fresh process with
``PYTHONPATH`` set to its checkout, so the same benchmark code times both.
Within a run every ratio is measured against peers timed in the same
interleaved rounds; across runs, the alternation spreads a busy spell of a
shared machine over both checkouts.

The table shows, for every shape (and step), the median over runs of
kerasbn's speed-up over each peer (peer time / kerasbn time) per checkout,
with the smallest and largest run in brackets.

Run (every argument after ``--`` goes to ``bench_layer.py``):
    git worktree add /tmp/kerasbn-before <commit>
    python benchmarks/compare_checkouts.py /tmp/kerasbn-before . --runs 3 -- \\
        --backend jax --block --rounds 9
    python benchmarks/compare_checkouts.py /tmp/kerasbn-before . --runs 3 -- \\
        --backend torch --rounds 9 --json results/layer-torch.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import markdown_table

HERE = Path(__file__).resolve().parent


def run_once(checkout: Path, bench_args: list[str], path: Path) -> dict:
    """One ``bench_layer.py`` run against ``checkout``; its JSON payload."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run(
        [
            sys.executable,
            str(HERE / "bench_layer.py"),
            *bench_args,
            *("--runs", "1"),  # one run per process: the alternation is here
            "--json",
            str(path),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(path.read_text())


def ratios(payload: dict) -> dict[tuple[str, str], float]:
    """(row, peer) -> peer time / kerasbn time, for every row of one run."""
    out = {}
    block = payload.get("mode") == "block"
    for r in payload["results"]:
        label = f"{tuple(r['shape'])} ({r['axis']})"
        medians = r["median_s"]
        steps = [""] if block else ["train/", "infer/"]
        for step in steps:
            ours = medians[f"{step}kerasbn"]
            for key, value in medians.items():
                name = key[len(step) :]
                if not key.startswith(step) or name in ("kerasbn", "no_bn"):
                    continue
                out[(f"{label} {step.rstrip('/')}".strip(), name)] = value / ours
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="the first checkout's root")
    parser.add_argument("after", type=Path, help="the second checkout's root")
    parser.add_argument("--runs", type=int, default=3, help="runs per checkout")
    parser.add_argument("--json", metavar="PATH", help="write every run here")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    bench_args = argv[split + 1 :]
    for flag in ("--json", "--runs"):
        if flag in bench_args:
            parser.error(f"{flag} goes before --: this script makes the runs")
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, root in checkouts.items():
        if not (root / "kerasbn" / "__init__.py").is_file():
            parser.error(f"{name} checkout {root} holds no kerasbn package")
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    order = ["before", "after"]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for name in order if i % 2 == 0 else order[::-1]:
                path = Path(tmp) / f"{name}-{i}.json"
                print(
                    f"run {i + 1}/{args.runs}: {name} ({checkouts[name]})", flush=True
                )
                runs[name].append(run_once(checkouts[name], bench_args, path))
    table = {name: [ratios(p) for p in payloads] for name, payloads in runs.items()}
    keys = list(table["after"][0])
    rows = []
    for row, peer in keys:
        cells = []
        for name in order:
            values = [r[(row, peer)] for r in table[name] if (row, peer) in r]
            cells.append(
                f"{statistics.median(values):.2f}x [{min(values):.2f}-{max(values):.2f}]"
                if values
                else "-"
            )
        rows.append([row, peer, *cells])
    print(
        f"\n`bench_layer.py {' '.join(bench_args)}`, {args.runs} runs per checkout:\n"
    )
    print(markdown_table(["row", "vs", *order], rows))
    if args.json:
        payload = {"checkouts": {k: str(v) for k, v in checkouts.items()}}
        payload["bench_args"] = bench_args
        payload["runs"] = runs
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
