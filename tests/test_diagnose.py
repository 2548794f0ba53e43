"""kerasbn.diagnose and BNMonitor against NumPy float64 references and closed forms.

* Every number that ``diagnose`` reports for a CNN with two BN layers (a
  ``kerasbn.BatchNorm`` and a ``keras.layers.BatchNormalization``) is
  recomputed here in float64 from the model's weights by a NumPy forward pass.
* The effective batch size has closed forms: about ``B * H * W`` for
  independent values, about ``B`` for feature maps constant over space.
* Injected faults (a moving mean 1 std off, a gamma of 0, a NaN moving
  variance, a frozen layer with another data's statistics) are each flagged
  on their layer and nowhere else.
* The model is bit-identical afterwards, also when the data raises midway.
"""

from __future__ import annotations

import csv
import json
import math
import warnings

import keras
import numpy as np
import pytest
from conftest import to_numpy

import kerasbn
from kerasbn import _graph


# ------------------------------------------------------------ NumPy model
def np_conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A 'valid' channels-last convolution, float64."""
    kh, kw = kernel.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    return np.einsum("bhwcij,ijco->bhwo", windows, kernel) + bias


def np_bn(h, mean, variance, gamma, beta, epsilon):
    return gamma * (h - mean) / np.sqrt(variance + epsilon) + beta


def build_cnn() -> keras.Model:
    """Conv, kerasbn BN, ReLU, Conv, Keras BN, ReLU, pooling, softmax."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(4, 3, name="conv1"),
            kerasbn.BatchNorm(momentum=0.9, epsilon=0.01, name="bn1"),
            keras.layers.ReLU(),
            keras.layers.Conv2D(5, 3, name="conv2"),
            keras.layers.BatchNormalization(momentum=0.95, name="bn2"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax", name="dense"),
        ],
        name="cnn",
    )


def randomize(model, rng) -> None:
    """Random weights; moving statistics some way off any data's."""
    model.set_weights(
        [
            rng.uniform(0.5, 2.0, w.shape).astype("f4")
            if "variance" in w.path
            else rng.normal(0.3, 0.7, w.shape).astype("f4")
            for w in model.weights
        ]
    )


def weights64(model) -> dict:
    return {w.path: to_numpy(w).astype("f8") for w in model.weights}


def np_forward(w: dict, x: np.ndarray, statistics=None):
    """The CNN in float64.

    ``statistics``: ``{"bn1": (mean, var), "bn2": ...}`` for inference; None
    for the pass (each batch normalized with its own statistics). Returns the
    outputs and the two BN layers' inputs.
    """
    h1 = np_conv(x, w["cnn/conv1/kernel"], w["cnn/conv1/bias"])
    stats1 = (
        statistics["bn1"] if statistics else (h1.mean((0, 1, 2)), h1.var((0, 1, 2)))
    )
    a1 = np.maximum(np_bn(h1, *stats1, w["cnn/bn1/gamma"], w["cnn/bn1/beta"], 0.01), 0)
    h2 = np_conv(a1, w["cnn/conv2/kernel"], w["cnn/conv2/bias"])
    stats2 = (
        statistics["bn2"] if statistics else (h2.mean((0, 1, 2)), h2.var((0, 1, 2)))
    )
    a2 = np.maximum(np_bn(h2, *stats2, w["cnn/bn2/gamma"], w["cnn/bn2/beta"], 1e-3), 0)
    logits = a2.mean((1, 2)) @ w["cnn/dense/kernel"] + w["cnn/dense/bias"]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True), h1, h2


def np_layer_reference(inputs: list, moving_mean, moving_variance, epsilon):
    """Every per-channel number of one BN layer, from its per-batch inputs."""
    pooled = np.concatenate([h.reshape(-1, h.shape[-1]) for h in inputs])
    mean, variance = pooled.mean(0), pooled.var(0)
    counts = np.array([h.size / h.shape[-1] for h in inputs])
    nominal = counts.max()
    means = np.array([h.reshape(-1, h.shape[-1]).mean(0) for h in inputs])
    variances = np.array([h.reshape(-1, h.shape[-1]).var(0) for h in inputs])
    weights = counts[:, None] / nominal
    var_means = (weights * (means - mean) ** 2).sum(0) / (len(inputs) - 1)
    mean_of_variances = (counts[:, None] * variances).sum(0) / counts.sum()
    var_variances = (weights * (variances - mean_of_variances) ** 2).sum(0) / (
        len(inputs) - 1
    )
    return {
        "count": np.full(mean.shape, counts.sum()),
        "population_mean": mean,
        "population_variance": variance,
        "moving_mean": moving_mean,
        "moving_variance": moving_variance,
        "mean_shift": (moving_mean - mean) / np.sqrt(variance + epsilon),
        "log_variance_ratio": np.log(
            (moving_variance + epsilon) / (variance + epsilon)
        ),
        "batches": np.full(mean.shape, float(len(inputs))),
        "nominal_batch": np.full(mean.shape, nominal),
        "effective_batch": variance / var_means,
        "batch_mean_spread": np.sqrt(var_means / (variance + epsilon)),
        "batch_variance_spread": np.sqrt(var_variances) / (variance + epsilon),
    }


# ------------------------------------------------- every number vs NumPy
SPREAD_FIELDS = ("effective_batch", "batch_mean_spread", "batch_variance_spread")


@pytest.fixture(scope="module")
def cnn_case():
    rng = np.random.default_rng(5)
    model = build_cnn()
    randomize(model, rng)
    dense = model.get_layer("dense")  # moderate logits: no probability near 0
    dense.kernel.assign(0.2 * to_numpy(dense.kernel))
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(37)
    x = rng.normal(0.5, 1.5, (70, 8, 8, 2)).astype("float32")  # 16 x 4 + 6
    y = rng.integers(0, 3, 70).astype("int32")
    before = weights64(model)
    diagnosis = kerasbn.diagnose(model, (x, y), batch_size=16)
    return model, x, y, before, diagnosis


def test_every_layer_number_matches_numpy_float64(cnn_case):
    model, x, y, w, diagnosis = cnn_case
    batches = [x[i : i + 16].astype("f8") for i in range(0, 70, 16)]
    forward = [np_forward(w, b) for b in batches]
    assert [layer.path for layer in diagnosis.layers] == ["cnn/bn1", "cnn/bn2"]
    for index, (name, epsilon, momentum) in enumerate(
        (("bn1", 0.01, 0.9), ("bn2", 1e-3, 0.95)), start=1
    ):
        layer = diagnosis[f"cnn/{name}"]
        reference = np_layer_reference(
            [f[index] for f in forward],
            w[f"cnn/{name}/moving_mean"],
            w[f"cnn/{name}/moving_variance"],
            epsilon,
        )
        for field, expected in reference.items():
            # The spread measures differences of batch means, 1/sqrt(n) of
            # the spread of the values: float32 rounding weighs more there.
            rtol = 2e-4 if field in SPREAD_FIELDS else 2e-5
            np.testing.assert_allclose(
                getattr(layer, field), expected, rtol=rtol, atol=1e-6, err_msg=field
            )
        np.testing.assert_array_equal(layer.gamma, w[f"cnn/{name}/gamma"])
        assert layer.mode == "auto" and layer.momentum == momentum
        assert layer.epsilon == epsilon and layer.training_steps == 37
        assert layer.initializer_share == pytest.approx(momentum**37, rel=1e-12)
        shift = np.abs(reference["mean_shift"])
        ratio = np.abs(reference["log_variance_ratio"])
        assert layer.max_mean_shift == pytest.approx(shift.max(), rel=2e-5)
        assert layer.median_mean_shift == pytest.approx(np.median(shift), rel=2e-5)
        assert layer.max_log_variance_ratio == pytest.approx(ratio.max(), rel=2e-5)
        assert layer.median_log_variance_ratio == pytest.approx(
            np.median(ratio), rel=2e-5
        )
        assert layer.median_effective_batch == pytest.approx(
            np.median(reference["effective_batch"]), rel=2e-5
        )
        # The verdict follows the thresholds applied to the NumPy gaps.
        off = shift.max() > 0.5 or ratio.max() > math.log(2)
        assert (layer.verdict == "stale statistics") == off, layer.reason
        assert layer.layer_class == (
            "kerasbn.BatchNorm" if name == "bn1" else "keras.layers.BatchNormalization"
        )


def test_model_comparison_matches_numpy_float64(cnn_case):
    model, x, y, w, diagnosis = cnn_case
    batches = [x[i : i + 16].astype("f8") for i in range(0, 70, 16)]
    inputs = [np_forward(w, b)[1:] for b in batches]
    population = {
        name: (
            np.concatenate([h[i].reshape(-1, h[i].shape[-1]) for h in inputs]).mean(0),
            np.concatenate([h[i].reshape(-1, h[i].shape[-1]) for h in inputs]).var(0),
        )
        for i, name in enumerate(("bn1", "bn2"))
    }
    moving = {
        name: (w[f"cnn/{name}/moving_mean"], w[f"cnn/{name}/moving_variance"])
        for name in ("bn1", "bn2")
    }
    old = np_forward(w, x.astype("f8"), moving)[0]
    new = np_forward(w, x.astype("f8"), population)[0]
    comparison = diagnosis.model
    assert comparison.samples == diagnosis.samples == 70 and diagnosis.batches == 5
    assert comparison.output_shift_max == pytest.approx(
        np.abs(new - old).max(), rel=1e-4
    )
    assert comparison.output_shift_rms == pytest.approx(
        np.sqrt(np.mean((new - old) ** 2)), rel=1e-4
    )
    assert comparison.output_rms == pytest.approx(np.sqrt(np.mean(new**2)), rel=1e-5)
    assert comparison.changed_predictions == pytest.approx(
        np.mean(old.argmax(1) != new.argmax(1))
    )
    for way, probabilities in (("moving", old), ("population", new)):
        metrics = getattr(comparison, f"metrics_{way}")
        loss = -np.log(probabilities[np.arange(70), y]).mean()
        assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
        accuracy = np.mean(probabilities.argmax(1) == y)
        assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-7)
    assert comparison.nonfinite_moving == comparison.nonfinite_population == 0
    # Keras's own evaluate gives the moving-statistics figures.
    loss, accuracy = model.evaluate(x, y, batch_size=16, verbose=0)
    assert comparison.metrics_moving["loss"] == pytest.approx(loss, rel=1e-5)
    assert comparison.metrics_moving["accuracy"] == pytest.approx(accuracy)


def test_report_is_json_ready_and_its_table_lists_worst_first(cnn_case, tmp_path):
    _, _, _, _, diagnosis = cnn_case
    payload = json.loads(json.dumps(diagnosis.to_dict(), allow_nan=False))
    assert [layer["path"] for layer in payload["layers"]] == ["cnn/bn1", "cnn/bn2"]
    assert payload["layers"][0]["per_channel"]["mean_shift"] == pytest.approx(
        diagnosis["cnn/bn1"].mean_shift.tolist()
    )
    assert payload["model"]["metrics_population"]["accuracy"] == pytest.approx(
        diagnosis.model.metrics_population["accuracy"]
    )
    text = str(diagnosis)
    rows = [line for line in text.splitlines() if line.startswith("cnn/")]
    assert [row.split()[0] for row in rows] == [x.path for x in diagnosis.ranked]
    # Worst first: by verdict severity, then by the larger gap in threshold units.
    severity = ["non-finite", "frozen on other data", "stale statistics"]
    severity += ["small effective batch", "dead channels", "ok"]

    def badness(layer):
        gap = max(
            np.abs(layer.mean_shift).max() / 0.5,
            np.abs(layer.log_variance_ratio).max() / math.log(2),
        )
        return (severity.index(layer.verdict), -gap)

    assert diagnosis.ranked == sorted(diagnosis.layers, key=badness)
    assert "recalibrate would take" in text and "accuracy" in text
    summary = diagnosis.summary()
    assert summary["bn_max_mean_shift"] == max(
        x.max_mean_shift for x in diagnosis.layers
    )
    assert (
        summary["bn_population_accuracy"]
        == diagnosis.model.metrics_population["accuracy"]
    )


def test_plot_writes_a_figure(cnn_case, tmp_path):
    pytest.importorskip("matplotlib")
    path = cnn_case[-1].plot(str(tmp_path / "diagnosis.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_model_is_bit_identical_after_diagnose(cnn_case):
    model, x, y, before, _ = cnn_case
    assert weights64(model).keys() == before.keys()
    for path, value in weights64(model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)


# ------------------------------------------- the effective batch size
@pytest.mark.parametrize(
    ("maps", "expected"),
    [("independent", 4 * 4 * 4), ("constant over space", 4)],
)
def test_effective_batch_size_has_its_closed_form(maps, expected):
    # 100 batches of 4 samples of 4x4 maps, 8 channels.
    rng = np.random.default_rng(3)
    if maps == "independent":
        x = rng.normal(2.0, 3.0, (400, 4, 4, 8))
    else:
        x = np.broadcast_to(rng.normal(2.0, 3.0, (400, 1, 1, 8)), (400, 4, 4, 8))
    model = keras.Sequential([keras.Input((4, 4, 8)), kerasbn.BatchNorm()])
    layer = kerasbn.diagnose(model, x.astype("float32"), batch_size=4).layers[0]
    np.testing.assert_array_equal(layer.nominal_batch, 64.0)
    # The variance of 100 batch means is within about 14% (one std) of its
    # expectation per channel; the median of 8 channels closer still.
    assert layer.median_effective_batch == pytest.approx(expected, rel=0.25)
    assert ("small effective batch" in layer.findings) == (expected < 8)


def test_ghost_batches_count_the_group_that_training_normalizes():
    # Independent values in batches of 16 split into ghost groups of 4: the
    # normalizing group holds 4 values per channel, worth 4.
    rng = np.random.default_rng(4)
    x = rng.normal(1.0, 2.0, (1600, 6)).astype("float32")
    model = keras.Sequential(
        [keras.Input((6,)), kerasbn.BatchNorm(virtual_batch_size=4)]
    )
    layer = kerasbn.diagnose(model, x, batch_size=16).layers[0]
    np.testing.assert_array_equal(layer.nominal_batch, 4.0)
    assert layer.median_effective_batch == pytest.approx(4.0, rel=0.25)
    assert "small effective batch" in layer.findings


# --------------------------------------------------------- injected faults
def build_three_bn_model() -> keras.Model:
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(6, 3, name="conv1")(inputs)
    h = kerasbn.BatchNorm(name="bn1")(h)
    h = keras.layers.Activation("tanh")(h)
    h = keras.layers.Conv2D(6, 3, name="conv2")(h)
    h = keras.layers.BatchNormalization(name="bn2")(h)
    h = keras.layers.Activation("tanh")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(5, name="dense")(h)
    outputs = kerasbn.BatchNorm(name="bn3")(h)
    return keras.Model(inputs, outputs, name="faults")


FAULTS = {
    "moving mean 1 std off": ("bn2", "stale statistics"),
    "gamma 0 in one channel": ("bn3", "dead channels"),
    "NaN moving variance": ("bn3", "non-finite"),
    # (the first BN: the ones after it see data that it normalized)
    "frozen with other data's statistics": ("bn1", "frozen on other data"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_injected_fault_is_flagged_on_its_layer_only(fault):
    keras.utils.set_random_seed(11)
    rng = np.random.default_rng(11)
    model = build_three_bn_model()
    x = rng.normal(1.0, 2.0, (256, 6, 6, 3)).astype("float32")
    name, verdict = FAULTS[fault]
    layer = model.get_layer(name)
    if fault == "gamma 0 in one channel":
        gamma = to_numpy(layer.gamma).copy()
        gamma[2] = 0.0
        layer.gamma.assign(gamma)
    if fault == "frozen with other data's statistics":
        kerasbn.recalibrate(model, 3.0 * x[::-1] + 2.0)  # another data set
        other = [to_numpy(w) for w in (layer.moving_mean, layer.moving_variance)]
    kerasbn.recalibrate(model, x)
    population = [to_numpy(w) for w in (layer.moving_mean, layer.moving_variance)]
    if fault == "moving mean 1 std off":
        layer.moving_mean.assign(population[0] + np.sqrt(population[1]))
    if fault == "NaN moving variance":
        variance = population[1].copy()
        variance[1] = np.nan
        layer.moving_variance.assign(variance)
    if fault == "frozen with other data's statistics":
        layer.moving_mean.assign(other[0])
        layer.moving_variance.assign(other[1])
        layer.trainable = False

    diagnosis = kerasbn.diagnose(model, x)

    verdicts = {x.path: x.verdict for x in diagnosis.layers}
    expected = {f"faults/bn{i}": "ok" for i in (1, 2, 3)}
    expected[f"faults/{name}"] = verdict
    assert verdicts == expected, str(diagnosis)
    flagged = diagnosis[f"faults/{name}"]
    assert flagged.findings == (verdict,)
    assert diagnosis.flagged == [flagged]
    if fault == "moving mean 1 std off":
        # sqrt(var / (var + epsilon)) std: 1 where the variance dwarfs epsilon
        variance = population[1].astype("f8")
        np.testing.assert_allclose(
            flagged.mean_shift, np.sqrt(variance / (variance + 1e-3)), rtol=1e-5
        )
        assert "kerasbn.recalibrate" in flagged.action
    if fault == "gamma 0 in one channel":
        assert flagged.zero_gamma_channels == (2,) and flagged.dead_channels == ()
    if fault == "NaN moving variance":
        assert flagged.nonfinite == ("moving_variance",)
        assert "kerasbn.recalibrate" in flagged.action
        assert diagnosis.model.nonfinite_moving > 0
        assert diagnosis.model.nonfinite_population == 0
    if fault == "frozen with other data's statistics":
        assert flagged.mode == "trainable=False" and flagged.initializer_share is None
        assert flagged.max_mean_shift > 0.5


def test_dead_input_channel_is_flagged():
    # Channel 1 of the input is constant: its variance is 0, far below epsilon.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 3)).astype("float32")
    x[:, 1] = 4.0
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm()])
    kerasbn.recalibrate(model, x)
    layer = kerasbn.diagnose(model, x).layers[0]
    assert layer.dead_channels == (1,) and layer.verdict == "dead channels"
    assert layer.population_variance[1] == 0.0 and np.isnan(layer.effective_batch[1])


# ------------------------------------------------- the model is unchanged
def snapshot(model) -> dict:
    """Every layer's attributes (by identity), flags and weights (by value)."""
    return {
        path: (
            type(layer),
            layer.trainable,
            {k: id(v) for k, v in vars(layer).items()},
            [(w.path, w.trainable, to_numpy(w).tobytes()) for w in layer.weights],
        )
        for path, layer in _graph.walk(model)
    }


class Block(keras.layers.Layer):
    """A custom layer holding a BN as an attribute."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4)
        self.norm = keras.layers.BatchNormalization(name="inner_bn")

    def call(self, x, training=None):
        return self.norm(self.dense(x), training=training)


def nested_model() -> keras.Model:
    inner = keras.Sequential(
        [keras.Input((4,)), kerasbn.BatchNorm(statistics="moving", name="frozen_bn")],
        name="inner",
    )
    inputs = keras.Input((3,))
    h = Block(name="block")(inputs)
    h = inner(h + 1.0)
    outputs = keras.layers.Dense(2)(keras.layers.Dropout(0.5)(h))
    model = keras.Model(inputs, outputs, name="nested")
    model.get_layer("block").norm.trainable = False
    model.compile("adam", "mse", metrics=["mae"])
    return model


def test_nested_and_custom_layers_are_reached_and_left_bit_identical(rng):
    model = nested_model()
    x = rng.normal(2.0, 1.0, (48, 3)).astype("float32")
    y = rng.normal(size=(48, 2)).astype("float32")
    model.fit(x, y, batch_size=16, verbose=0)
    model.evaluate(x, y, verbose=0)
    before = snapshot(model)
    metric_state = [to_numpy(v) for v in model.metrics_variables]

    diagnosis = kerasbn.diagnose(model, (x, y), batch_size=16)

    assert {layer.path: layer.mode for layer in diagnosis.layers} == {
        "nested/block/inner_bn": "trainable=False",
        "nested/inner/frozen_bn": "moving",
    }
    assert snapshot(model) == before
    for variable, value in zip(model.metrics_variables, metric_state):
        np.testing.assert_array_equal(to_numpy(variable), value)


def test_model_is_restored_when_the_data_raises_midway(rng):
    model = nested_model()
    x = rng.normal(size=(8, 3)).astype("float32")
    model(x)
    before = snapshot(model)

    def data():
        yield x
        yield x
        raise RuntimeError("the data source broke")

    with pytest.raises(RuntimeError, match="broke"):
        kerasbn.diagnose(model, data())
    assert snapshot(model) == before


# ----------------------------------------------------------- keras models
@pytest.mark.applications
def test_mobilenet_v3_small_every_bn_is_diagnosed():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=4, include_preprocessing=False
    )
    x = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype("float32")
    diagnosis = kerasbn.diagnose(model, x, batch_size=4)
    expected = [path for path, _ in _graph.batch_norms(model)]
    assert [layer.path for layer in diagnosis.layers] == expected
    assert len(expected) == 34
    # Fresh moving statistics (0 and 1) against the inputs' statistics.
    assert diagnosis.flagged
    json.dumps(diagnosis.to_dict(), allow_nan=False)


@pytest.mark.keras_hub
@pytest.mark.parametrize(
    # HGNetV2's BN layers are all inside custom layers, none a graph node.
    "name",
    ["EfficientNetImageClassifier", "HGNetV2ImageClassifier"],
)
def test_keras_hub_task_every_bn_is_diagnosed(name):
    pytest.importorskip("keras_hub")
    import keras_hub_models as zoo

    entry = zoo.ENTRIES[name]
    if keras.backend.backend() in entry.skip:
        pytest.skip(entry.skip[keras.backend.backend()])
    model = entry.build()
    diagnosis = kerasbn.diagnose(model, entry.inputs(), batch_size=2)
    paths = [path for path, _ in _graph.batch_norms(model)]
    assert [x.path for x in diagnosis.layers] + list(diagnosis.unreached) == paths
    assert len(paths) == len(zoo.batch_norms(model))
    assert diagnosis.model.samples == zoo.BATCH
    json.dumps(diagnosis.to_dict(), allow_nan=False)


# ------------------------------------------------------------- BNMonitor
def test_bn_monitor_logs_reach_history_and_csv_logger_and_warn_once(rng, tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            kerasbn.BatchNorm(name="bn"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x = rng.normal(3.0, 2.0, (96, 4)).astype("float32")
    y = rng.integers(0, 3, 96)
    log = tmp_path / "log.csv"
    monitor = kerasbn.BNMonitor((x, y), every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x,
            y,
            epochs=3,
            batch_size=32,
            verbose=0,
            callbacks=[monitor, keras.callbacks.CSVLogger(str(log))],
        )
    shifts = history.history["bn_max_mean_shift"]
    assert math.isnan(shifts[1]) and not math.isnan(shifts[0] + shifts[2])
    # The last figures are those of the diagnosis made at the last epoch.
    assert shifts[2] == pytest.approx(monitor.diagnosis.layers[0].max_mean_shift)
    assert history.history["bn_population_accuracy"][2] == pytest.approx(
        monitor.diagnosis.model.metrics_population["accuracy"]
    )
    with open(log) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert float(rows[2]["bn_max_mean_shift"]) == pytest.approx(shifts[2])
    assert rows[1]["bn_layers_flagged"] == "nan"
    # Momentum 0.99 after 6 steps: stale; one warning for the one layer.
    messages = [str(w.message) for w in caught if "BNMonitor" in str(w.message)]
    assert len(messages) == 1 and f"'{model.name}/bn'" in messages[0]


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(batch_size=1.5), TypeError, "batch_size"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm()])
    with pytest.raises(error, match=match):
        kerasbn.diagnose(model, np.ones((4, 3), "float32"), **kwargs)


def test_no_batch_and_no_bn_are_errors():
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm()])
    with pytest.raises(ValueError, match="no batch"):
        kerasbn.diagnose(model, iter([]))
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no BN layer"):
        kerasbn.diagnose(plain, np.ones((4, 3), "float32"))
    with pytest.raises(ValueError, match="every"):
        kerasbn.BNMonitor(np.ones((4, 3)), every=0)
