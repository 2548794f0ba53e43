"""freeze_batch_norms: every BN at any depth keeps its statistics under fit.

The references: the weights as they were before ``fit`` (exactly), and the
BN formula in NumPy with those frozen statistics.
"""

import keras
import numpy as np
import pytest
from conftest import np_batch_norm, record, to_numpy

import kerasbn


@keras.saving.register_keras_serializable(package="kerasbn_tests")
class Block(keras.layers.Layer):
    """A custom layer that holds its BN layers in a list and a dict."""

    def __init__(self, bn_class, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4)
        self.norms = [bn_class(moving_mean_initializer="random_normal")]
        self.by_name = {
            "last": bn_class(
                moving_variance_initializer=keras.initializers.RandomUniform(0.5, 2.0)
            )
        }

    def call(self, x, training=None):
        x = self.norms[0](self.dense(x), training=training)
        return self.by_name["last"](x, training=training)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 4)


def _model(bn_class):
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4), bn_class(beta_initializer="ones")],
        name="inner",
    )
    inputs = keras.Input((3,))
    x = bn_class(gamma_initializer="random_normal")(keras.layers.Dense(4)(inputs))
    x = Block(bn_class, name="block")(inner(x))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    model(np.zeros((2, 3), "float32"))  # builds the block's layers on every backend
    return model


def _bn_layers(model):
    return [bn for _, bn in kerasbn._graph.batch_norms(model)]


def _fit(model, rng):
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x = rng.normal(1.0, 1.0, (32, 3)).astype("float32")
    model.fit(x, rng.normal(size=(32, 2)), batch_size=8, epochs=2, verbose=0)
    return x


@pytest.mark.parametrize("train_affine", [False, True])
def test_fit_leaves_every_bn_statistic_exactly_as_it_was(rng, train_affine):
    model = _model(kerasbn.BatchNorm)
    assert kerasbn.freeze_batch_norms(model, train_affine=train_affine) is model
    layers = _bn_layers(model)
    assert len(layers) == 4
    before = [[w.copy() for w in bn.get_weights()] for bn in layers]
    dense_before = to_numpy(model.layers[1].kernel).copy()
    x = _fit(model, rng)
    for bn, weights in zip(layers, before):
        assert bn.statistics == "moving"
        gamma, beta, mean, var = bn.get_weights()
        np.testing.assert_array_equal(mean, weights[2])
        np.testing.assert_array_equal(var, weights[3])
        changed = max(
            np.max(np.abs(gamma - weights[0])), np.max(np.abs(beta - weights[1]))
        )
        record(
            f"freeze train_affine={train_affine}: gamma/beta change under fit",
            changed,
            0,
        )
        assert (changed > 1e-5) == train_affine
    assert np.max(np.abs(to_numpy(model.layers[1].kernel) - dense_before)) > 1e-5
    # Training-mode output of the first BN uses the frozen statistics (NumPy).
    bn = layers[0]
    h = to_numpy(model.layers[1](x))
    gamma, beta, mean, var = bn.get_weights()
    np.testing.assert_allclose(
        to_numpy(bn(h, training=True)),
        np_batch_norm(h, mean, var, gamma, beta),
        rtol=1e-5,
        atol=1e-5,
    )


def test_keras_bn_is_frozen_by_keras_rule_without_train_affine(rng):
    model = _model(keras.layers.BatchNormalization)
    kerasbn.freeze_batch_norms(model)
    layers = _bn_layers(model)
    assert all(type(bn) is keras.layers.BatchNormalization for bn in layers)
    before = [[w.copy() for w in bn.get_weights()] for bn in layers]
    _fit(model, rng)
    for bn, weights in zip(layers, before):
        assert not bn.trainable
        for w, w_before in zip(bn.get_weights(), weights):
            np.testing.assert_array_equal(w, w_before)


def test_keras_bn_with_train_affine_becomes_kerasbn_in_place(rng):
    model = _model(keras.layers.BatchNormalization)
    paths = [path for path, _ in kerasbn._graph.batch_norms(model)]
    before = [[w.copy() for w in bn.get_weights()] for bn in _bn_layers(model)]
    kerasbn.freeze_batch_norms(model, train_affine=True)
    found = kerasbn._graph.batch_norms(model)
    assert [path for path, _ in found] == paths
    assert all(isinstance(bn, kerasbn.BatchNorm) for _, bn in found)
    _fit(model, rng)
    for (_, bn), weights in zip(found, before):
        np.testing.assert_array_equal(bn.get_weights()[2], weights[2])
        np.testing.assert_array_equal(bn.get_weights()[3], weights[3])
        assert np.max(np.abs(bn.get_weights()[1] - weights[1])) > 1e-5


def test_keras_bn_subclass_with_train_affine_is_refused_naming_its_path():
    class MyBN(keras.layers.BatchNormalization):
        pass

    model = keras.Sequential([keras.Input((3,)), MyBN(name="mine")], name="seq")
    with pytest.raises(ValueError, match=r"\['seq/mine'\].*subclasses"):
        kerasbn.freeze_batch_norms(model, train_affine=True)


def test_freeze_needs_a_model():
    with pytest.raises(ValueError, match="freeze_batch_norms.*keras.Model"):
        kerasbn.freeze_batch_norms(kerasbn.BatchNorm())
