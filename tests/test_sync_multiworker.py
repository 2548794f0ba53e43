"""Synchronized BN under tf.distribute: global statistics, workers in lockstep.

Three kinds of check, each against an independent reference:

* two worker processes under ``MultiWorkerMirroredStrategy`` (launched by
  ``examples/distributed_sync_bn.py``'s launcher on loopback ports) agree
  bit for bit and match one process trained on the same global batches;
* ``MirroredStrategy`` over two logical CPUs (set up by conftest), fed by a
  distributed dataset whose batches split unevenly, one replica empty, gives
  NumPy's statistics of the global batch. It runs in a child process (this
  file as a script), apart from the other modules' strategies;
* inference mode traces no collective op (training does, as a control).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BACKEND, np_batch_norm, np_moments

if BACKEND != "tensorflow":
    pytest.skip(
        "TensorFlow backend only: workers synchronize through"
        " tf.distribute.MultiWorkerMirroredStrategy",
        allow_module_level=True,
    )

import tensorflow as tf  # noqa: E402

import kerasbn  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import distributed_sync_bn as example  # noqa: E402 (lives in examples/)

CHILD_TIMEOUT_S = 120
EPSILON = 1e-3
SHAPE = (3, 2, 4)  # one sample: 3x2 positions, 4 channels
SAMPLES, BATCH = 11, 5


# ------------------------------------------------------------ multi-worker
def test_two_workers_agree_exactly_and_match_single_process(tmp_path):
    # 45 samples in global batches of 8: the last batch (5) splits 3 + 2.
    config = example.Config(
        model="tiny", samples=45, batch_size=8, learning_rate=0.1, synthetic=True
    )
    workers = example.launch_workers(config, 2, tmp_path, timeout=CHILD_TIMEOUT_S)
    single = example.train(config)  # this process alone, plain BN, full batches

    # Each worker trained on its own share of every global batch.
    shares = [int(w.pop(example.LOCAL_SAMPLES)) for w in workers]
    assert sorted(shares) == [22, 23]
    assert int(single.pop(example.LOCAL_SAMPLES)) == 45
    assert workers[0].keys() == single.keys()
    for name, value in single.items():
        np.testing.assert_array_equal(workers[1][name], workers[0][name], err_msg=name)
        np.testing.assert_allclose(
            workers[0][name], value, rtol=1e-5, atol=1e-5, err_msg=name
        )
    # The moving statistics did move away from their initial values.
    assert not np.allclose(single["first_bn_moving_variance"], 1.0)


def _processes_mentioning(text: str) -> list[str]:
    """The ids of live processes whose command line contains ``text``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(cmdline.parent.name)
        except OSError:  # the process ended meanwhile
            continue
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_launcher_kills_its_workers_at_the_deadline(tmp_path):
    config = example.Config(model="tiny", samples=8, batch_size=4, synthetic=True)
    with pytest.raises(TimeoutError):
        example.launch_workers(config, 2, tmp_path, timeout=1.0)
    assert _processes_mentioning(str(tmp_path)) == []


def test_launcher_reports_a_failed_worker(tmp_path):
    # A batch size of 0 makes the workers fail before training.
    config = example.Config(model="tiny", samples=8, batch_size=0, synthetic=True)
    with pytest.raises(RuntimeError, match="worker \\d failed"):
        example.launch_workers(config, 2, tmp_path, timeout=CHILD_TIMEOUT_S)
    assert _processes_mentioning(str(tmp_path)) == []


# ------------------------------------------------------- MirroredStrategy
def _op_types(function, *args) -> set[str]:
    """Every op type in ``function``'s graph for ``args``, nested functions too."""
    graph_def = function.get_concrete_function(*args).graph.as_graph_def()
    nodes = list(graph_def.node)
    for library_function in graph_def.library.function:
        nodes += list(library_function.node_def)
    return {node.op for node in nodes}


def _mirrored_scenario() -> dict:
    """A synchronized BN trained on a distributed dataset over two logical CPUs.

    The two logical CPUs come from conftest. Global batches 5, 5, 1 split
    3 + 2, 3 + 2 and 1 + 0 among the replicas.
    """
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        layer = kerasbn.BatchNorm(momentum=0.0, epsilon=EPSILON, synchronized=True)
        layer.build((None, *SHAPE))

    @tf.function
    def train_step(batch):
        return strategy.run(lambda x: layer(x, training=True), (batch,))

    @tf.function
    def inference_step(batch):
        return strategy.run(lambda x: layer(x, training=False), (batch,))

    # A large mean and a small spread: E[x^2] - E[x]^2 would lose it in float32.
    x = np.random.default_rng(0).normal(1000.0, 0.5, (SAMPLES, *SHAPE))
    x = x.astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(BATCH)
    local = strategy.experimental_local_results
    steps = []
    for batch in strategy.experimental_distribute_dataset(dataset):
        outputs = np.concatenate(local(train_step(batch)))
        steps.append(
            {
                "batch": np.concatenate(local(batch)),
                "replica_sizes": [int(t.shape[0]) for t in local(batch)],
                "moving_mean": layer.moving_mean.numpy(),
                "moving_variance": layer.moving_variance.numpy(),
                "outputs": outputs,
            }
        )
    return {
        "x": x,
        "steps": steps,
        "training_ops": _op_types(train_step, batch),
        "inference_ops": _op_types(inference_step, batch),
    }


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory) -> dict:
    """:func:`_mirrored_scenario`'s results, computed in a child process.

    Every MirroredStrategy of a process numbers its collective instances from
    the same start, so a strategy made here could clash with those of other
    test modules ("Shape mismatch in the collective instance ..."). The child
    is this file run as a script; it times out and is killed by itself.
    """
    out = tmp_path_factory.mktemp("mirrored") / "scenario.pkl"
    child = subprocess.run(
        [sys.executable, __file__, str(out)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    with open(out, "rb") as f:
        return pickle.load(f)


def test_mirrored_dataset_gives_uneven_and_empty_replicas(mirrored):
    batches = [mirrored["x"][i : i + BATCH] for i in range(0, SAMPLES, BATCH)]
    for step, batch in zip(mirrored["steps"], batches, strict=True):
        np.testing.assert_array_equal(step["batch"], batch)
    sizes = [step["replica_sizes"] for step in mirrored["steps"]]
    assert any(a != b for a, b in sizes)
    assert any(0 in s for s in sizes)


def test_mirrored_uneven_replicas_give_numpy_global_statistics(mirrored):
    for step in mirrored["steps"]:
        mean, var = np_moments(step["batch"], [3])
        # momentum=0: the moving statistics are the last batch's.
        np.testing.assert_allclose(step["moving_mean"], mean.ravel(), rtol=1e-6)
        np.testing.assert_allclose(step["moving_variance"], var.ravel(), rtol=1e-5)


def test_mirrored_outputs_are_normalized_with_global_statistics(mirrored):
    for step in mirrored["steps"]:
        mean, var = np_moments(step["batch"], [3])
        expected = np_batch_norm(step["batch"], mean, var, epsilon=EPSILON)
        # x * scale + offset at |x| ~ 1000 in float32: about 1e-4 absolute.
        np.testing.assert_allclose(step["outputs"], expected, atol=5e-4)


def test_inference_mode_issues_no_collective_ops(mirrored):
    def collectives(op_types):
        return {t for t in op_types if t.startswith(("Collective", "Nccl"))}

    assert collectives(mirrored["training_ops"])  # the control: training gathers
    assert collectives(mirrored["inference_ops"]) == set()


if __name__ == "__main__":
    with open(sys.argv[1], "wb") as f:
        pickle.dump(_mirrored_scenario(), f)
