"""BN at ResNet shapes on the accelerator: kerasbn against its peers, each backend.

For every Keras backend that is installed (or those given by ``--backends``),
the script runs itself in a fresh process with ``KERAS_BACKEND`` set, so that
each backend has its own process and device. In that process it times, for
each ResNet shape (channels last) and each dtype (float32, and bfloat16 under
the ``mixed_bfloat16`` policy):

* **train**: one BN train step: forward in training mode, the gradients with
  respect to ``x``, gamma and beta for a fixed upstream gradient, and the
  moving-statistics update (the steps of ``bench_layer.py``,
  ``steps_<backend>.py``, compiled as that backend compiles them);
* **infer**: the layer in inference mode.

Contenders in the same run: kerasbn and ``keras.layers.BatchNormalization``
on every backend; on JAX ``flax.linen.BatchNorm`` under ``jit``; on PyTorch
``torch.nn.BatchNorm2d`` (cuDNN on an NVIDIA GPU) on the same channels-last
data (``torch_nn``, PyTorch's ``channels_last`` memory format) and on a
contiguous NCHW copy of it (``torch_nn_nchw``, cuDNN's own layout).

The **floor** is what memory bandwidth allows: a train step moves at least 8
tensors of ``x``'s size, an inference call 2 (see ``bench_layer.py``). The
bandwidth is that of a large device copy (bytes read and written / time),
timed in the same interleaved rounds; "% floor" is floor time / step time.
Each contender's "kerasbn speed-up" is its median time over kerasbn's.

``--smoke`` runs the same code on the CPU in seconds (one tiny shape, two
rounds), which is what CI runs; its figures mean nothing.

Run:
    python benchmarks/bench_gpu.py                     # all backends, <= 5 min
    python benchmarks/bench_gpu.py --backends torch --json results/gpu.json
    python benchmarks/bench_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from harness import (  # noqa: E402
    BACKENDS,
    interleaved_medians,
    machine,
    markdown_table,
    write_json,
)

SHAPES = [(32, 56, 56, 64), (32, 28, 28, 128), (32, 14, 14, 256), (32, 7, 7, 512)]
SMOKE_SHAPES = [(2, 6, 6, 8)]
DTYPES = ("float32", "bfloat16")
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
PASSES = {"train": 8, "infer": 2}
COPY_BYTES = {"device": 1 << 28, "smoke": 1 << 22}
TIME_LIMIT_S = 290.0  # the whole run, all backends
RESULT_TAG = "#bench_gpu-result "


# ------------------------------------------------------------------- parent
def installed_backends() -> list[str]:
    """The Keras backends whose framework can be imported here."""
    return [b for b in BACKENDS if importlib.util.find_spec(b) is not None]


def run_child(backend: str, args, deadline: float) -> dict:
    """Runs this script for ``backend`` in a fresh process; returns its result."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if args.smoke:  # the CPU, whatever accelerator the machine has
        env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    command = [sys.executable, __file__, "--child", backend, "--rounds"]
    command += [str(args.rounds), "--deadline", str(deadline)]
    command += ["--smoke"] if args.smoke else []
    try:
        done = subprocess.run(
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(deadline - time.time(), 1.0) + 30.0,
        )
    except subprocess.TimeoutExpired:
        return {"backend": backend, "error": "timed out"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    return {"backend": backend, "error": "\n".join(tail)}


def backend_table(result: dict) -> str:
    """One row per (shape, dtype, step, contender)."""
    header = [
        "shape",
        "dtype",
        "step",
        "contender",
        "ms",
        "kerasbn speed-up",
        "floor ms",
        "% floor",
    ]
    rows = []
    for r in result["results"]:
        for step in ("train", "infer"):
            times = r["median_s"][step]
            floor = r["floor_s"][step]
            for name, t in times.items():
                rows.append(
                    [
                        str(tuple(r["shape"])),
                        r["dtype"],
                        step,
                        name,
                        f"{t * 1e3:.3f}",
                        f"{t / times['kerasbn']:.2f}x",
                        f"{floor * 1e3:.3f}",
                        f"{100 * floor / t:.0f}%",
                    ]
                )
    return markdown_table(header, rows)


def worst_ratios(result: dict) -> dict[str, tuple[float, str]]:
    """Per peer: kerasbn's smallest speed-up over it, and where."""
    worst: dict[str, tuple[float, str]] = {}
    for r in result["results"]:
        for step in ("train", "infer"):
            times = r["median_s"][step]
            for name, t in times.items():
                if name == "kerasbn":
                    continue
                ratio = t / times["kerasbn"]
                where = f"{tuple(r['shape'])} {r['dtype']} {step}"
                if name not in worst or ratio < worst[name][0]:
                    worst[name] = (ratio, where)
    return worst


def report(results: list[dict]) -> None:
    for result in results:
        backend = result["backend"]
        print(f"\n## {backend}\n")
        if "error" in result:
            print(f"failed:\n{result['error']}")
            continue
        print(f"device: {result['device']}; copy bandwidth ", end="")
        print(f"{result['copy_bandwidth_GBps']:.1f} GB/s\n")
        print(backend_table(result))
        for name, (ratio, where) in worst_ratios(result).items():
            print(f"\nworst kerasbn speed-up over {name}: {ratio:.2f}x ({where})")
        for skipped in result.get("skipped", []):
            print(f"skipped (time limit): {skipped}")


# -------------------------------------------------------------------- child
def device_name(backend: str) -> str:
    """The device the child's tensors live on, in words."""
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return f"{d.platform}: {getattr(d, 'device_kind', d)}"
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name()}"
        return f"cpu: {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"gpu: {details.get('device_name', gpus[0].name)}"
    return f"cpu: {os.cpu_count()} cores"


def synchronizer(backend: str):
    """A callable that waits for the device, where a step's call does not."""
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return tf.test.experimental.sync_devices
    return None  # JAX blocks and torch synchronizes inside the steps


def contenders(backend: str, steps, dtype: str) -> dict[str, tuple]:
    """name -> (layer factory, layout): the layers compared on this backend."""
    import keras

    import kerasbn

    policy = POLICIES[dtype]
    found = {
        "kerasbn": (lambda: kerasbn.BatchNorm(dtype=policy), "nhwc"),
        "keras": (lambda: keras.layers.BatchNormalization(dtype=policy), "nhwc"),
    }
    if backend == "jax":
        output = None if dtype == "float32" else "bfloat16"
        found["flax"] = (lambda: steps.FlaxBatchNorm(dtype=output), "nhwc")
    if backend == "torch":
        found["torch_nn"] = (lambda: steps.TorchNNBatchNorm(axis=-1), "nhwc")
        found["torch_nn_nchw"] = (lambda: steps.TorchNNBatchNorm(axis=1), "nchw")
    return found


def measure(backend: str, steps, shape, dtype: str, rounds: int, budget_s: float):
    """Medians (seconds) of every contender's train and inference step."""
    import keras
    import numpy as np

    sync = synchronizer(backend)
    rng = np.random.default_rng(0)

    def tensor(array):
        return keras.ops.cast(steps.to_tensor(array), dtype)

    x_np = rng.normal(0.5, 2.0, shape).astype("float32")
    dy_np = rng.normal(0.0, 1.0, shape).astype("float32")
    data = {}
    calls = {}
    for name, (factory, layout) in contenders(backend, steps, dtype).items():
        if layout not in data:
            arrays = (x_np, dy_np)
            if layout == "nchw":
                arrays = (np.ascontiguousarray(a.transpose(0, 3, 1, 2)) for a in arrays)
            data[layout] = tuple(tensor(a) for a in arrays)
        x, dy = data[layout]
        layer = factory()
        layer_shape = tuple(x.shape)
        layer.build(layer_shape)
        train = steps.train_step(layer, layer_shape)
        infer = steps.inference_step(layer, layer_shape)
        calls[("train", name)] = lambda train=train, x=x, dy=dy: train(x, dy)
        calls[("infer", name)] = lambda infer=infer, x=x: infer(x)
    if sync is not None:
        calls = {k: lambda f=f: (f(), sync()) for k, f in calls.items()}
    for fn in calls.values():  # trace, compile and warm up
        fn()
    fn = calls[("train", "keras")]
    start = time.perf_counter()
    fn()
    repeats = max(1, min(200, round(budget_s / max(time.perf_counter() - start, 1e-6))))
    medians = interleaved_medians(calls, rounds, repeats)
    result = {"shape": list(shape), "dtype": dtype, "median_s": {}}
    for (step, name), t in medians.items():
        result["median_s"].setdefault(step, {})[name] = t
    return result


def copy_seconds(backend: str, steps, nbytes: int, rounds: int) -> float:
    """Median seconds of one device copy of ``nbytes`` (float32)."""
    import numpy as np

    buffer = steps.to_tensor(np.ones(nbytes // 4, np.float32))
    copy = steps.copy_step(buffer)
    sync = synchronizer(backend)
    if sync is not None:
        copy = lambda copy=copy: (copy(), sync())  # noqa: E731
    copy()
    return interleaved_medians({"copy": copy}, rounds, 3)["copy"]


def child(backend: str, rounds: int, smoke: bool, deadline: float) -> None:
    """Measures every shape and dtype on ``backend``; prints the result line."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    steps = importlib.import_module(f"steps_{backend}")
    nbytes = COPY_BYTES["smoke" if smoke else "device"]
    copy_s = copy_seconds(backend, steps, nbytes, max(rounds, 3))
    bandwidth = 2 * nbytes / copy_s
    out = {
        "backend": backend,
        "device": device_name(backend),
        "machine": machine(),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "results": [],
        "skipped": [],
    }
    for shape in SMOKE_SHAPES if smoke else SHAPES:
        for dtype in DTYPES:
            if time.time() > deadline:
                out["skipped"].append(f"{shape} {dtype}")
                continue
            r = measure(backend, steps, shape, dtype, rounds, 0.0 if smoke else 0.02)
            nbytes_x = math.prod(shape) * (4 if dtype == "float32" else 2)
            r["floor_s"] = {s: p * nbytes_x / bandwidth for s, p in PASSES.items()}
            out["results"].append(r)
            print(f"{backend} {shape} {dtype}: {r['median_s']}", flush=True)
    print(RESULT_TAG + json.dumps(out), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny, on the CPU")
    parser.add_argument("--rounds", type=int, default=None, help="default 15 (2)")
    parser.add_argument("--backends", nargs="*", choices=BACKENDS)
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S)
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.smoke else 15
    if args.child:
        child(args.child, args.rounds, args.smoke, args.deadline)
        return
    backends = args.backends or installed_backends()
    start = time.time()
    results = []
    for i, backend in enumerate(backends):
        # Each backend gets an equal share of the time that is left.
        share = (start + args.time_limit - time.time()) / (len(backends) - i)
        results.append(run_child(backend, args, time.time() + share))
        print(f"# {backend}: {time.time() - start:.0f} s so far", flush=True)
    report(results)
    write_json(args.json, {"smoke": args.smoke, "results": results})
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
