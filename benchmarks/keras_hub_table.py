"""The keras_hub table: every keras_hub model of the suite, one column per backend.

For each entry of ``tests/keras_hub_models.py`` and each backend, a child
process with ``KERAS_BACKEND`` set builds the model and measures what Keras
itself does with it, the references of kerasbn's keras_hub suite:

* from_config: ``type(m).from_config(m.get_config())`` builds a model of the
  same class with as many weights (``ok``), or the error it raises;
* .keras: ``m.save(path)`` and, in a fresh process that imports only Keras
  and keras_hub, ``keras.models.load_model(path)`` give the same class, the
  same weights and the same outputs on the entry's input (``ok``, else the
  largest output difference or the error).

The first table gives those per backend, after the backend-independent
figures: BN layers at any depth (of which nodes of a functional graph),
weights, and the build time on each backend.

The second table is kerasbn's, one cell per backend::

    found/swapped of total, class, inference / training / fold, recalibrated
    of total, .keras

Its figures come from ``tests/test_keras_hub.py``, run per backend with
``KERASBN_KERAS_HUB_JSON`` set (``--suite`` runs it; ``--load`` reads files a
run wrote); a ``-`` is a figure not measured.

Usage::

    python benchmarks/keras_hub_table.py [--backends tensorflow jax torch]
        [--models all|NAME,NAME] [--suite] [--load BACKEND=PATH ...] [--no-keras]
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
# kerasbn's figures, as tests/test_keras_hub.py records them.
DIFFERENCES = ("inference", "training", "fold")


def child_env(backend: str, **extra: str) -> dict:
    return {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "tests"), str(ROOT), *filter(None, [os.getenv("PYTHONPATH")])]
        ),
        **extra,
    }


def run_child(backend: str, *args: str) -> dict:
    """Runs this script as a child on ``backend``; returns the JSON it prints
    last, or ``{"error": ...}``."""
    done = subprocess.run(
        [sys.executable, __file__, *args],
        env=child_env(backend),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


# --- the children -----------------------------------------------------------


def outputs(model, x) -> list:
    import keras
    import numpy as np

    # training=False explicitly: a plain model(x) runs the BN of DeepLabV3's
    # and SegFormer's inner Sequential models on the batch's statistics.
    results = keras.tree.flatten(model(x, training=False))
    return [np.asarray(keras.ops.convert_to_numpy(t)) for t in results]


def error(exception: Exception) -> str:
    return f"{type(exception).__name__}: {str(exception).splitlines()[0][:80]}"


def save_all(names: str, folder: str) -> dict:
    """Builds each entry, checks from_config and saves it, its input and its
    outputs under ``folder``; returns the figures."""
    import keras
    import keras_hub_models as zoo
    import numpy as np

    figures = {}
    for entry in zoo.selected(names):
        if entry.skip_reason():
            figures[entry.name] = {"skip": entry.skip_reason()}
            continue
        model, row = zoo.build_and_describe(entry)
        figures[entry.name] = row
        x = entry.inputs()
        try:
            again = type(model).from_config(model.get_config())
            same = type(again) is type(model) and len(again.weights) == len(
                model.weights
            )
            row["from_config"] = "ok" if same else "differs"
        except Exception as exception:  # what Keras does is the figure
            row["from_config"] = error(exception)
        try:
            model.save(os.path.join(folder, f"{entry.name}.keras"))
            np.savez(
                os.path.join(folder, f"{entry.name}.npz"),
                *keras.tree.flatten(x),
                *outputs(model, x),
                *[np.asarray(w) for w in model.get_weights()],
            )
        except Exception as exception:
            row["keras_file"] = error(exception)
    return figures


def load_all(names: str, folder: str) -> dict:
    """In a fresh process: loads each saved model and compares its class,
    weights and outputs with the saved ones."""
    import keras
    import keras_hub_models as zoo
    import numpy as np

    figures = {}
    for entry in zoo.selected(names):
        path = os.path.join(folder, f"{entry.name}.keras")
        if not os.path.exists(path):
            continue
        saved = np.load(os.path.join(folder, f"{entry.name}.npz"))
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        try:
            model = keras.models.load_model(path)
            inputs = keras.tree.flatten(entry.inputs())
            x = keras.tree.pack_sequence_as(entry.inputs(), arrays[: len(inputs)])
            ours = outputs(model, x)
            theirs = arrays[len(inputs) : len(inputs) + len(ours)]
            weights = arrays[len(inputs) + len(ours) :]
            same_weights = len(weights) == len(model.weights) and all(
                np.array_equal(a, b) for a, b in zip(weights, model.get_weights())
            )
            diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs))
            figures[entry.name] = {
                "keras_file": "ok"
                if same_weights and diff == 0.0
                else f"weights {'ok' if same_weights else 'DIFFER'}, out {diff:.1e}",
                "loaded_class": type(model).__name__,
            }
        except Exception as exception:
            figures[entry.name] = {"keras_file": error(exception)}
    return figures


# --- the parent -------------------------------------------------------------


def keras_figures(backend: str, names: str) -> dict:
    """Keras's reference figures of every selected entry on ``backend``."""
    with tempfile.TemporaryDirectory() as folder:
        figures = run_child(backend, "--save", folder, "--models", names)
        if "error" not in figures:
            for name, row in run_child(
                backend, "--load-saved", folder, "--models", names
            ).items():
                figures.setdefault(name, {}).update(row)
    return figures


def suite_figures(backend: str, names: str, folder: str) -> dict:
    """kerasbn's figures, from one run of the marked suite on ``backend``."""
    path = os.path.join(folder, f"{backend}.json")
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "test_keras_hub.py")],
        env=child_env(
            backend, KERASBN_KERAS_HUB=names, KERASBN_KERAS_HUB_JSON=path
        ),
        cwd=ROOT,
        capture_output=True,
    )  # fmt: skip
    return read_figures(path)


def read_figures(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as file:
        return json.load(file)["figures"]


def text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.1e}"
    return str(value)


def keras_cell(row: dict) -> str:
    if "skip" in row:
        return f"skipped: {row['skip']}"
    build = f"{row['build_s']:.1f} s" if "build_s" in row else "-"
    return (
        f"{build}, from_config {text(row.get('from_config'))}, "
        f".keras {text(row.get('keras_file'))}"
    )


def kerasbn_cell(row: dict, total) -> str:
    counts = f"{text(row.get('bn found'))}/{text(row.get('bn swapped'))} of {total}"
    differences = " / ".join(text(row.get(d)) for d in DIFFERENCES)
    return (
        f"{counts}, class {text(row.get('class kept'))}, {differences}, "
        f"{text(row.get('recalibrated'))} of {total}, "
        f".keras {text(row.get('kerasbn reload'))}"
    )


def table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        f"### {title}",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--models", default="all", help="all, or NAME,NAME")
    parser.add_argument(
        "--suite", action="store_true", help="run tests/test_keras_hub.py too"
    )
    parser.add_argument(
        "--load",
        nargs="+",
        default=[],
        metavar="BACKEND=PATH",
        help="kerasbn figures a run with KERASBN_KERAS_HUB_JSON=PATH wrote",
    )
    parser.add_argument(
        "--no-keras",
        action="store_true",
        help="leave out Keras's own figures (the first table): kerasbn's only",
    )
    parser.add_argument("--save", help=argparse.SUPPRESS)  # a child's folder
    parser.add_argument("--load-saved", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save or args.load_saved:
        child = save_all if args.save else load_all
        print(json.dumps(child(args.models, args.save or args.load_saved)))
        return

    start = time.perf_counter()
    references = {
        b: {} if args.no_keras else keras_figures(b, args.models) for b in args.backends
    }
    loaded = dict(item.split("=", 1) for item in args.load)
    with tempfile.TemporaryDirectory() as folder:
        ours = {
            b: read_figures(loaded[b])
            if b in loaded
            else suite_figures(b, args.models, folder)
            if args.suite
            else {}
            for b in args.backends
        }
    failed = {b: references.pop(b)["error"] for b in list(references)
              if "error" in references[b]}  # fmt: skip
    for backend, reason in failed.items():
        print(f"{backend}: the child failed: {reason}")
        references[backend] = {}
    sources = [*references.values(), *ours.values()]
    names = list(dict.fromkeys(n for f in sources for n in f))
    first = {n: next((f[n] for f in references.values() if "bn" in f.get(n, {})), {})
             for n in names}  # fmt: skip
    counted = {n: next((f[n]["bn total"] for f in ours.values()
                        if "bn total" in f.get(n, {})), "-")
               for n in names}  # fmt: skip
    totals = {n: first[n].get("bn", counted[n]) for n in names}
    lines = (
        []
        if args.no_keras
        else table(
            "Keras's own machinery: build time, from_config, .keras round trip",
            ["model", "class", "BN (graph nodes)", "weights", *args.backends],
            [
                [
                    n,
                    first[n].get("class", "-"),
                    f"{totals[n]} ({first[n].get('bn_graph', '-')})",
                    text(first[n].get("weights")),
                    *(keras_cell(references[b].get(n, {})) for b in args.backends),
                ]
                for n in names
            ],
        )
    )
    lines += [""] * bool(lines) + table(
        "kerasbn: found/swapped of total, class kept, inference / training / "
        "fold, recalibrated of total, .keras reload",
        ["model", *args.backends],
        [
            [n, *(kerasbn_cell(ours[b].get(n, {}), totals[n]) for b in args.backends)]
            for n in names
        ],
    )
    print("\n".join(lines))
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
