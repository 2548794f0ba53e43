"""load_legacy_model against tf_keras itself: its .h5 files, predictions and training.

tf_keras (Keras 2, on TensorFlow whatever Keras 3's backend) trains a small
model one step, saves it, and is the peer: the loaded model must predict as it
does, and one more training step on the same batch must move the moving
statistics as tf_keras moves them. Files go to ``tmp_path``.
"""

import json
import warnings

import keras
import numpy as np
import pytest
from conftest import record, to_numpy

import kerasbn

tf_keras = pytest.importorskip("tf_keras")
h5py = pytest.importorskip("h5py")


def _tf_keras_model(input_shape, bn):
    L = tf_keras.layers
    inputs = L.Input(input_shape)
    conv = {2: L.Dense, 3: L.Conv1D, 4: L.Conv2D, 5: L.Conv3D}[len(input_shape) + 1]
    x = conv(4) if len(input_shape) == 1 else conv(4, 3, padding="same")
    x = bn(x(inputs))
    outputs = L.Dense(2)(L.Flatten()(x))
    return tf_keras.Model(inputs, outputs)


def _batches(rng, input_shape, n=8):
    x = rng.normal(1.0, 2.0, (n, *input_shape)).astype("float32")
    return x, rng.normal(size=(n, 2)).astype("float32")


def _bn_weights(model, cls):
    """The model's BN layer and its weights by name (gamma, moving_mean...)."""
    layer = next(
        layer
        for layer in model.layers
        if isinstance(layer, cls) or "norm" in layer.name
    )
    names = [w.name.split("/")[-1].split(":")[0] for w in layer.weights]
    return layer, {
        n: np.asarray(to_numpy(w)).ravel() for n, w in zip(names, layer.weights)
    }


def _compare_after_one_more_step(model, old, rng, input_shape, label):
    """Trains both on one batch; asserts and records their BN weights' gap."""
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x, y = _batches(rng, input_shape)
    old.train_on_batch(x, y)
    model.train_on_batch(x, y)
    _, ours = _bn_weights(model, kerasbn.BatchNorm)
    _, theirs = _bn_weights(old, tf_keras.layers.BatchNormalization)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=2e-6, atol=1e-6)
    relative = max(
        float(np.max(np.abs(ours[n] - theirs[n])) / np.max(np.abs(theirs[n])))
        for n in ours
        if n not in ("gamma", "beta")
    )
    record(f"legacy {label}: moving statistics after one more step (rel.)", relative, 0)


OPTIONS = {
    "default (fused, NHWC)": ((6, 6, 3), dict()),
    "axis=1 (fused, NCHW)": ((3, 6, 6), dict(axis=1)),
    "momentum=0.9, epsilon=1e-2": ((6, 6, 3), dict(momentum=0.9, epsilon=1e-2)),
    "center=False, scale=False": ((6, 6, 3), dict(center=False, scale=False)),
    "5-D input (fused)": ((3, 4, 4, 2), dict(momentum=0.5)),
    "2-D input (not fused)": ((5,), dict(momentum=0.9)),
    "3-D input (not fused)": ((7, 3), dict(momentum=0.9)),
    "virtual_batch_size=2": ((6, 6, 3), dict(virtual_batch_size=2, momentum=0.9)),
    "axis=[1, 2]": ((6, 6, 3), dict(axis=[1, 2], momentum=0.9)),
    "renorm": (
        (6, 6, 3),
        dict(renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0}, momentum=0.9),
    ),
    "SyncBatchNormalization": ((6, 6, 3), "sync"),
    "trainable=False": ((6, 6, 3), dict(trainable=False)),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_loaded_model_predicts_and_trains_as_tf_keras(rng, tmp_path, option):
    input_shape, kwargs = OPTIONS[option]
    if kwargs == "sync":
        bn = tf_keras.layers.experimental.SyncBatchNormalization(momentum=0.9)
    else:
        bn = tf_keras.layers.BatchNormalization(**kwargs)
    old = _tf_keras_model(input_shape, bn)
    old.compile(tf_keras.optimizers.SGD(0.01), "mse")
    x, y = _batches(rng, input_shape)
    old.fit(x, y, batch_size=8, verbose=0)  # moving statistics away from 0 and 1
    path = tmp_path / "old.h5"
    old.save(path)

    model = kerasbn.load_legacy_model(path, compile=False)
    ours, ours_weights = _bn_weights(model, kerasbn.BatchNorm)
    assert isinstance(ours, kerasbn.BatchNorm)
    _, old_weights = _bn_weights(old, tf_keras.layers.BatchNormalization)
    assert ours_weights.keys() == old_weights.keys()
    for name in ours_weights:
        np.testing.assert_array_equal(ours_weights[name], old_weights[name])
    x_test, _ = _batches(rng, input_shape, 5)
    predicted, expected = (
        model.predict(x_test, verbose=0),
        old.predict(x_test, verbose=0),
    )
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-5)
    record(f"legacy {option}: predict vs tf_keras", predicted, expected)
    _compare_after_one_more_step(model, old, rng, input_shape, option)


def test_fused_false_is_not_saved_so_its_layer_loads_unbiased_until_told(rng, tmp_path):
    old = _tf_keras_model((6, 6, 3), tf_keras.layers.BatchNormalization(fused=False))
    old.compile(tf_keras.optimizers.SGD(0.01), "mse")
    path = tmp_path / "old.h5"
    old.save(path)
    model = kerasbn.load_legacy_model(path, compile=False)
    layer = model.layers[2]
    assert layer.unbiased_moving_variance  # tf_keras's file does not say fused=False
    layer.unbiased_moving_variance = False
    _compare_after_one_more_step(
        model, old, rng, (6, 6, 3), "fused=False, then unbiased_moving_variance=False"
    )


def test_keras_own_loader_leaves_the_fused_gap_that_load_legacy_model_closes(
    rng, tmp_path
):
    # Keras's loader with kerasbn as BatchNormalization: the biased update.
    old = _tf_keras_model((6, 6, 3), tf_keras.layers.BatchNormalization(momentum=0.9))
    old.compile(tf_keras.optimizers.SGD(0.0), "mse")
    path = tmp_path / "old.h5"
    old.save(path)
    plain = keras.models.load_model(
        path, custom_objects={"BatchNormalization": kerasbn.BatchNorm}, compile=False
    )
    ours = kerasbn.load_legacy_model(path, compile=False)
    x, y = _batches(rng, (6, 6, 3))
    old.train_on_batch(x, y)
    gaps = {}
    for label, model in (
        ("keras.models.load_model", plain),
        ("load_legacy_model", ours),
    ):
        model.compile(keras.optimizers.SGD(0.0), "mse")
        model.train_on_batch(x, y)
        variance = to_numpy(model.layers[2].moving_variance)
        reference = old.layers[2].moving_variance.numpy()
        gaps[label] = float(np.max(np.abs(variance - reference) / reference))
        record(
            f"legacy fused layer, moving variance after a step via {label}",
            gaps[label],
            0,
        )
    # n = 8 * 6 * 6 values per channel: the biased update is 1/(n - 1) * 0.1 * var off.
    assert gaps["keras.models.load_model"] > 1e-5
    assert gaps["load_legacy_model"] < 1e-6


def _edit_bn_config(path, **entries):
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "BatchNormalization":
                layer["config"].update(entries)
        f.attrs["model_config"] = json.dumps(config)


def test_saved_fused_hint_is_accepted_and_an_adjustment_is_refused(tmp_path):
    old = _tf_keras_model((4, 4, 3), tf_keras.layers.BatchNormalization(name="bn"))
    path = tmp_path / "old.h5"
    old.save(path)
    _edit_bn_config(path, fused=True)
    model = kerasbn.load_legacy_model(path, compile=False)
    assert model.get_layer("bn").unbiased_moving_variance
    _edit_bn_config(path, adjustment="my_adjustment")
    with pytest.raises(ValueError, match=r"'bn'.*`adjustment`='my_adjustment'.*None"):
        kerasbn.load_legacy_model(path, compile=False)


def test_weights_only_file_is_refused_with_a_clear_error(tmp_path):
    old = _tf_keras_model((5,), tf_keras.layers.BatchNormalization())
    path = tmp_path / "old.weights.h5"
    old.save_weights(path)
    with pytest.raises(ValueError, match="no model config"):
        kerasbn.load_legacy_model(path)


def _compiled_file(tmp_path, rng, loss, metrics):
    """A tf_keras model compiled with ``loss`` and ``metrics``, trained one
    step and saved; returns ``(tf_keras model, path, x, y)``."""
    L = tf_keras.layers
    inputs = L.Input((6, 6, 3))
    x = L.BatchNormalization()(L.Conv2D(4, 3)(inputs))
    old = tf_keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))
    old.compile(tf_keras.optimizers.Adam(0.005), loss=loss, metrics=metrics)
    x = rng.normal(size=(16, 6, 6, 3)).astype("float32")
    y = np.arange(16) % 3
    old.fit(x, y, batch_size=8, verbose=0)
    path = tmp_path / "compiled.h5"
    old.save(path)
    return old, path, x, y


def test_file_compiled_with_loss_and_metric_objects_loads_compiled(rng, tmp_path):
    """tf_keras saves ``SparseCategoricalCrossentropy(from_logits=True)`` with
    an ``fn`` argument Keras 3's class does not take, and its optimizer as
    ``Custom>Adam``: the training config is translated, and the loaded model
    evaluates as tf_keras evaluates it."""
    old, path, x, y = _compiled_file(
        tmp_path,
        rng,
        tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        [
            tf_keras.metrics.SparseCategoricalAccuracy(),
            "accuracy",
            tf_keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2"),
        ],
    )
    with pytest.raises(TypeError, match="SparseCategoricalCrossentropy"):
        keras.models.load_model(path)  # Keras's own loader fails on it
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing is dropped
        model = kerasbn.load_legacy_model(path)
    assert model.compiled
    assert model.loss.get_config()["from_logits"] is True
    assert type(model.optimizer).__name__ == "Adam"
    np.testing.assert_allclose(float(to_numpy(model.optimizer.learning_rate)), 0.005)
    expected = old.evaluate(x, y, verbose=0, return_dict=True)
    actual = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(actual) == set(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6)
        record(f"legacy compiled: evaluate {name}", actual[name], expected[name])
    history = model.fit(x, y, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_untranslatable_training_config_loads_uncompiled_with_a_warning(rng, tmp_path):
    """A loss class that Keras 3 does not know cannot be compiled: the model
    loads uncompiled, with a warning that names the loss, and predicts as
    tf_keras does."""

    @tf_keras.utils.register_keras_serializable(package="kerasbn_legacy_tests")
    class Focal(tf_keras.losses.Loss):
        def call(self, y_true, y_pred):
            return tf_keras.losses.sparse_categorical_crossentropy(
                y_true, y_pred, from_logits=True
            )

    old, path, x, _ = _compiled_file(tmp_path, rng, Focal(), ["accuracy"])
    with pytest.warns(UserWarning, match="dropped: loss .*Focal.*uncompiled"):
        model = kerasbn.load_legacy_model(path)
    assert not model.compiled
    np.testing.assert_allclose(
        model.predict(x, verbose=0), old.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
