"""One BN layer, side by side: kerasbn against its peers on one Keras backend.

``--backend tensorflow|jax|torch`` picks the backend (default
``$KERAS_BACKEND``, else TensorFlow) and its contenders, defined in
``steps_<backend>.py``: kerasbn, Keras 3's BN on that backend, and the
backend's native peer (tf.keras's fused BN; ``flax.linen.BatchNorm``;
``torch.nn.BatchNorm*d``). For each shape every contender gets the same
weights and times two steps, compiled as that backend compiles (see the
steps module):

* **train**: forward and backward with a fixed upstream gradient, returning
  ``y`` and the gradients with respect to ``x``, gamma and beta, and
  updating the moving statistics;
* **infer**: the layer in inference mode.

``--harness eager`` (PyTorch) times the train step as a hand-written loop
runs it instead: ``layer(x, training=True)``, then ``backward()`` of
``(y * dy).sum()`` (``steps_torch.eager_train_step``).

Rounds are interleaved (the order rotates) and the table shows medians and
kerasbn's speed-up over each peer (peer time / kerasbn time). The floor is
what memory bandwidth allows: a train step must move at least 8 tensors of
``x``'s size (forward: read x for the statistics, read x and write y;
backward: read dy and x for the reductions, read both and write dx), and an
inference call 2 (read x, write y). The bandwidth is that of copying ``x``
(the faster of NumPy's ``copyto`` into a ready buffer and the backend's own
copy), measured in the same rounds; "% floor" is floor time / measured time.

``--memory`` adds each contender's memory for the train step, each measured
in a fresh process: the peak resident set size (RSS) during three steps, above
the RSS before them.

``--block`` times BN between its neighbours instead, as it runs in a model:
the train step of a block ``producer -> BN -> ReLU`` whose BN input has each
shape, the producer a 1x1 convolution (``Conv1D/2D/3D``, the BN's data
format) or, for 2-D inputs, a ``Dense`` layer, both without bias, from
``BLOCK_IN_CHANNELS`` channels. The step is the gradient of
``sum(block(x) * dy)`` with respect to the trainable weights, so the block's
output is consumed rather than returned and the compiler may fuse BN's
element-wise work into its neighbours. The contenders are the block with
kerasbn, with Keras's BN, the native peer's block (tf.keras;
``flax.linen``, channels-last only; ``torch.nn`` in PyTorch's
``channels_last`` memory format) and the block without BN; "BN in block" is
each block's time minus the block without BN. Every contender's block starts
from the same weights, and their losses are checked to agree.

Run:
    python benchmarks/bench_layer.py
    python benchmarks/bench_layer.py --backend jax
    python benchmarks/bench_layer.py --rounds 21 --memory --json results/layer.json
    python benchmarks/bench_layer.py --backend torch --shapes 32,24,24,10 32,100
    python benchmarks/bench_layer.py --backend torch --harness eager
    python benchmarks/bench_layer.py --backend jax --kernels
    python benchmarks/bench_layer.py --backend jax --block

The scripts import ``kerasbn`` from ``PYTHONPATH``, so one copy of them can
time two checkouts of kerasbn (``compare_checkouts.py`` alternates them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from harness import (  # noqa: E402
    add_backend_flag,
    add_output_flags,
    interleaved_medians,
    machine,
    markdown_table,
    memory_in_child,
    ratio_spreads,
    runs_in_children,
    select_backend,
    spread_table,
    step_memory_mb,
    write_json,
)

BACKEND = select_backend()

import importlib  # noqa: E402
import math  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerasbn  # noqa: E402

steps = importlib.import_module(f"steps_{BACKEND}")
CONTENDERS = steps.CONTENDERS

# (shape, axis): the ResNet-like conv shapes, a dense layer, channels-first,
# 3-D conv, and the lecture CNN's own three BN inputs.
SHAPES = [
    ((32, 56, 56, 64), -1),
    ((32, 28, 28, 256), -1),
    ((256, 1024), -1),
    ((32, 64, 56, 56), 1),
    ((8, 16, 32, 32, 32), -1),
    ((32, 24, 24, 10), -1),
    ((32, 8, 8, 20), -1),
    ((32, 100), -1),
]
TRAIN_PASSES, INFER_PASSES = 8, 2
BLOCK_IN_CHANNELS = 16  # the block producer's input channels


def build(name: str, shape, axis: int, weights=None):
    """A built layer of contender ``name`` (with ``weights`` if given).

    A steps module whose peers are not Keras layers defines its own ``build``.
    """
    if hasattr(steps, "build"):
        return steps.build(name, shape, axis, weights)
    layer = CONTENDERS[name](axis=axis)
    layer.build(shape)
    if weights is not None:
        layer.set_weights(weights)
    return layer


def copiers(x_np, x):
    """Ways to copy ``x``: NumPy into a ready buffer, and the backend's own."""
    target = np.empty_like(x_np)
    calls = {"copy_numpy": lambda: np.copyto(target, x_np)}
    if hasattr(steps, "copy_step"):
        calls["copy_backend"] = steps.copy_step(x)
    return calls


def calibrate(fn, budget_s: float) -> int:
    """Calls per round so that one round of ``fn`` takes about ``budget_s``."""
    fn()
    start = time.perf_counter()
    fn()
    return max(1, min(200, round(budget_s / max(time.perf_counter() - start, 1e-6))))


def measure_shape(
    shape, axis: int, rounds: int, budget_s: float, harness: str = "compiled"
) -> dict:
    """Medians (seconds) of every contender's train and inference step.

    ``harness="eager"`` times the train step as ``steps.eager_train_step``
    (PyTorch) defines it.
    """
    make_train = steps.train_step if harness == "compiled" else steps.eager_train_step
    rng = np.random.default_rng(0)
    x_np = rng.normal(0.5, 2.0, shape).astype("float32")
    x = steps.to_tensor(x_np)
    dy = steps.to_tensor(rng.normal(0.0, 1.0, shape).astype("float32"))
    layers = {"kerasbn": build("kerasbn", shape, axis)}
    weights = layers["kerasbn"].get_weights()
    for name in CONTENDERS:
        layers.setdefault(name, build(name, shape, axis, weights))
    calls = {}
    for name, layer in layers.items():
        train = make_train(layer, shape)
        infer = steps.inference_step(layer, shape)
        calls[f"train/{name}"] = lambda train=train: train(x, dy)
        calls[f"infer/{name}"] = lambda infer=infer: infer(x)
    calls.update(copiers(x_np, x))
    for fn in calls.values():  # trace and warm up
        fn()
    repeats = calibrate(calls["train/keras"], budget_s)
    medians = interleaved_medians(calls, rounds, repeats)
    copy_s = min(medians.pop(k) for k in list(medians) if k.startswith("copy_"))
    nbytes = x_np.nbytes
    return {
        "shape": list(shape),
        "axis": axis,
        "formulation": formulation_label(shape, axis),
        "layers": {
            n: f"{type(v).__module__}.{type(v).__name__}" for n, v in layers.items()
        },
        "copy_bandwidth_GBps": 2 * nbytes / copy_s / 1e9,
        "floor_s": {
            "train": TRAIN_PASSES / 2 * copy_s,
            "infer": INFER_PASSES / 2 * copy_s,
        },
        "median_s": medians,
    }


def formulation_label(shape, axis: int) -> str:
    """kerasbn's formulation of this train step, or ``"?"`` where the kerasbn
    on ``PYTHONPATH`` predates :func:`kerasbn.backends.formulation`; ``"self-check"``
    where Keras's BN takes kerasbn's place."""
    if CONTENDERS["kerasbn"] is CONTENDERS["keras"]:
        return "self-check"
    try:
        return steps.formulation(shape, axis)
    except (AttributeError, TypeError):
        return "?"


def table(results: list[dict], memory: dict | None) -> str:
    peers = list(steps.PEERS)
    header = [
        "shape (axis)",
        "step",
        *(f"{name} ms" for name in CONTENDERS),
        *(f"vs {label}" for label in steps.PEERS.values()),
        "floor ms",
        "% floor " + " / ".join(CONTENDERS),
    ]
    rows = []
    for r in results:
        label = f"{tuple(r['shape'])} ({r['axis']})"
        for step in ("train", "infer"):
            t = {name: r["median_s"][f"{step}/{name}"] for name in CONTENDERS}
            floor = r["floor_s"][step]
            note = f" [{r['formulation']}]" if step == "train" else ""
            rows.append(
                [
                    label + note,
                    step,
                    *(f"{t[n] * 1e3:.3f}" for n in CONTENDERS),
                    *(f"{t[p] / t['kerasbn']:.2f}x" for p in peers),
                    f"{floor * 1e3:.3f}",
                    " / ".join(f"{100 * floor / t[n]:.0f}%" for n in CONTENDERS),
                ]
            )
    text = markdown_table(header, rows)
    if memory:
        mem_rows = []
        for (shape, axis), m in memory.items():
            rss = {n: m[n]["step_rss_mb"] for n in CONTENDERS}
            mem_rows.append(
                [
                    f"{tuple(shape)} ({axis})",
                    *(f"{rss[n]:.0f}" for n in CONTENDERS),
                    f"{rss['kerasbn'] - rss['keras']:+.0f}",
                ]
            )
        header = [
            "shape (axis)",
            *(f"{n} MiB" for n in CONTENDERS),
            "kerasbn - Keras 3",
        ]
        text += "\n\nPeak RSS of three train steps above the RSS before them:\n\n"
        text += markdown_table(header, mem_rows)
    return text


def print_kernels(shapes, block: bool = False) -> None:
    """The XLA kernels of the compiled train steps (of the layers, or with
    ``block`` of the blocks) per shape, and XLA's estimate of the bytes each
    step accesses, in units of the BN input's size."""
    rows = []
    for shape, axis in shapes:
        counts = {}
        for name, norm in (
            ("kerasbn", kerasbn.BatchNorm),
            ("keras", keras.layers.BatchNormalization),
        ):
            if block:
                model = keras_block(norm(axis=axis), shape, axis)
                in_shape = block_input_shape(shape, axis)
                counts[name] = steps.block_kernels(model, in_shape, shape)
            else:
                counts[name] = steps.train_kernels(build(name, shape, axis), shape)
        size = 4 * math.prod(shape)
        rows.append(
            [
                f"{tuple(shape)} ({axis})",
                *(counts[n][0] for n in counts),
                *(f"{counts[n][1] / size:.1f}" for n in counts),
            ]
        )
    header = ["BN input (axis)" if block else "shape (axis)"]
    header += ["kerasbn kernels", "Keras 3 kernels"]
    header += ["kerasbn bytes / input", "Keras 3 bytes / input"]
    print(markdown_table(header, rows))


def block_input_shape(shape, axis: int) -> tuple[int, ...]:
    """The block's input: ``shape`` with ``BLOCK_IN_CHANNELS`` channels."""
    shape = list(shape)
    shape[axis] = BLOCK_IN_CHANNELS
    return tuple(shape)


def keras_block(norm, shape, axis: int) -> keras.Model:
    """A built Keras block ``producer -> norm -> ReLU`` (no ``norm`` if None)."""
    rank = len(shape)
    if rank == 2:
        producer = keras.layers.Dense(shape[-1], use_bias=False)
    else:
        conv = {3: keras.layers.Conv1D, 4: keras.layers.Conv2D, 5: keras.layers.Conv3D}
        data_format = "channels_last" if axis % rank == rank - 1 else "channels_first"
        producer = conv[rank](shape[axis], 1, use_bias=False, data_format=data_format)
    in_shape = block_input_shape(shape, axis)
    layers = [producer] + ([] if norm is None else [norm]) + [keras.layers.ReLU()]
    return keras.Sequential(
        [keras.Input(in_shape[1:], batch_size=in_shape[0]), *layers]
    )


def measure_block(shape, axis: int, rounds: int, budget_s: float) -> dict:
    """Medians (seconds) of every contender's block train step (``--block``)."""
    rng = np.random.default_rng(0)
    in_shape = block_input_shape(shape, axis)
    x = steps.to_tensor(rng.normal(0.5, 2.0, in_shape).astype("float32"))
    # Positive: the loss sums positive terms, so contenders' losses compare.
    dy = steps.to_tensor(rng.uniform(0.5, 1.5, shape).astype("float32"))
    ours = keras_block(kerasbn.BatchNorm(axis=axis), shape, axis)
    weights = ours.get_weights()
    theirs = keras_block(keras.layers.BatchNormalization(axis=axis), shape, axis)
    theirs.set_weights(weights)
    bare = keras_block(None, shape, axis)
    bare.set_weights(weights[:1])
    blocks = {"kerasbn": steps.block_step(ours), "keras": steps.block_step(theirs)}
    peer = next(p for p in steps.PEERS if p != "keras")
    native = steps.native_block(shape, axis, in_shape, weights)
    if native is not None:
        blocks[peer] = native
    blocks["no_bn"] = steps.block_step(bare)
    losses = {name: float(np.asarray(step(x, dy)[0])) for name, step in blocks.items()}
    for name in blocks:  # the same block, the same loss (ReLU of BN's output)
        if name != "no_bn" and not np.isclose(losses[name], losses["keras"], 1e-3):
            raise AssertionError(f"block losses disagree at {shape}: {losses}")
    calls = {name: lambda step=step: step(x, dy) for name, step in blocks.items()}
    for fn in calls.values():  # warm up
        fn()
    repeats = calibrate(calls["keras"], budget_s)
    return {
        "shape": list(shape),
        "axis": axis,
        "block_input": list(in_shape),
        "median_s": interleaved_medians(calls, rounds, repeats),
    }


def block_table(results: list[dict]) -> str:
    """The ``--block`` table: each block's time, kerasbn's speed-up over each
    peer's block, and BN's share (the block's time minus the block without BN)."""
    peers = {p: label for p, label in steps.PEERS.items()}
    header = [
        "BN input (axis)",
        *(f"{n} ms" for n in ["kerasbn", *peers, "no_bn"]),
        *(f"vs {label}" for label in peers.values()),
        "BN in block ms: " + " / ".join(["kerasbn", *peers]),
    ]
    rows = []
    for r in results:
        t = r["median_s"]
        names = ["kerasbn", *peers]
        rows.append(
            [
                f"{tuple(r['shape'])} ({r['axis']})",
                *(f"{t[n] * 1e3:.3f}" if n in t else "-" for n in [*names, "no_bn"]),
                *(f"{t[p] / t['kerasbn']:.2f}x" if p in t else "-" for p in peers),
                " / ".join(
                    f"{(t[n] - t['no_bn']) * 1e3:.3f}" if n in t else "-" for n in names
                ),
            ]
        )
    return markdown_table(header, rows)


def rss_child(name: str, shape_text: str, axis_text: str) -> None:
    """Child process: the memory of three train steps, printed as JSON."""
    shape, axis = tuple(int(v) for v in shape_text.split(",")), int(axis_text)
    rng = np.random.default_rng(0)  # NumPy: no backend buffers freed before
    x, dy = (steps.to_tensor(rng.standard_normal(shape, np.float32)) for _ in "xy")
    step = steps.train_step(build(name, shape, axis), shape)
    step(x, dy)  # trace before measuring

    def run():
        for _ in range(3):
            step(x, dy)

    print(json.dumps(step_memory_mb(run)))


def parse_shapes(texts):
    if not texts:
        return SHAPES
    wanted = {tuple(int(v) for v in t.split(",")) for t in texts}
    return [(s, a) for s, a in SHAPES if s in wanted]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="fresh processes, one after another; the table gives each cell's "
        "speed-up as the median over runs and its range (default 3)",
    )
    parser.add_argument("--budget", type=float, default=0.03, help="s per round")
    parser.add_argument("--shapes", nargs="*", help="e.g. 32,24,24,10")
    parser.add_argument(
        "--harness",
        choices=("compiled", "eager"),
        default="compiled",
        help="train step: the backend's compiled step (default), or on PyTorch "
        "an eager layer(x, training=True) and backward() of (y * dy).sum()",
    )
    parser.add_argument(
        "--block",
        action="store_true",
        help="time the train step of producer -> BN -> ReLU blocks instead",
    )
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="JAX: print the XLA kernels and bytes accessed of each train step "
        "(with --block, of each block's), then stop",
    )
    parser.add_argument(
        "--self-check",
        action="store_true",
        help="time Keras's BN in kerasbn's place: each 'vs Keras 3' ratio is then "
        "Keras's BN against itself, the harness's noise floor on this machine",
    )
    add_backend_flag(parser)
    add_output_flags(parser, "peak RSS per step")
    args = parser.parse_args(argv)
    if args.self_check:
        if args.block:
            parser.error("--self-check times single layers; drop --block")
        CONTENDERS["kerasbn"] = CONTENDERS["keras"]
        print("# self-check: keras.layers.BatchNormalization in kerasbn's place")
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    if args.kernels:
        if not hasattr(steps, "train_kernels"):
            parser.error(f"--kernels counts XLA kernels (JAX); got --backend {BACKEND}")
        print_kernels(parse_shapes(args.shapes), args.block)
        return
    if args.harness == "eager" and not hasattr(steps, "eager_train_step"):
        parser.error(
            f"--harness eager is defined for --backend torch; got --backend {BACKEND}"
        )
    if args.runs > 1:
        run_in_children(args, sys.argv[1:] if argv is None else argv)
        return
    env = machine()
    print(f"# {env}", flush=True)
    if args.block:
        run_blocks(args, env)
        return
    results = []
    for shape, axis in parse_shapes(args.shapes):
        results.append(
            measure_shape(shape, axis, args.rounds, args.budget, args.harness)
        )
        r = results[-1]
        print(
            f"{tuple(shape)} axis={axis}: "
            + " ".join(f"{k}={v * 1e3:.3f}ms" for k, v in r["median_s"].items())
            + f" copy {r['copy_bandwidth_GBps']:.1f} GB/s",
            flush=True,
        )
    memory = None
    if args.memory:
        memory = {
            (shape, axis): {
                name: memory_in_child(
                    __file__, [name, ",".join(map(str, shape)), str(axis)]
                )
                for name in CONTENDERS
            }
            for shape, axis in parse_shapes(args.shapes)
        }
    print(f"\n# load average at the end: {os.getloadavg()}")
    print(table(results, memory))
    payload = {"machine": env, "rounds": args.rounds, "results": results}
    payload["harness"] = args.harness
    payload["contenders"] = list(CONTENDERS)
    if memory:
        payload["memory_mb"] = [
            {"shape": list(s), "axis": a, **v} for (s, a), v in memory.items()
        ]
    write_json(args.json, payload)


def run_blocks(args, env: dict) -> None:
    """``--block``: every shape's block step, a table and the JSON file."""
    results = []
    for shape, axis in parse_shapes(args.shapes):
        try:
            results.append(measure_block(shape, axis, args.rounds, args.budget))
        except Exception as error:  # e.g. no NCHW convolution without oneDNN
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = next((line for line in lines if "support" in line), lines[0])
            print(f"block {tuple(shape)} axis={axis}: skipped: {reason}", flush=True)
            continue
        medians = results[-1]["median_s"]
        print(
            f"block {tuple(shape)} axis={axis}: "
            + " ".join(f"{k}={v * 1e3:.3f}ms" for k, v in medians.items()),
            flush=True,
        )
    print(f"\n# load average at the end: {os.getloadavg()}")
    print(block_table(results))
    payload = {"machine": env, "rounds": args.rounds, "mode": "block"}
    payload["results"] = results
    write_json(args.json, payload)


def run_in_children(args, argv) -> None:
    """``--runs N``: N fresh runs, then every cell's speed-up over runs."""
    argv = list(argv)
    for flag in ("--runs", "--json"):  # the children's own
        while flag in argv:
            del argv[argv.index(flag) : argv.index(flag) + 2]
    payloads = runs_in_children(__file__, argv, args.runs)
    steps_timed = [""] if args.block else ["train", "infer"]
    cells = ratio_spreads(payloads, list(steps.PEERS), steps_timed)
    print(f"\n# {args.runs} runs of {args.rounds} interleaved rounds each")
    print(f"# {payloads[0]['machine']}")
    print(spread_table(cells, steps.PEERS))
    keras_cells = [c for c in cells if c["peer"] == "keras"]
    worst = min(keras_cells, key=lambda c: c["ratio"])
    print(
        f"\nworst speed-up over Keras 3's BN: {worst['ratio']:.2f}x "
        f"(range {worst['low']:.2f}-{worst['high']:.2f}) at "
        f"{tuple(worst['shape'])} ({worst['axis']}) {worst['step']}; lowest single "
        f"run {min(c['low'] for c in keras_cells):.2f}x"
    )
    write_json(
        args.json,
        {"machine": payloads[0]["machine"], "runs": payloads, "cells": cells},
    )


if __name__ == "__main__":
    sys.exit(main())
