"""Synchronized BatchNorm over torch.distributed: two processes, gloo, 127.0.0.1.

One pair of worker processes (this file run as a script) plays every
scenario in turn and saves what each process saw; the tests compare that
with NumPy's statistics of the global batch and with float64 gradients of
one process holding the whole batch (the BN formula differentiated by torch
autograd). The run kills its workers if they take longer than
``TIMEOUT_S``.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

if __name__ != "__main__":  # (as a script, this file is a worker process)
    if keras.backend.backend() != "torch":
        pytest.skip(
            "synchronized statistics over torch.distributed need the torch backend",
            allow_module_level=True,
        )
    from conftest import np_batch_norm, np_moments, record
    from test_backends_torch import reference_gradients

TIMEOUT_S = 120
WORLD = 2
SHAPE = (3, 4)  # per sample; channels last
# scenario -> (local batch sizes, mean of each process's data, spread, dtype)
SCENARIOS = {
    "float32": ((7, 3), (1e3, 1e3 + 5.0), 2.0, "float32"),
    "float64": ((7, 3), (1e3, 1e3 + 5.0), 2.0, "float64"),
    "empty": ((7, 0), (1e3, 1e3), 2.0, "float32"),
    "far": ((7, 3), (1e4, 1e4), 1e-2, "float32"),
}
EPSILON = 1e-3


def _data():
    """Every scenario's global batch, upstream gradient, gamma and beta."""
    rng = np.random.default_rng(7)
    data = {}
    for name, (sizes, means, spread, dtype) in SCENARIOS.items():
        parts = [
            m + spread * rng.standard_normal((n, *SHAPE)) for n, m in zip(sizes, means)
        ]
        data[f"{name}/x"] = np.concatenate(parts).astype(dtype)
        data[f"{name}/dy"] = rng.standard_normal((sum(sizes), *SHAPE)).astype(dtype)
        data[f"{name}/gamma"] = rng.uniform(0.5, 1.5, SHAPE[-1:]).astype(dtype)
        data[f"{name}/beta"] = rng.standard_normal(SHAPE[-1:]).astype(dtype)
    return data


# ------------------------------------------------------------------ workers
def _worker(rank: int, port: int, data_path: str, out_path: str) -> None:
    """One process: every scenario on its share of the global batches."""
    import torch
    import torch.distributed as dist

    import kerasbn

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    data = dict(np.load(data_path))
    out = {}
    for name, (sizes, _, _, dtype) in SCENARIOS.items():
        start = sum(sizes[:rank])
        local = slice(start, start + sizes[rank])
        layer = kerasbn.BatchNorm(
            synchronized=True, momentum=0.0, epsilon=EPSILON, dtype=dtype
        )
        layer.build((None, *SHAPE))
        layer.set_weights(
            [data[f"{name}/gamma"], data[f"{name}/beta"], *layer.get_weights()[2:]]
        )
        x = torch.tensor(data[f"{name}/x"][local], requires_grad=True)
        y = layer(x, training=True)
        weights = [w.value for w in layer.trainable_weights]
        grads = torch.autograd.grad(
            y, [x, *weights], torch.tensor(data[f"{name}/dy"][local])
        )
        for key, value in zip(("y", "dx", "dgamma", "dbeta"), (y, *grads)):
            out[f"{name}/{key}/{rank}"] = value.detach().numpy()
        out[f"{name}/moving_mean/{rank}"] = layer.moving_mean.numpy()
        out[f"{name}/moving_variance/{rank}"] = layer.moving_variance.numpy()
        if name == "float32" and rank == 0:
            # Inference communicates nothing: only this process calls it, and
            # the next scenario's collectives would pair wrongly (or hang) if
            # it did.
            out["inference/y"] = layer(x, training=False).detach().numpy()
    np.savez(out_path, **out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(tmp_path: Path, data: dict) -> dict:
    """Runs the two workers; returns what they saved (killed after TIMEOUT_S)."""
    data_path = tmp_path / "data.npz"
    np.savez(data_path, **data)
    port = _free_port()
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    workers = []
    for rank in range(WORLD):
        out_path = tmp_path / f"out{rank}.npz"
        command = [sys.executable, __file__, str(rank), str(port), str(data_path)]
        workers.append(
            subprocess.Popen(
                [*command, str(out_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        logs = [w.communicate(timeout=TIMEOUT_S)[0] for w in workers]
    except subprocess.TimeoutExpired:
        for w in workers:
            w.kill()
        for w in workers:
            w.communicate()
        pytest.fail(f"the workers did not finish within {TIMEOUT_S} s")
    for w, log in zip(workers, logs):
        assert w.returncode == 0, log[-3000:]
    results = {}
    for rank in range(WORLD):
        results.update(np.load(tmp_path / f"out{rank}.npz"))
    return results


# -------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = _data()
    return data, run_workers(tmp_path_factory.mktemp("sync_torch"), data)


def _global(results, name, key, sizes):
    """The global-batch array of ``key``, concatenated over the processes."""
    return np.concatenate([results[f"{name}/{key}/{r}"] for r in range(WORLD)])[
        : sum(sizes)
    ]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_moving_statistics_are_those_of_the_global_batch(runs, name):
    data, results = runs
    x = data[f"{name}/x"].astype(np.float64)
    mean, var = x.mean(axis=(0, 1)), x.var(axis=(0, 1))
    # float64 too is held to float32 rounding: Keras's divide_no_nan on torch
    # returns float32, and kerasbn.formulas divides the moments with it.
    for rank in range(WORLD):
        np.testing.assert_allclose(
            results[f"{name}/moving_mean/{rank}"], mean, rtol=1e-7
        )
        np.testing.assert_allclose(
            results[f"{name}/moving_variance/{rank}"], var, rtol=1e-5
        )
    record(
        f"torch sync moving variance vs NumPy, relative ({name})",
        results[f"{name}/moving_variance/0"] / var,
        np.ones_like(var),
    )


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_processes_agree_bit_for_bit(runs, name):
    _, results = runs
    for key in ("moving_mean", "moving_variance"):
        np.testing.assert_array_equal(
            results[f"{name}/{key}/0"], results[f"{name}/{key}/1"]
        )


@pytest.mark.parametrize("name", ["float32", "float64", "empty"])
def test_outputs_and_gradients_are_those_of_one_process_with_the_whole_batch(
    runs, name
):
    # (At mean 1e4 and spread 1e-2, "far", x * scale + offset rounds to 0.06
    # in float32 on any path; its statistics are tested above.)
    data, results = runs
    sizes, _, _, dtype = SCENARIOS[name]
    x, dy = data[f"{name}/x"], data[f"{name}/dy"]
    gamma, beta = data[f"{name}/gamma"], data[f"{name}/beta"]
    mean, var = np_moments(x, [2])
    tol = _rounding(x, var)
    expected = {
        "y": np_batch_norm(x, mean, var, gamma, beta, EPSILON),
        **dict(
            zip(
                ("dx", "dgamma", "dbeta"),
                reference_gradients(x, dy, gamma, [2], EPSILON),
            )
        ),
    }
    for key, ref in expected.items():
        if key in ("y", "dx"):
            actual = _global(results, name, key, sizes)
        else:  # each process holds its share of the weights' gradients; DDP sums them
            actual = sum(results[f"{name}/{key}/{r}"] for r in range(WORLD))
        error = np.max(np.abs(actual - ref)) / np.max(np.abs(ref))
        record(f"torch sync {key} vs one process, relative to max ({name})", error, 0.0)
        assert error <= tol, f"{key}: {error:.3g} > {tol:.3g}"


def _rounding(x, var) -> float:
    """The error allowed relative to the largest value of an output or gradient.

    float32: 4 roundings, amplified by the centring, ``max|x| / sigma``
    (3e-4 at mean 1e3 and spread 2; torch's own float32 BN in one process
    errs by 2e-6 on dx and 2e-5 on the gradient of gamma here). float64:
    1e-5, as the statistics of :mod:`kerasbn.formulas` are float32 on torch (see
    above).
    """
    if x.dtype == np.float64:
        return 1e-5
    return 4 * np.finfo(np.float32).eps * np.max(np.abs(x)) / np.sqrt(np.min(var))


def test_inference_uses_the_moving_statistics_without_communicating(runs):
    data, results = runs
    sizes = SCENARIOS["float32"][0]
    x = data["float32/x"]
    local = x[: sizes[0]]
    mean, var = results["float32/moving_mean/0"], results["float32/moving_variance/0"]
    expected = np_batch_norm(
        local, mean, var, data["float32/gamma"], data["float32/beta"], EPSILON
    )
    np.testing.assert_allclose(results["inference/y"], expected, atol=1e-4)


def test_keras_batch_norm_on_torch_loses_the_variance_at_mean_1e3(rng):
    # For reference (not kerasbn): Keras's BN computes E[x**2] - E[x]**2 in
    # float32. kerasbn's synchronized path is held to 1e-5 above.
    x = (1e3 + 2.0 * rng.standard_normal((64, 8))).astype("float32")
    layer = keras.layers.BatchNormalization(momentum=0.0)
    layer(x, training=True)
    var = x.astype(np.float64).var(axis=0)
    error = np.abs(np.asarray(layer.moving_variance) / var - 1.0)
    record("Keras BN on torch, variance at mean 1e3 spread 2, relative", error, 0.0)
    assert error.max() > 1e-3  # the cancellation this package avoids


# ------------------------------------------------------------------ example
def test_example_workers_agree_exactly_and_match_one_process(tmp_path):
    # examples/distributed_sync_bn.py --backend torch, on a tiny model: 45
    # samples in global batches of 8, so the last batch (5) splits 3 + 2.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import distributed_torch
        from distributed_sync_bn import LOCAL_SAMPLES, Config
    finally:
        sys.path.pop(0)
    config = Config(
        model="tiny", samples=45, batch_size=8, learning_rate=0.1, synthetic=True
    )
    workers = distributed_torch.launch_workers(config, 2, tmp_path, TIMEOUT_S)
    single = distributed_torch.train(config)  # this process alone, plain BN
    assert [int(w.pop(LOCAL_SAMPLES)) for w in workers] == [23, 22]
    assert int(single.pop(LOCAL_SAMPLES)) == 45
    assert workers[0].keys() == single.keys()
    for name, value in single.items():
        np.testing.assert_array_equal(workers[1][name], workers[0][name], err_msg=name)
        np.testing.assert_allclose(
            workers[0][name], value, rtol=1e-5, atol=1e-5, err_msg=name
        )
    # The moving statistics did move away from their initial values.
    assert not np.allclose(single["first_bn_moving_variance"], 1.0)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
