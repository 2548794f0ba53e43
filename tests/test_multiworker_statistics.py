"""recalibrate and diagnose across workers: every rank equal, and equal to one process.

Each engine of the active backend runs two worker processes on 127.0.0.1
(this file run as a script; killed at ``TIMEOUT_S`` by the launcher of
``examples/distributed_sync_bn.py``):

* TensorFlow: ``MultiWorkerMirroredStrategy`` (``TF_CONFIG``), the model
  built in the strategy's scope; ``diagnose`` runs inside the scope,
  ``recalibrate`` outside it (the strategy is found from the variables);
* JAX: ``jax.distributed`` processes (gloo) under a
  ``keras.distribution.DataParallel`` over both processes' devices;
* PyTorch: a ``torch.distributed`` gloo process group.

The workers hold uneven shares of the data (29 and 24 samples, batches of 8).
Every worker must end with the same moving statistics and the same diagnosis,
bit for bit, and both must equal those of this process passing every
worker's batches in rank order, to float32 rounding (the float64 merge runs
in another order). The first BN layer's statistics are also checked against
NumPy float64 on the raw inputs.

In one process, a ``tf.distribute.MirroredStrategy`` over two logical CPUs
(set up by conftest) and a ``DataParallel`` over two JAX CPU devices give
the one-process results too, and every replica's copy of the statistics.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240.0
WORKERS = 2
SHARES = (29, 24)  # samples per worker
BATCH = 8
SHAPE = (6, 6, 2)
BN_NAMES = ("bn1", "bn2")


# ------------------------------------------------------- model and data
def build_model() -> keras.Model:
    """A CNN with a kerasbn BN and a Keras BN; seeded weights, stale statistics."""
    import kerasbn

    keras.utils.set_random_seed(0)  # (JAX processes must create equal values)
    model = keras.Sequential(
        [
            keras.Input(SHAPE),
            keras.layers.Conv2D(4, 3, name="conv1"),
            kerasbn.BatchNorm(name="bn1"),
            keras.layers.ReLU(),
            keras.layers.Conv2D(5, 3, name="conv2"),
            keras.layers.BatchNormalization(name="bn2"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax", name="dense"),
        ],
        name="cnn",
    )
    rng = np.random.default_rng(3)
    model.set_weights(
        [
            rng.uniform(0.5, 2.0, w.shape).astype("f4")
            if "variance" in w.path
            else rng.normal(0.2, 0.6, w.shape).astype("f4")
            for w in model.weights
        ]
    )
    model.compile(
        optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def make_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    x = rng.normal(1.0, 2.0, (sum(SHARES), *SHAPE)).astype("float32")
    x[SHARES[0] :] += 3.0  # the workers' data differ
    return x, rng.integers(0, 3, sum(SHARES)).astype("int32")


def share(index: int, x, y):
    start = sum(SHARES[:index])
    rows = slice(start, start + SHARES[index])
    return x[rows], y[rows]


def run_tools(model, diagnose_data, recalibrate_data, scope=contextlib.nullcontext):
    """diagnose (in ``scope()``), then recalibrate: the arrays the tests compare."""
    import kerasbn

    with scope():
        diagnosis = kerasbn.diagnose(model, diagnose_data, batch_size=BATCH)
    kerasbn.recalibrate(model, recalibrate_data, batch_size=BATCH)
    arrays = {"diagnosis": np.array(json.dumps(diagnosis.to_dict()))}
    for name in BN_NAMES:
        layer = model.get_layer(name)
        for stat in ("moving_mean", "moving_variance"):
            arrays[f"{name}/{stat}"] = np.asarray(
                keras.ops.convert_to_numpy(getattr(layer, stat))
            )
    return arrays


def batches_in_rank_order(x, y) -> tuple[list, list]:
    """Every worker's batches, worker 0's first: what one process would read."""
    labelled, inputs = [], []
    for index in range(WORKERS):
        xs, ys = share(index, x, y)
        for start in range(0, len(xs), BATCH):
            labelled.append((xs[start : start + BATCH], ys[start : start + BATCH]))
            inputs.append(xs[start : start + BATCH])
    return labelled, inputs


# ------------------------------------------------------------------ workers
def worker(engine: str, index: int, port: int, out_dir: str) -> None:
    """One worker: joins the engine, runs the tools on its share, saves arrays.

    TensorFlow: diagnose runs in the strategy's scope, recalibrate outside it.
    """
    scope = contextlib.nullcontext
    if engine == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        scope = strategy.scope
    elif engine == "jax":
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=WORKERS,
            process_id=index,
            initialization_timeout=60,
        )
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices())
        )
    else:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=index,
            world_size=WORKERS,
        )
    with scope():
        model = build_model()
    x, y = share(index, *make_data())
    arrays = run_tools(model, (x, y), x, scope)
    np.savez(Path(out_dir) / f"worker_{index}.npz", **arrays)


def launch(engine: str, tmp_path: Path) -> list[dict]:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import distributed_sync_bn as launcher  # its process launcher
    finally:
        sys.path.remove(str(ROOT / "examples"))
    ports = launcher.free_ports(WORKERS)

    def spec(index: int):
        env = {
            "KERAS_BACKEND": engine,
            "PYTHONPATH": str(ROOT),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "OMP_NUM_THREADS": "1",
            "XLA_FLAGS": "",
        }
        if engine == "tensorflow":
            env["TF_CONFIG"] = launcher.tf_config(ports, index)
        command = [sys.executable, __file__, engine, str(index), str(ports[0])]
        return [*command, str(tmp_path)], env

    return launcher.run_processes(WORKERS, spec, tmp_path, TIMEOUT_S)


# -------------------------------------------------------------------- checks
def assert_same_diagnosis(actual: dict, expected: dict) -> None:
    """Two diagnoses' numbers equal to float32 rounding (verdicts exactly)."""
    assert [x["path"] for x in actual["layers"]] == [
        x["path"] for x in expected["layers"]
    ]
    assert actual["samples"] == expected["samples"] == sum(SHARES)
    assert actual["batches"] == expected["batches"]
    for ours, theirs in zip(actual["layers"], expected["layers"]):
        assert ours["verdict"] == theirs["verdict"]
        for name, values in theirs["per_channel"].items():
            np.testing.assert_allclose(
                np.array(ours["per_channel"][name], float),
                np.array(values, float),
                rtol=1e-5,
                atol=1e-7,
                err_msg=f"{ours['path']} {name}",
            )
    for way in ("metrics_moving", "metrics_population"):
        for name, value in expected["model"][way].items():
            assert actual["model"][way][name] == pytest.approx(value, rel=1e-6)
    for name in ("output_shift_max", "output_shift_rms", "changed_predictions"):
        assert actual["model"][name] == pytest.approx(expected["model"][name], rel=1e-5)


def check_against_one_process(results: list[dict]) -> None:
    """Ranks bit-identical, and equal to this process over every batch."""
    for other in results[1:]:
        assert results[0].keys() == other.keys()
        for key in results[0]:
            np.testing.assert_array_equal(other[key], results[0][key], err_msg=key)
    x, y = make_data()
    labelled, inputs = batches_in_rank_order(x, y)
    reference = run_tools(build_model(), labelled, inputs)
    for key in reference:
        if key != "diagnosis":
            np.testing.assert_array_max_ulp(results[0][key], reference[key], maxulp=2)
    assert_same_diagnosis(
        json.loads(str(results[0]["diagnosis"])),
        json.loads(str(reference["diagnosis"])),
    )
    # The first BN sees the raw data's convolution: its population
    # statistics are those of every worker's inputs (float64 NumPy).
    conv = build_model().get_layer("conv1")
    kernel, bias = (np.asarray(w, "f8") for w in conv.get_weights())
    windows = np.lib.stride_tricks.sliding_window_view(x.astype("f8"), (3, 3), (1, 2))
    h = np.einsum("bhwcij,ijco->bhwo", windows, kernel) + bias
    np.testing.assert_allclose(results[0]["bn1/moving_mean"], h.mean((0, 1, 2)), 1e-5)
    np.testing.assert_allclose(
        results[0]["bn1/moving_variance"], h.var((0, 1, 2)), 1e-5
    )


@pytest.fixture
def engine():
    return keras.backend.backend()


def test_workers_end_bit_identical_and_equal_to_one_process(engine, tmp_path):
    if engine not in ("tensorflow", "jax", "torch"):
        pytest.skip(f"no distribution engine for backend {engine!r}")
    check_against_one_process(launch(engine, tmp_path))


# ----------------------------------------------------- one process, replicas
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute.MirroredStrategy"
)
@pytest.mark.parametrize("where", ["diagnose in scope", "recalibrate in scope"])
def test_mirrored_strategy_every_replica_gets_the_one_process_statistics(where):
    import tensorflow as tf

    import kerasbn

    x, y = make_data()
    expected = run_tools(build_model(), (x, y), x)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        model = build_model()
    if where == "diagnose in scope":
        results = run_tools(model, (x, y), x, scope=strategy.scope)
        assert_same_diagnosis(
            json.loads(str(results["diagnosis"])),
            json.loads(str(expected["diagnosis"])),
        )
    else:
        with strategy.scope():
            kerasbn.recalibrate(model, x, batch_size=BATCH)
    for name in BN_NAMES:
        layer = model.get_layer(name)
        for stat in ("moving_mean", "moving_variance"):
            copies = strategy.experimental_local_results(getattr(layer, stat).value)
            assert len(copies) == 2
            for copy in copies:
                np.testing.assert_array_equal(copy.numpy(), expected[f"{name}/{stat}"])


# A DataParallel over 2 CPU devices of one process: JAX needs the device
# count before it starts, hence a child process.
_JAX_DEVICES_SCRIPT = """
import sys, jax, keras, numpy as np
sys.path.insert(0, sys.argv[1])
import test_multiworker_statistics as t
assert len(jax.devices()) == 2
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
x, y = t.make_data()
model = t.build_model()
arrays = t.run_tools(model, (x, y), x)
variable = model.get_layer("bn2").moving_variance.value
arrays["devices"] = np.array(len(variable.sharding.device_set))
np.savez(sys.argv[2], **arrays)
"""


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="keras.distribution on the JAX backend"
)
def test_data_parallel_over_two_devices_gives_the_one_process_statistics(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    out = tmp_path / "out.npz"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_JAX_DEVICES_SCRIPT)]
        + [str(ROOT / "tests"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = dict(np.load(out))
    assert int(results.pop("devices")) == 2
    x, y = make_data()
    expected = run_tools(build_model(), (x, y), x)
    for key in expected:
        if key != "diagnosis":
            np.testing.assert_array_max_ulp(results[key], expected[key], maxulp=2)
    assert_same_diagnosis(
        json.loads(str(results["diagnosis"])), json.loads(str(expected["diagnosis"]))
    )


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
