"""The tools on every keras_hub model family that holds batch norm.

The models are the entries of ``keras_hub_models.py`` (smallest configs,
random weights, 64-px inputs, no presets). Each gets mild random BN
statistics and the peer is always the keras_hub model itself:

* ``from_keras`` finds every BN at any depth (graph nodes and custom layers'
  attributes) and swaps each for ``kerasbn.BatchNorm``; the result keeps the
  model's class and every weight path, gives its inference outputs, and after
  one training-mode call the same outputs and weights (moving statistics
  included), path by path;
* ``fold_batch_norms`` leaves no BN layer at any depth and keeps the
  predictions;
* ``recalibrate`` on one batch sets every BN's statistics to that batch's:
  inference then gives the training-mode outputs of the original model;
* ``to_keras(from_keras(model))`` gives back the original config and weights;
* a ``.keras`` file of the converted model loads back, in a fresh process that
  imports only kerasbn and keras_hub, with the same weights and outputs.

"The same" is to ``TOLERANCE`` of the output's largest magnitude: these are
float32 evaluations of the same sums in another order, far closer than a
missed BN with random statistics. Every call passes ``training`` explicitly:
a plain ``model(x)`` runs the BN inside DeepLabV3's and SegFormer's inner
Sequential models on the batch's statistics. Where a model gathers its
results by a top-k over scores that random weights make tie (D-FINE's
anchors), the outputs before that selection are compared
(``Entry.before_top_k``). A test that Keras itself fails on an entry
(``Entry.keras_failures``) is expected to fail (xfail) with that reason.

By default the suite runs ``keras_hub_models.DEFAULT``; ``KERASBN_KERAS_HUB=all``
runs every entry, ``KERASBN_KERAS_HUB=ResNetBackbone,...`` the ones named.
Marked ``keras_hub``: ``pytest -m "not keras_hub"`` skips it. Set
``KERASBN_KERAS_HUB_JSON`` to a path to get the measured figures
(``benchmarks/keras_hub_table.py --suite`` prints them as a table).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import keras_hub_models as zoo
import numpy as np
import pytest
from test_applications import BATCH_NORMS, max_abs_diff, numpy, scale

import kerasbn

pytest.importorskip("keras_hub")

pytestmark = pytest.mark.keras_hub

TOLERANCE = 1e-4
# A training call normalizes each BN's input with that batch's statistics, so
# rounding differences of the statistics' sums (another kernel's order)
# compound through BN after BN: BASNet's 54 in series reach 2e-4. A missed or
# wrong BN is off by O(1).
TRAINING_TOLERANCE = 1e-3
# Folding rounds each BN once more (an affine formed in float64, stored in
# float32); D-FINE (47 BN before a transformer decoder) measured 3.8e-4.
FOLD_TOLERANCE = 1e-3
# Figures measured in this run, by entry, for the table script.
FIGURES: dict[str, dict] = {}


def figure(name: str, key: str, value) -> None:
    """Keeps a measured figure; with ``KERASBN_KERAS_HUB_JSON`` set, also
    writes every figure so far to that file."""
    FIGURES.setdefault(name, {})[key] = value
    path = os.environ.get("KERASBN_KERAS_HUB_JSON")
    if path:
        with open(path, "w") as file:
            json.dump({"backend": keras.backend.backend(), "figures": FIGURES}, file)


def randomized(entry: zoo.Entry) -> keras.Model:
    """``entry``'s model with mild random gamma, beta and moving statistics in
    every BN at any depth, the same in every call, and its Dropout layers'
    rate set to 0, so that training-mode calls are deterministic."""
    model = entry.build()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    rng = np.random.default_rng(0)
    for layer in zoo.batch_norms(model):
        layer.set_weights(
            [
                rng.uniform(0.8, 1.25, w.shape).astype(w.dtype)
                if "variance" in w.path or "gamma" in w.path
                else rng.normal(0.0, 0.1, w.shape).astype(w.dtype)
                for w in layer.weights
            ]
        )
    return model


def all_batch_norms(model) -> list:
    """Every BN layer of either kind at any depth."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, BATCH_NORMS)
    ]


def weights_by_path(model) -> dict:
    return {w.path: w for w in model.weights}


def relative(actual, expected) -> float:
    return max_abs_diff(actual, expected) / max(scale(expected), 1e-12)


def expect_keras_can(entry: zoo.Entry, what: str) -> None:
    """Marks the test xfail where Keras itself cannot do ``what`` on ``entry``."""
    reason = entry.keras_failures.get(what)
    if reason:
        pytest.xfail(f"Keras itself: {reason}")


@pytest.fixture(scope="module", params=zoo.selected(), ids=lambda e: e.name)
def entry(request):
    reason = request.param.skip_reason()
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(scope="module")
def x(entry):
    return entry.inputs()


@pytest.fixture(scope="module")
def model(entry):
    return randomized(entry)


@pytest.fixture(scope="module")
def converted(model):
    # A copy: the original model stays as it was (checked below).
    return kerasbn.from_keras(model)


def test_from_keras_swaps_every_bn_and_keeps_the_model(entry, model, converted, x):
    total = len(zoo.batch_norms(model))
    found = all_batch_norms(converted)
    swapped = [b for b in found if isinstance(b, kerasbn.BatchNorm)]
    kept = type(converted) is type(model)
    figure(entry.name, "bn total", total)
    figure(entry.name, "bn found", len(found))
    figure(entry.name, "bn swapped", len(swapped))
    figure(entry.name, "class kept", kept)
    assert len(found) == len(swapped) == total > 0
    assert kept
    assert not any(isinstance(b, kerasbn.BatchNorm) for b in all_batch_norms(model))
    assert list(weights_by_path(converted)) == list(weights_by_path(model))
    assert [layer.name for layer in zoo.batch_norms(model)] == [
        layer.name for layer in swapped
    ]
    difference = relative(
        entry.outputs(converted, x, False), entry.outputs(model, x, False)
    )
    figure(entry.name, "inference", difference)
    assert difference <= TOLERANCE


def test_from_config_works_on_the_result(entry, converted):
    again = type(converted).from_config(converted.get_config())
    assert type(again) is type(converted)
    assert len(again.weights) == len(converted.weights)


def test_a_compiled_model_gives_a_compiled_copy(entry, model):
    # keras_hub tasks compile themselves; their compile() is their own.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = kerasbn.from_keras(model)
    assert not [w for w in caught if "compile" in str(w.message)]
    assert converted.compiled == model.compiled
    if model.compiled:
        assert converted.optimizer is not model.optimizer
        assert converted.get_compile_config() == model.get_compile_config()


def test_training_step_matches_keras(entry, x):
    # Fresh models: the training call moves their statistics.
    model = randomized(entry)
    converted = kerasbn.from_keras(model)  # a copy, with variables of its own
    difference = relative(
        entry.outputs(converted, x, True), entry.outputs(model, x, True)
    )
    reference = weights_by_path(model)
    for path, weight in weights_by_path(converted).items():
        difference = max(difference, relative(weight, reference[path]))
    figure(entry.name, "training", difference)
    assert difference <= TRAINING_TOLERANCE


def test_fold_leaves_no_bn_and_keeps_predictions(entry, model, x):
    expected = entry.outputs(model, x, False)
    folded = kerasbn.fold_batch_norms(randomized(entry))
    assert not all_batch_norms(folded)
    difference = relative(entry.outputs(folded, x, False), expected)
    figure(entry.name, "fold", difference)
    assert difference <= FOLD_TOLERANCE


def moving_means(model) -> dict:
    """Every BN's moving mean at any depth, by weight path."""
    return {b.moving_mean.path: numpy(b.moving_mean)[0] for b in all_batch_norms(model)}


def test_recalibrate_sets_every_bn_to_the_batch(entry, x):
    expected = entry.outputs(randomized(entry), x, True)
    model = randomized(entry)
    before = moving_means(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = kerasbn.recalibrate(model, x, batch_size=zoo.BATCH)
    after = moving_means(result)
    changed = [
        p for p, mean in after.items() if not np.array_equal(mean, before.get(p))
    ]
    # BN layers off the output path (a backbone's unused level) are named in
    # a warning and keep their statistics.
    named = " ".join(
        str(w.message) for w in caught if "never reached" in str(w.message)
    )
    left = [p for p in after if p not in changed]
    figure(entry.name, "recalibrated", len(changed))
    figure(entry.name, "bn off the call path", len(left))
    assert list(after) == list(before)
    assert all(p.rsplit("/", 2)[-2] in named for p in left), (left, named)
    graphs = kerasbn._graph.Graphs(model)
    if any(len(graphs.calls(bn)) > 1 for bn in all_batch_norms(model)):
        # A BN called twice per batch (BASNet's shared blocks) gets the pooled
        # statistics of both calls, which no single training call uses.
        return
    assert relative(entry.outputs(result, x, False), expected) <= TOLERANCE


def test_to_keras_gives_back_the_original(entry):
    original = randomized(entry)
    back = kerasbn.to_keras(kerasbn.from_keras(original))
    assert type(back) is type(original)
    assert back.get_config() == original.get_config()
    reference = weights_by_path(original)
    assert list(weights_by_path(back)) == list(reference)
    for path, weight in weights_by_path(back).items():
        np.testing.assert_array_equal(numpy(weight)[0], numpy(reference[path])[0])


# Run in a fresh process: loads the file with plain keras.models.load_model
# (the model's own code makes Keras's BN layers, which must find the saved
# statistics) and with kerasbn.load_model (kerasbn layers everywhere), and
# prints, for each, the largest differences of weights and outputs.
RELOAD = textwrap.dedent(
    """
    import json, sys
    import keras, keras_hub, numpy as np
    import kerasbn

    folder = sys.argv[1]
    saved = np.load(folder + "/saved.npz")
    found = {}
    for loader in ("keras", "kerasbn"):
        load = keras.models.load_model if loader == "keras" else kerasbn.load_model
        model = load(folder + "/model.keras")
        kinds = {type(bn) for bn in model._flatten_layers()
                 if isinstance(bn, (keras.layers.BatchNormalization, kerasbn.BatchNorm))}
        # By position: a custom layer built inside a functional construction has
        # weight paths that depend on that context, for Keras's own BN too.
        weights = [keras.ops.convert_to_numpy(w) for w in model.weights]
        paths = sorted((p for p in saved.files if p.startswith("w:")),
                       key=lambda p: int(p.split(":")[1]))
        worst = max(float(np.max(np.abs(w - saved[p])))
                    for w, p in zip(weights, paths))
        outputs = keras.tree.flatten(model(saved["x"], training=False))
        out = max(
            float(np.max(np.abs(keras.ops.convert_to_numpy(y) - saved[f"y{i}"])))
            for i, y in enumerate(outputs)
        )
        found[loader] = {
            "class": type(model).__name__, "all_paths": len(paths) == len(weights),
            "weights": worst, "outputs": out,
            "kerasbn_only": kinds == {kerasbn.BatchNormalization},
        }
    print(json.dumps(found))
    """
)


def test_keras_file_round_trip(entry, x, tmp_path, request):
    expect_keras_can(entry, "keras_file")
    converted = request.getfixturevalue("converted")
    if not isinstance(x, np.ndarray):
        pytest.skip("the reload script feeds one array")
    converted.save(tmp_path / "model.keras")
    outputs = numpy(converted(x, training=False))
    np.savez(
        tmp_path / "saved.npz",
        x=x,
        **{f"y{i}": y for i, y in enumerate(outputs)},
        **{f"w:{i}": numpy(w)[0] for i, w in enumerate(converted.weights)},
    )
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": keras.backend.backend()},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    # kerasbn's loader gives the saved layers: the outputs exactly. Keras's
    # gives its own BN where the model's code creates one, whose inference
    # rounds otherwise on some backends: the outputs to float32 rounding.
    scale = max(1.0, *(float(np.max(np.abs(y))) for y in outputs))
    rounding = {"kerasbn": 0.0, "keras": 1e-6 * scale}
    for loader, result in found.items():
        exact = (
            result["class"] == type(converted).__name__
            and result["all_paths"]
            and result["weights"] == 0.0
            and result["outputs"] <= rounding[loader]
        )
        figure(entry.name, f"{loader} reload", exact)
        assert exact, (loader, result)
    assert found["kerasbn"]["kerasbn_only"], found
