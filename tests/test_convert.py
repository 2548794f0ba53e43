"""from_keras / to_keras against the original model (the peer), config and weights."""

import inspect
import json

import keras
import numpy as np
import pytest
from conftest import record, to_numpy
from functional_graphs import every_node_model, flat_numpy, randomize_batch_norms
from functional_graphs import inputs as graph_inputs
from functional_graphs import leaf_layers as all_leaf_layers

import kerasbn

KERAS_BN = keras.layers.BatchNormalization
KERAS_HAS_RENORM = "renorm" in inspect.signature(KERAS_BN.__init__).parameters
L = keras.layers


def keras_bn_model(bn=KERAS_BN):
    """A functional model with BN layers of varied configs, nested two levels."""
    inner_seq = keras.Sequential(
        [
            keras.Input((4, 4, 6)),
            L.Conv2D(5, 3, padding="same"),
            bn(axis=1, center=False, epsilon=0.01, name="bn_axis1"),
        ],
        name="inner_seq",
    )
    inner_in = keras.Input((4, 4, 5))
    x = L.Dense(3)(L.Flatten()(inner_in))
    renorm = dict(renorm=True, renorm_clipping={"rmax": 2.0}, renorm_momentum=0.9)
    if not KERAS_HAS_RENORM:  # Keras's BN has renorm from 3.4
        renorm = dict(momentum=0.9)
    x = bn(**renorm)(x)
    inner_fn = keras.Model(inner_in, x, name="inner_fn")
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(6, 3, use_bias=False)(inputs)
    x = bn(momentum=0.8, gamma_regularizer="l2", beta_constraint="non_neg")(x)
    x = bn(scale=False, trainable=False, name="frozen")(L.ReLU()(x))
    return keras.Model(inputs, inner_fn(inner_seq(x)), name="outer")


def leaf_layers(model):
    """Every layer but the input layers, nested models' layers included."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        elif not isinstance(layer, L.InputLayer):
            yield layer


def trained(model, rng):
    """``model`` after two fit steps, so that every BN has moved statistics."""
    model.compile(optimizer="adam", loss="mse")
    x = rng.normal(1.0, 2.0, (16, *model.input_shape[1:]))
    model.fit(x, rng.normal(size=(16, 3)), batch_size=8, verbose=0)
    return model


def assert_same_predictions(converted, model, rng, name):
    x = rng.normal(1.0, 2.0, (8, 6, 6, 3))
    expected = model.predict(x, verbose=0)
    actual = converted.predict(x, verbose=0)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)
    record(f"convert: {name} predict vs original", actual, expected)


def assert_swapped_layers(converted, model, old_class, new_class):
    pairs = list(zip(leaf_layers(converted), leaf_layers(model)))
    assert len(pairs) == len(list(leaf_layers(model)))
    swapped = 0
    for new, old in pairs:
        assert new is not old and new.name == old.name
        assert type(new) is (new_class if type(old) is old_class else type(old))
        swapped += type(old) is old_class
        for w_new, w_old in zip(new.weights, old.weights, strict=True):
            assert w_new.name == w_old.name and w_new.trainable == w_old.trainable
            np.testing.assert_array_equal(to_numpy(w_new), to_numpy(w_old))
    assert swapped == 4  # keras_bn_model has four BN layers


@pytest.fixture(scope="module")
def keras_model():
    return trained(keras_bn_model(), np.random.default_rng(3))


def test_from_keras_swaps_every_bn_in_nested_models_keeping_weights(rng, keras_model):
    converted = kerasbn.from_keras(keras_model)
    assert_swapped_layers(converted, keras_model, KERAS_BN, kerasbn.BatchNormalization)
    assert_same_predictions(converted, keras_model, rng, "from_keras")


def test_from_keras_carries_every_keras_config_key(keras_model):
    converted = kerasbn.from_keras(keras_model)
    for new, old in zip(leaf_layers(converted), leaf_layers(keras_model)):
        if isinstance(old, KERAS_BN):
            new_config = new.get_config()
            for key, value in old.get_config().items():
                assert new_config[key] == value, key


def test_to_keras_restores_the_original_layers_configs_and_weights(rng, keras_model):
    back = kerasbn.to_keras(kerasbn.from_keras(keras_model))
    for new, old in zip(leaf_layers(back), leaf_layers(keras_model)):
        assert type(new) is type(old)
        assert new.get_config() == old.get_config()
    assert_same_predictions(back, keras_model, rng, "to_keras(from_keras)")


def test_to_keras_swaps_kerasbn_layers_and_drops_the_dependency(rng):
    model = trained(keras_bn_model(kerasbn.BatchNorm), rng)
    converted = kerasbn.to_keras(model)
    assert_swapped_layers(converted, model, kerasbn.BatchNorm, KERAS_BN)
    assert not any(
        type(layer).__module__.startswith("kerasbn") for layer in leaf_layers(converted)
    )
    assert_same_predictions(converted, model, rng, "to_keras")


@pytest.mark.parametrize("convert", [kerasbn.from_keras, kerasbn.to_keras])
def test_swapped_model_compiles_and_trains(rng, keras_model, convert):
    model = (
        kerasbn.from_keras(keras_model) if convert is kerasbn.to_keras else keras_model
    )
    converted = convert(model)
    assert converted.compiled  # from the original's compile config
    converted.compile(optimizer="sgd", loss="mse")
    before = converted.get_weights()
    x = rng.normal(1.0, 2.0, (8, 6, 6, 3))
    history = converted.fit(x, rng.normal(size=(8, 3)), verbose=0)
    assert np.isfinite(history.history["loss"][0])
    changed = [
        not np.array_equal(a, b) for a, b in zip(before, converted.get_weights())
    ]
    assert sum(changed) >= len(changed) // 2


def test_original_model_is_untouched(keras_model):
    weights = keras_model.get_weights()
    layers = list(leaf_layers(keras_model))
    kerasbn.from_keras(keras_model)
    assert list(leaf_layers(keras_model)) == layers
    for before, after in zip(weights, keras_model.get_weights()):
        np.testing.assert_array_equal(before, after)


def sequential(bn):
    return keras.Sequential([keras.Input((4,)), L.Dense(3), bn])


def test_one_element_list_axis_converts_to_an_int_axis(rng):
    model = sequential(kerasbn.BatchNorm(axis=[-1]))
    converted = kerasbn.to_keras(model)
    assert converted.layers[-1].axis == -1
    x = rng.normal(size=(5, 4))
    np.testing.assert_allclose(
        converted.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )


def test_to_keras_refuses_several_axes():
    model = keras.Sequential([keras.Input((3, 4)), kerasbn.BatchNorm(axis=[1, 2])])
    with pytest.raises(ValueError, match=r"one axis; got axis=\[1, 2\]"):
        kerasbn.to_keras(model)


def test_to_keras_refuses_a_kerasbn_only_option_but_converts_its_default():
    bn_class = kerasbn.BatchNorm
    with pytest.raises(ValueError, match="has no `virtual_batch_size`; got .*=4"):
        kerasbn.to_keras(sequential(bn_class(virtual_batch_size=4)))
    converted = kerasbn.to_keras(sequential(bn_class(virtual_batch_size=None)))
    assert type(converted.layers[-1]) is KERAS_BN


def test_a_layer_that_is_not_a_model_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="to_keras.*needs a keras.Model.*Dense"):
        kerasbn.to_keras(keras.layers.Dense(3))


@pytest.mark.parametrize("training", [False, True])
def test_from_keras_handles_op_nodes_shared_layers_nested_models_and_keyword_calls(
    rng, training
):
    model = every_node_model()
    randomize_batch_norms(model, rng)
    converted = kerasbn.from_keras(model)
    names = {type(layer): [] for layer in all_leaf_layers(converted)}
    for layer in all_leaf_layers(converted):
        names[type(layer)].append(layer.name)
    assert sorted(names[kerasbn.BatchNormalization]) == sorted(
        layer.name for layer in all_leaf_layers(model) if isinstance(layer, KERAS_BN)
    )
    assert len(names[kerasbn.BatchNormalization]) == 6 and KERAS_BN not in names
    assert len(converted.weights) == len(model.weights)  # the conv is still shared
    x = graph_inputs(rng)
    actual, expected = converted(x, training=training), model(x, training=training)
    for a, e in zip(flat_numpy(actual), flat_numpy(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
        record(f"convert: every-node graph, training={training}", a, e)
    moved = {  # a training call moved both models' statistics the same way
        layer.name: flat_numpy([layer.moving_mean, layer.moving_variance])
        for layer in all_leaf_layers(converted)
        if isinstance(layer, kerasbn.BatchNorm)
    }
    for layer in all_leaf_layers(model):
        if isinstance(layer, KERAS_BN):
            for a, e in zip(
                moved[layer.name],
                flat_numpy([layer.moving_mean, layer.moving_variance]),
            ):
                np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def test_to_keras_of_from_keras_gives_back_every_node_models_config_and_weights(rng):
    model = every_node_model()
    randomize_batch_norms(model, rng)
    back = kerasbn.to_keras(kerasbn.from_keras(model))
    # A copy's build configs hold lists where the original's hold tuples, as
    # after a .keras round trip: compare them as JSON.
    assert json.dumps(back.get_config()) == json.dumps(model.get_config())
    for a, e in zip(flat_numpy(back.weights), flat_numpy(model.weights), strict=True):
        np.testing.assert_array_equal(a, e)
    x = graph_inputs(rng)
    for a, e in zip(flat_numpy(back(x)), flat_numpy(model(x)), strict=True):
        np.testing.assert_array_equal(a, e)


def test_converted_every_node_model_round_trips_through_a_keras_file(rng, tmp_path):
    model = every_node_model()
    randomize_batch_norms(model, rng)
    model.save(tmp_path / "original.keras")
    try:
        keras.saving.load_model(tmp_path / "original.keras")
    except ValueError as error:  # Keras 3.3 loses the op nodes' history
        pytest.skip(f"Keras {keras.__version__} cannot load the original: {error}")
    converted = kerasbn.from_keras(model)
    converted.save(tmp_path / "converted.keras")
    loaded = keras.saving.load_model(tmp_path / "converted.keras")
    # JSON turns the configs' tuples into lists, for Keras's own layers too.
    assert json.dumps(loaded.get_config()) == json.dumps(converted.get_config())
    x = graph_inputs(rng)
    for a, e in zip(flat_numpy(loaded(x)), flat_numpy(converted(x)), strict=True):
        np.testing.assert_array_equal(a, e)


def test_frozen_nested_functional_model_stays_frozen_and_keeps_its_config():
    # keras.models.clone_model alone would drop the nested model's flag.
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, KERAS_BN()(L.Dense(3)(inner_in)), name="backbone")
    inner.trainable = False
    outer_in = keras.Input((4,), name="features")
    model = keras.Model(outer_in, L.Dense(2)(inner(outer_in)))
    converted = kerasbn.from_keras(model)
    assert converted.get_layer("backbone").trainable is False
    assert len(converted.trainable_weights) == len(model.trainable_weights) == 2
    back = kerasbn.to_keras(converted).get_config()
    assert json.dumps(back) == json.dumps(model.get_config())  # tuples: see above
