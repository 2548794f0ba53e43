"""Serialization and deployment: config, .keras, SavedModel and TFLite.

Config and .keras files work on every backend; SavedModel and TFLite are
TensorFlow artefacts, tested on the TensorFlow backend.
"""

import keras
import numpy as np
import pytest
from conftest import record, run_tflite, tensorflow_only

import kerasbn

SAVED_MODEL = tensorflow_only(
    "SavedModel and TFLite are TensorFlow formats, written from the TF graph"
)


@pytest.fixture(scope="module")
def trained_model():
    rng = np.random.default_rng(7)
    model = keras.Sequential([keras.Input((6, 6, 2))])
    model.add(keras.layers.Conv2D(4, 3))
    model.add(kerasbn.BatchNorm(momentum=0.5))
    model.add(keras.layers.Flatten())
    model.add(keras.layers.Dense(5))
    model.add(kerasbn.BatchNorm(axis=[-1], epsilon=1e-2))
    model.compile(optimizer="adam", loss="mse")
    x = rng.normal(2.0, 3.0, (64, 6, 6, 2)).astype("float32")
    model.fit(x, rng.normal(size=(64, 5)), batch_size=16, epochs=2, verbose=0)
    return model, rng.normal(2.0, 3.0, (10, 6, 6, 2)).astype("float32")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(axis=[1, 2], momentum=0.5, epsilon=0.01, center=False),
        dict(
            renorm=True,
            renorm_clipping={"rmax": 3.0},
            renorm_momentum=0.9,
            gamma_regularizer="l2",
            beta_constraint="non_neg",
            name="bn7",
            trainable=False,
        ),
    ],
)
def test_get_config_from_config_round_trips_exactly(kwargs):
    layer = kerasbn.BatchNorm(**kwargs)
    config = layer.get_config()
    assert kerasbn.BatchNorm.from_config(config).get_config() == config


def test_keras_file_round_trip_needs_no_custom_objects(tmp_path, trained_model):
    model, x = trained_model
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[1], kerasbn.BatchNorm)
    for w, w_loaded in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(w, w_loaded)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )


@SAVED_MODEL
def test_model_export_serve_equals_predict(tmp_path, trained_model):
    import tensorflow as tf

    model, x = trained_model
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)
    served = loaded.serve(tf.constant(x)).numpy()
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-6)
    record("model.export serve vs predict", served, expected)


@SAVED_MODEL
def test_tf_saved_model_save_uses_moving_statistics(tmp_path, trained_model):
    import tensorflow as tf

    model, x = trained_model
    path = str(tmp_path / "saved")
    tf.saved_model.save(model, path)
    loaded = tf.saved_model.load(path)
    served = loaded.signatures["serving_default"](tf.constant(x))
    served = next(iter(served.values())).numpy()
    np.testing.assert_allclose(
        served, model.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )
    record(
        "tf.saved_model.save signature vs predict", served, model.predict(x, verbose=0)
    )


@SAVED_MODEL
def test_saved_model_converts_to_tflite_and_matches(tmp_path, trained_model):
    import tensorflow as tf

    model, x = trained_model
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    tflite = tf.lite.TFLiteConverter.from_saved_model(path).convert()
    out = run_tflite(tflite, x)
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    record("TFLite vs predict", out, expected)
