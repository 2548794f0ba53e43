"""Synchronized statistics on JAX: ``keras.distribution`` over 2 devices or 2 processes.

Each test runs JAX in fresh processes: 2 CPU devices need
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` before JAX starts, and
2 processes join with ``jax.distributed.initialize`` on 127.0.0.1 (gloo CPU
collectives). The device shards (or processes) hold very different data, and
the statistics must be those of the global batch, checked here against NumPy
on the whole batch. ``synchronized=False`` is checked too: an SPMD program
computes global statistics whatever the flag (see ``kerasbn.backends.jax``).

Run: ``KERAS_BACKEND=jax python -m pytest -q tests/test_sync_jax.py``.
"""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip(
        "keras.distribution tests of the JAX backend: run with KERAS_BACKEND=jax",
        allow_module_level=True,
    )

from conftest import np_batch_norm, np_moments, record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240.0
SHAPE = (4, 4, 3)  # one sample; BN over the last axis

# The data: 16 samples, the first 8 (device or process 0) around ``centre``,
# the last 8 around ``centre + gap``, with spread ``spread``.
DATA = {
    "apart": dict(centre=1e3, gap=5.0, spread=1.0),
    "large_mean": dict(centre=1e4, gap=0.05, spread=1e-2),
}


def make_data(centre: float, gap: float, spread: float) -> np.ndarray:
    rng = np.random.default_rng(7)
    halves = [rng.normal(centre + i * gap, spread, (8, *SHAPE)) for i in range(2)]
    return np.concatenate(halves).astype("float32")


# Trains one step of fit() with momentum 0 under DataParallel, then makes a
# jitted training call on an input sharded over the batch axis; saves arrays.
_DEVICES_SCRIPT = """
import sys
import jax, keras, numpy as np
import kerasbn

x, out = np.load(sys.argv[1]), sys.argv[2]
assert len(jax.devices()) == 2, jax.devices()
distribution = keras.distribution.DataParallel(devices=jax.devices())
keras.distribution.set_distribution(distribution)
arrays = {"data_layout": np.array(distribution.get_data_layout(x.shape).axes[0])}
for synchronized in (True, False):
    model = keras.Sequential(
        [keras.Input(x.shape[1:]), kerasbn.BatchNorm(momentum=0.0, epsilon=1e-5,
                                                    synchronized=synchronized)]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model.fit(x, np.zeros_like(x), batch_size=len(x), shuffle=False, verbose=0)
    layer = model.layers[0]
    key = f"sync{int(synchronized)}_"
    arrays[key + "moving_mean"] = np.asarray(layer.moving_mean)
    arrays[key + "moving_variance"] = np.asarray(layer.moving_variance)
    arrays[key + "predict"] = model.predict(x, batch_size=len(x), verbose=0)
    # a training call, jitted, on x sharded over the batch axis
    sharded = jax.device_put(x, distribution.get_data_layout(x.shape).backend_layout)
    arrays[key + "shard_means"] = np.array(
        [np.asarray(s.data).mean() for s in sharded.addressable_shards]
    )
    trainable = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]
    step = jax.jit(lambda x: layer.stateless_call(trainable, frozen, x, training=True))
    y, new = step(sharded)
    arrays[key + "train_output"] = np.asarray(y)
    arrays[key + "train_output_shards"] = np.array(len(y.sharding.device_set))
    arrays[key + "stateless_mean"] = np.asarray(new[0])
np.savez(out, **arrays)
"""

# One of 2 processes: joins on 127.0.0.1, trains one step of fit() on its
# local half of the global batch under DataParallel over both processes.
_PROCESS_SCRIPT = """
import sys
import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
index, port, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=index,
    initialization_timeout=60,
)
import keras, numpy as np
import kerasbn

x = np.load(data)
local = x[index * 8 : (index + 1) * 8]
assert jax.process_count() == 2 and len(jax.devices()) == 2
distribution = keras.distribution.DataParallel(devices=jax.devices())
distribution.auto_shard_dataset = False  # each process passes its own half
keras.distribution.set_distribution(distribution)
model = keras.Sequential(
    [keras.Input(x.shape[1:]), kerasbn.BatchNorm(momentum=0.0, epsilon=1e-5,
                                                synchronized=True)]
)
model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
model.fit(local, np.zeros_like(local), batch_size=8, shuffle=False, verbose=0)
layer = model.layers[0]
np.savez(out, local_mean=local.mean(), moving_mean=np.asarray(layer.moving_mean),
         moving_variance=np.asarray(layer.moving_variance))
"""


def _env(**extra) -> dict:
    return {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **extra,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_global_statistics(mean, variance, x, name):
    """``mean``/``variance`` against NumPy's over the whole batch ``x``."""
    ref_mean, ref_var = np_moments(x, [3])
    np.testing.assert_allclose(mean, ref_mean.ravel(), rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(variance, ref_var.ravel(), rtol=1e-5)
    record(
        f"JAX {name} moving variance vs NumPy (relative)",
        variance / ref_var.ravel(),
        1.0,
    )
    return ref_mean, ref_var


@pytest.mark.parametrize("data", sorted(DATA))
def test_data_parallel_over_two_devices_gives_global_statistics(tmp_path, data):
    x = make_data(**DATA[data])
    np.save(tmp_path / "x.npy", x)
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_DEVICES_SCRIPT)]
        + [str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        check=True,
        timeout=TIMEOUT_S,
        capture_output=True,
    )
    out = np.load(tmp_path / "out.npz")
    assert str(out["data_layout"]) == "batch"
    for synchronized in (1, 0):
        key = f"sync{synchronized}_"
        # each device holds its own half: the shards' means are far apart
        np.testing.assert_allclose(
            out[key + "shard_means"], [x[:8].mean(), x[8:].mean()], rtol=1e-6
        )
        assert int(out[key + "train_output_shards"]) == 2
        mean, var = _check_global_statistics(
            out[key + "moving_mean"],
            out[key + "moving_variance"],
            x,
            f"DataParallel 2 devices, synchronized={bool(synchronized)}, {data}",
        )
        np.testing.assert_allclose(
            out[key + "stateless_mean"], mean.ravel(), rtol=1e-7, atol=1e-6
        )
        # outputs normalized with the global statistics (the moving ones in
        # predict, the batch's in the training call)
        expected = np_batch_norm(x, mean, var, epsilon=1e-5)
        tol = dict(atol=1e-4)
        if data == "large_mean" and synchronized:
            # synchronized=True normalizes with kerasbn.formulas.normalize, x * scale
            # + offset: the output inherits the float32 rounding of x (5e-4 at
            # 1e4) scaled by 1 / spread, i.e. up to about 0.06; the statistics
            # above stay exact. (synchronized=False takes the fast path,
            # which normalizes x - shift and keeps the output exact.)
            tol = dict(atol=0.1)
        np.testing.assert_allclose(out[key + "train_output"], expected, **tol)
        record(
            f"JAX DataParallel training output vs NumPy ({data}, "
            f"synchronized={bool(synchronized)})",
            out[key + "train_output"],
            expected,
        )
        if data == "apart":
            # (kerasbn.formulas.normalize forms x * scale + offset: with a mean of
            # 1e4 the inference output inherits the rounding of that offset)
            np.testing.assert_allclose(out[key + "predict"], expected, **tol)


def test_two_processes_with_jax_distributed_give_global_statistics(tmp_path):
    x = make_data(**DATA["apart"])
    np.save(tmp_path / "x.npy", x)
    port = _free_port()
    processes = []
    try:
        for index in range(2):
            log = open(tmp_path / f"process_{index}.log", "wb")
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", textwrap.dedent(_PROCESS_SCRIPT)]
                    + [
                        str(index),
                        str(port),
                        str(tmp_path / "x.npy"),
                        str(tmp_path / f"out_{index}.npz"),
                    ],
                    env=_env(XLA_FLAGS=""),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in processes):
            failed = [p for p in processes if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        codes = [p.poll() for p in processes]
        logs = [
            (tmp_path / f"process_{i}.log").read_text(errors="replace")[-3000:]
            for i in range(2)
        ]
        assert codes == [0, 0], f"exit codes {codes}:\n" + "\n----\n".join(logs)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait()
    results = [np.load(tmp_path / f"out_{i}.npz") for i in range(2)]
    # each process fed only its own half of the batch
    np.testing.assert_allclose(
        [float(r["local_mean"]) for r in results],
        [x[:8].mean(), x[8:].mean()],
        rtol=1e-6,
    )
    for r in results:
        _check_global_statistics(
            r["moving_mean"], r["moving_variance"], x, "jax.distributed 2 processes"
        )
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_array_equal(results[0][name], results[1][name])


def test_distributed_example_trains_on_two_devices_like_one(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "distributed_sync_bn.py"),
            "--backend=jax",
            "--workers=2",
            "--model=tiny",
            "--samples=128",
            "--batch-size=32",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {
        line.split(":")[0]: float(line.split(":")[1].split()[0])
        for line in result.stdout.splitlines()
        if line.startswith(("largest difference", "  for scale"))
    }
    assert lines["largest difference between the devices' copies"] == 0.0
    # two devices against one on the same batches: float32 rounding only
    assert lines["largest difference from one device on the same batches"] < 1e-5
