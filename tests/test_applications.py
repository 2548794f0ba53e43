"""The tools on every keras.applications architecture that holds batch norm.

Each architecture is built by Keras with ``weights=None`` on a small input, its
BN layers get random statistics, and the peer is always the Keras model itself:

* ``from_keras`` gives Keras's inference outputs, and one training-mode call
  gives Keras's outputs and moving statistics, to float32 rounding;
* ``fold_batch_norms`` keeps the predictions, to float32 rounding, and leaves
  no BN layer;
* a ``.keras`` file of the converted model loads back with the same outputs;
* ``to_keras(from_keras(model))`` gives back the original configs and weights.

"To float32 rounding" is measured in the same run: the same Keras model run in
float64 (same weights, same input; JAX with x64 enabled for it) is the truth,
Keras's float32 result is ``e`` away from it (largest absolute difference), and
kerasbn's float32 result may be at most ``ROUNDING_FACTOR * e`` away from it.
Both are float32 evaluations of the same sums in another order (kerasbn's
shifted moments, TensorFlow's fused kernel, folded weights rounded once), whose
error bounds differ by a small constant factor; a wrong statistic or a missed
BN layer is off by orders of magnitude more.

By default the suite runs one architecture (:data:`DEFAULT_ARCHITECTURES`),
so that the whole test command stays within CI's budget on all three
backends (building these graphs costs minutes per architecture on JAX);
``KERASBN_APPLICATIONS=all`` runs every one, and
``KERASBN_APPLICATIONS=ResNet50,Xception`` the ones named.
``benchmarks/applications_table.py`` runs them all.

Included: one model of each BN family, the issue's list and the two first
versions of MobileNet and Inception-ResNet. Left out: the larger members of a
family (ResNet101/152, DenseNet169/201, EfficientNetB1-B7, EfficientNetV2
B1-L, NASNetLarge: the same blocks, scaled), ConvNeXt (LayerNormalization, no
BN) and VGG16/19 (no normalization).

Marked ``applications``: ``pytest -m "not applications"`` skips it. Set
``KERASBN_APPLICATIONS_JSON`` to a path to get the measured figures
(``benchmarks/applications_table.py`` prints them as a table).
"""

from __future__ import annotations

import contextlib
import json
import os

import keras
import numpy as np
import pytest
from conftest import record

import kerasbn

pytestmark = pytest.mark.applications

A = keras.applications
# name: (constructor, input side in pixels); Inception needs >= 75, Xception 71.
ARCHITECTURES = {
    "ResNet50": (A.ResNet50, 64),
    "ResNet50V2": (A.ResNet50V2, 64),
    "MobileNet": (A.MobileNet, 64),
    "MobileNetV2": (A.MobileNetV2, 64),
    "MobileNetV3Small": (A.MobileNetV3Small, 64),
    "MobileNetV3Large": (A.MobileNetV3Large, 64),
    "EfficientNetB0": (A.EfficientNetB0, 64),
    "EfficientNetV2B0": (A.EfficientNetV2B0, 64),
    "DenseNet121": (A.DenseNet121, 64),
    "InceptionV3": (A.InceptionV3, 75),
    "InceptionResNetV2": (A.InceptionResNetV2, 75),
    "Xception": (A.Xception, 71),
    "NASNetMobile": (A.NASNetMobile, 64),
}
BATCH = 2
ROUNDING_FACTOR = 4.0
BATCH_NORMS = (keras.layers.BatchNormalization, kerasbn.BatchNorm)

# Figures measured in this run, by architecture, for the table script.
FIGURES: dict[str, dict[str, float | bool]] = {}


def figure(arch: str, name: str, value) -> None:
    """Keeps a measured figure; with ``KERASBN_APPLICATIONS_JSON`` set, also
    writes every figure so far to that file (a run cut short keeps its own)."""
    FIGURES.setdefault(arch, {})[name] = value
    path = os.environ.get("KERASBN_APPLICATIONS_JSON")
    if path:
        with open(path, "w") as file:
            json.dump({"backend": keras.backend.backend(), "figures": FIGURES}, file)


def build(arch: str, dtype: str = "float32") -> keras.Model:
    """``arch`` from Keras, with its Dropout layers' rate set to 0 so that
    training-mode calls are deterministic and comparable."""
    constructor, side = ARCHITECTURES[arch]
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        model = constructor(
            weights=None,
            input_shape=(side, side, 3),
            classes=10,
            classifier_activation=None,
        )
    finally:
        keras.config.set_dtype_policy(previous)
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    return model


@contextlib.contextmanager
def float64_enabled():
    """A context where float64 is computed: JAX needs x64 enabled for it."""
    if keras.backend.backend() != "jax":
        yield
        return
    import jax  # the float64 reference only

    with jax.enable_x64(True):
        yield


def leaf_layers(model) -> list:
    """Every layer that is not a model, nested models' layers included."""
    found = []
    for layer in model.layers:
        found.extend(leaf_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return found


def bn_layers(model) -> list:
    """Every BN layer, nested models included, in order."""
    return [layer for layer in leaf_layers(model) if isinstance(layer, BATCH_NORMS)]


def randomize_statistics(model, rng) -> None:
    """Mild random gamma, beta and moving statistics in every BN layer."""
    for layer in bn_layers(model):
        layer.set_weights(
            [
                (
                    rng.uniform(0.8, 1.25, w.shape)
                    if "variance" in w.path or "gamma" in w.path
                    else rng.normal(0.0, 0.1, w.shape)
                ).astype(w.dtype)
                for w in layer.weights
            ]
        )


def numpy(structure) -> list[np.ndarray]:
    return [
        keras.ops.convert_to_numpy(t).astype("f8")
        for t in keras.tree.flatten(structure)
    ]


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(numpy(a), numpy(b)))


def scale(a) -> float:
    return max(float(np.max(np.abs(x))) for x in numpy(a))


def moving_statistics(model) -> list:
    return [
        w
        for layer in bn_layers(model)
        for w in (layer.moving_mean, layer.moving_variance)
    ]


# What the default run covers, so that the whole suite stays within CI's budget
# on every backend (on JAX this one costs about a minute, EfficientNetB0 1.5):
# the op nodes of hard-swish (``x + 3.0``, ``x * (1 / 6)``), squeeze-excitation
# multiplies, depthwise convolutions, a Rescaling layer, and BN after both
# kinds of convolution. ``KERASBN_APPLICATIONS=all`` runs every architecture.
DEFAULT_ARCHITECTURES = ("MobileNetV3Small",)


def selected() -> list[str]:
    """The architectures named in ``KERASBN_APPLICATIONS`` (``all`` for every
    one), else :data:`DEFAULT_ARCHITECTURES`."""
    names = os.environ.get("KERASBN_APPLICATIONS", "")
    if not names:
        return list(DEFAULT_ARCHITECTURES)
    if names == "all":
        return list(ARCHITECTURES)
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(ARCHITECTURES))
    if unknown:
        raise ValueError(
            f"KERASBN_APPLICATIONS names unknown architectures {unknown}; "
            f"known: {sorted(ARCHITECTURES)} or all."
        )
    return chosen


@pytest.fixture(scope="module", params=selected())
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def models(arch):
    """The Keras model (random BN statistics), its from_keras copy and an input."""
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)  # the same initial weights in every run
    try:
        model = build(arch)
    except ValueError as error:  # NASNetMobile on PyTorch, in Keras 3.15
        if "not available with the" in str(error):
            pytest.skip(f"Keras does not build {arch} here: {error}")
        raise
    randomize_statistics(model, rng)
    side = ARCHITECTURES[arch][1]
    x = rng.uniform(0.0, 255.0, (BATCH, side, side, 3)).astype("float32")
    return model, kerasbn.from_keras(model), x


@pytest.fixture(scope="module")
def float64_keras(arch, models):
    """Keras's float64 results on the same weights and input: the inference
    outputs, then the outputs and moving statistics of one training call."""
    model, _, x = models
    with float64_enabled():
        keras64 = build(arch, "float64")
        keras64.set_weights([w.astype("f8") for w in model.get_weights()])
        inference = keras64(x.astype("f8"), training=False)
        assert keras.backend.standardize_dtype(inference.dtype) == "float64"
        return {
            "inference": numpy(inference),
            "training": numpy(keras64(x.astype("f8"), training=True)),
            "statistics": numpy(moving_statistics(keras64)),
        }


def check_rounding(arch: str, quantity: str, actual, keras32, keras64) -> None:
    """Asserts that kerasbn's float32 result is as close to the float64 truth
    as Keras's float32 result is: ``|actual - keras64| <= ROUNDING_FACTOR *
    |keras32 - keras64|`` (largest absolute differences). Records kerasbn's
    difference from Keras's float32 result and both errors, relative to the
    output's scale."""
    ours, theirs = max_abs_diff(actual, keras64), max_abs_diff(keras32, keras64)
    size = scale(keras64)
    figure(arch, quantity, max_abs_diff(actual, keras32) / size)
    figure(arch, f"{quantity}: kerasbn float32 vs float64", ours / size)
    figure(arch, f"{quantity}: keras float32 vs float64", theirs / size)
    record(f"applications: {arch} {quantity} (relative)", ours / size, 0.0)
    assert ours <= ROUNDING_FACTOR * theirs, (quantity, ours, theirs)


def test_from_keras_gives_kerass_inference_outputs(arch, models, float64_keras):
    model, converted, x = models
    assert len(bn_layers(converted)) == len(bn_layers(model)) > 0
    assert all(isinstance(layer, kerasbn.BatchNorm) for layer in bn_layers(converted))
    keras32 = numpy(model(x, training=False))
    actual = numpy(converted(x, training=False))
    check_rounding(arch, "inference", actual, keras32, float64_keras["inference"])


def test_fold_keeps_predictions_and_leaves_no_bn(arch, models, float64_keras):
    model, _, x = models
    folded = kerasbn.fold_batch_norms(model)
    assert not bn_layers(folded)
    keras32 = numpy(model(x, training=False))
    actual = numpy(folded(x, training=False))
    check_rounding(arch, "fold", actual, keras32, float64_keras["inference"])


def test_keras_file_round_trip_is_exact(arch, models, tmp_path):
    _, converted, x = models
    path = tmp_path / f"{arch}.keras"
    converted.save(path)
    loaded = keras.saving.load_model(path)
    exact = (
        all(
            np.array_equal(a, b)
            for a, b in zip(numpy(loaded.weights), numpy(converted.weights))
        )
        and max_abs_diff(loaded(x), converted(x)) == 0.0
    )
    figure(arch, "save exact", exact)
    assert exact


def test_to_keras_gives_back_the_original_configs(arch, models):
    model, converted, _ = models
    back = kerasbn.to_keras(converted)
    exact = back.get_config() == model.get_config() and all(
        np.array_equal(a, b) for a, b in zip(numpy(back.weights), numpy(model.weights))
    )
    figure(arch, "to_keras exact", exact)
    assert exact


def test_training_step_matches_keras_to_float32_rounding(arch, models, float64_keras):
    # Last of the module's tests: it moves the fixture models' statistics.
    model, converted, x = models
    for quantity, run in (
        ("training", lambda m: m(x, training=True)),
        ("statistics", moving_statistics),
    ):
        keras32, actual = numpy(run(model)), numpy(run(converted))
        check_rounding(arch, quantity, actual, keras32, float64_keras[quantity])
