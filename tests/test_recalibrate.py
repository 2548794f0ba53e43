"""kerasbn.recalibrate against population statistics recomputed in NumPy."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import np_batch_norm, np_moments, to_numpy

import kerasbn

BN_CLASSES = [kerasbn.BatchNorm, keras.layers.BatchNormalization]
DATA_KINDS = ["dataset", "numpy", "generator"]
BATCH = 16


def as_data(kind: str, x: np.ndarray, batch_size: int = BATCH):
    """``x`` as a batched tf.data.Dataset of (x, y), an array, or a generator.

    tf.data serves every Keras backend; it needs TensorFlow installed.
    """
    if kind == "numpy":
        return x
    if kind == "dataset":
        tf = pytest.importorskip("tensorflow")

        y = np.zeros(len(x), "int32")
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return (x[i : i + batch_size] for i in range(0, len(x), batch_size))


def batches(x: np.ndarray, batch_size: int = BATCH) -> list[np.ndarray]:
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


def randomize(model: keras.Model, rng) -> None:
    """Random weights everywhere, moving variances positive."""
    model.set_weights(
        [
            rng.uniform(0.5, 1.5, w.shape).astype(w.dtype)
            if "variance" in w.path
            else rng.normal(0.0, 1.0, w.shape).astype(w.dtype)
            for w in model.weights
        ]
    )


def moving(layer) -> tuple[np.ndarray, np.ndarray]:
    return to_numpy(layer.moving_mean), to_numpy(layer.moving_variance)


@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("bn_class", BN_CLASSES)
def test_first_layer_bn_gets_the_datasets_numpy_statistics(rng, bn_class, kind):
    # A large mean and a small spread, 70 images in batches 16, ..., 16, 6.
    x = rng.normal(50.0, 0.1, (70, 5, 4, 3)).astype("float32")
    model = keras.Sequential(
        [keras.Input((5, 4, 3)), bn_class(), keras.layers.Conv2D(2, 3)]
    )
    kerasbn.recalibrate(model, as_data(kind, x), batch_size=BATCH)
    mean, var = np_moments(x, [3])
    np.testing.assert_allclose(moving(model.layers[0])[0], mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(moving(model.layers[0])[1], var.ravel(), rtol=1e-5)


def test_deeper_functional_model_matches_numpy_recomputation(rng):
    # kerasbn BN, then Dropout and a nested Sequential holding a Keras BN.
    inner = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5), keras.layers.BatchNormalization()]
    )
    inputs = keras.Input((4,))
    h = keras.layers.Dense(6)(inputs)
    h = kerasbn.BatchNorm(epsilon=0.01)(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Dropout(0.5)(h)
    outputs = keras.layers.Dense(2)(inner(h))
    model = keras.Model(inputs, outputs)
    randomize(model, rng)
    x = rng.normal(2.0, 3.0, (50, 4)).astype("float32")

    kerasbn.recalibrate(model, as_data("dataset", x))

    dense1, bn1 = model.layers[1], model.layers[2]
    dense2, bn2 = inner.layers
    kernel1, bias1 = (to_numpy(w).astype(np.float64) for w in dense1.weights)
    kernel2, bias2 = (to_numpy(w).astype(np.float64) for w in dense2.weights)
    gamma1, beta1 = (to_numpy(w).astype(np.float64) for w in (bn1.gamma, bn1.beta))
    h1 = [b @ kernel1 + bias1 for b in batches(x.astype(np.float64))]
    # Upstream BN: batch statistics; Dropout: off.
    h2 = [
        np.maximum(np_batch_norm(h, *np_moments(h, [1]), gamma1, beta1, 0.01), 0)
        @ kernel2
        + bias2
        for h in h1
    ]
    for layer, inputs_seen in ((bn1, h1), (bn2, h2)):
        mean, var = np_moments(np.concatenate(inputs_seen), [1])
        np.testing.assert_allclose(moving(layer)[0], mean.ravel(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(moving(layer)[1], var.ravel(), rtol=1e-5)


def test_dropout_before_a_bn_is_off_during_the_pass(rng):
    x = rng.normal(1.0, 2.0, (64, 3)).astype("float32")
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dropout(0.5), kerasbn.BatchNorm()]
    )
    kerasbn.recalibrate(model, x)
    mean, var = np_moments(x, [1])
    np.testing.assert_allclose(moving(model.layers[1])[1], var.ravel(), rtol=1e-5)


def test_steps_caps_the_number_of_batches(rng):
    x = rng.normal(0.0, 1.0, (80, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm()])
    kerasbn.recalibrate(model, as_data("generator", x), steps=2)
    mean, var = np_moments(x[: 2 * BATCH], [1])
    np.testing.assert_allclose(moving(model.layers[0])[0], mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(moving(model.layers[0])[1], var.ravel(), rtol=1e-5)


@pytest.mark.parametrize("bn_class", BN_CLASSES)
def test_masked_steps_do_not_count(rng, bn_class):
    x = rng.normal(3.0, 1.0, (12, 5, 2)).astype("float32")
    x[:, 3:] = 0.0  # padding, masked by Masking
    model = keras.Sequential(
        [keras.Input((5, 2)), keras.layers.Masking(0.0), bn_class()]
    )
    kerasbn.recalibrate(model, x, batch_size=4)
    mean, var = np_moments(x[:, :3], [2])
    np.testing.assert_allclose(moving(model.layers[1])[0], mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(moving(model.layers[1])[1], var.ravel(), rtol=1e-5)


def test_only_moving_statistics_change_and_trainable_flags_are_restored(rng):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5),
            kerasbn.BatchNorm(renorm=True, trainable=False),
            keras.layers.Dense(3, trainable=False),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(2),
        ]
    )
    model.layers[3].gamma.trainable = False  # one weight frozen on its own
    randomize(model, rng)
    before = {w.path: to_numpy(w) for w in model.weights}
    layer_flags = [layer.trainable for layer in model.layers]
    weight_flags = {w.path: w.trainable for w in model.weights}

    kerasbn.recalibrate(model, rng.normal(size=(40, 4)).astype("float32"))

    renorm_bn = model.layers[1]
    expected_changes = {
        w.path
        for layer in (renorm_bn, model.layers[3])
        for w in (layer.moving_mean, layer.moving_variance)
    } | {renorm_bn.moving_stddev.path}
    after = {w.path: to_numpy(w) for w in model.weights}
    assert {p for p in before if not np.array_equal(before[p], after[p])} == (
        expected_changes
    )
    np.testing.assert_allclose(
        after[renorm_bn.moving_stddev.path],
        np.sqrt(after[renorm_bn.moving_variance.path] + renorm_bn.epsilon),
        rtol=1e-6,
    )
    assert [layer.trainable for layer in model.layers] == layer_flags
    assert {w.path: w.trainable for w in model.weights} == weight_flags


def test_frozen_bn_is_recalibrated_with_batch_statistics_upstream(rng):
    model = keras.Sequential(
        [keras.Input((3,)), kerasbn.BatchNorm(trainable=False), kerasbn.BatchNorm()]
    )
    randomize(model, rng)
    x = rng.normal(4.0, 2.0, (48, 3)).astype("float32")
    kerasbn.recalibrate(model, x)
    first, second = model.layers
    mean, var = np_moments(x, [1])
    np.testing.assert_allclose(moving(first)[1], var.ravel(), rtol=1e-5)
    gamma, beta = to_numpy(first.gamma), to_numpy(first.beta)
    seen = [np_batch_norm(b, *np_moments(b, [1]), gamma, beta) for b in batches(x, 32)]
    mean2, var2 = np_moments(np.concatenate(seen), [1])
    np.testing.assert_allclose(moving(second)[0], mean2.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moving(second)[1], var2.ravel(), rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=1.5), TypeError, "steps"),
        (dict(batch_size=0), ValueError, "batch_size"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm()])
    with pytest.raises(error, match=match):
        kerasbn.recalibrate(model, np.ones((4, 3), "float32"), **kwargs)


def test_empty_data_is_an_error_and_leaves_the_model_as_it_was():
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm(trainable=False)])
    with pytest.raises(ValueError, match="no batch"):
        kerasbn.recalibrate(model, iter([]))
    assert not model.layers[0].trainable
    np.testing.assert_array_equal(to_numpy(model.layers[0].moving_variance), np.ones(3))


def test_subclassed_model_bn_in_attribute_and_list_gets_numpy_population_statistics(
    rng,
):
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = kerasbn.BatchNorm()
            self.blocks = [keras.layers.Dense(4), keras.layers.BatchNormalization()]

        def call(self, x):
            return self.blocks[1](self.blocks[0](self.bn(x)))

    model = Subclassed()
    model(np.ones((2, 3), "float32"))
    x = rng.normal(4.0, 3.0, (40, 3)).astype("float32")
    kerasbn.recalibrate(model, x, batch_size=8)
    np.testing.assert_allclose(to_numpy(model.bn.moving_mean), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(to_numpy(model.bn.moving_variance), x.var(0), rtol=1e-5)
    # The Dense sees each batch normalized with its own statistics, as in training.
    kernel, bias = (to_numpy(w).astype("f8") for w in model.blocks[0].weights)
    batches = x.astype("f8").reshape(5, 8, 3)
    normalized = (batches - batches.mean(1, keepdims=True)) / np.sqrt(
        batches.var(1, keepdims=True) + 1e-3
    )
    dense = (normalized.reshape(40, 3) @ kernel) + bias
    np.testing.assert_allclose(
        to_numpy(model.blocks[1].moving_mean), dense.mean(0), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        to_numpy(model.blocks[1].moving_variance), dense.var(0), rtol=1e-4
    )


@pytest.mark.parametrize("bn_class", BN_CLASSES)
def test_shared_bn_in_a_two_input_graph_with_op_nodes_pools_both_calls(rng, bn_class):
    # One BN called on `a + 3.0` and (by keyword) on `2 * b`, then a nested
    # functional model's Keras BN on the sum; a tf.data.Dataset of dicts.
    a_in, b_in = keras.Input((5,), name="a"), keras.Input((5,), name="b")
    shared = bn_class(name="shared_bn")
    h1 = shared(a_in + 3.0)
    h2 = shared(inputs=keras.ops.multiply(b_in, 2.0))
    inner_in = keras.Input((5,))
    inner_bn = keras.layers.BatchNormalization(epsilon=0.01, name="inner_bn")
    inner = keras.Model(inner_in, inner_bn(inner_in), name="inner")
    model = keras.Model({"a": a_in, "b": b_in}, [inner(h1 + h2), h1])
    randomize(model, rng)
    a = rng.normal(1.0, 2.0, (50, 5)).astype("float32")
    b = rng.normal(-2.0, 0.5, (50, 5)).astype("float32")
    import tensorflow as tf  # the data pipeline, on every backend

    data = tf.data.Dataset.from_tensor_slices(({"a": a, "b": b}, a)).batch(BATCH)

    kerasbn.recalibrate(model, data)

    gamma, beta = (np.asarray(w, np.float64) for w in (shared.gamma, shared.beta))
    u, v = batches(a.astype("f8") + 3.0), batches(2.0 * b.astype("f8"))
    sums = [
        np_batch_norm(ui, *np_moments(ui, [1]), gamma, beta)
        + np_batch_norm(vi, *np_moments(vi, [1]), gamma, beta)
        for ui, vi in zip(u, v)
    ]
    for layer, inputs_seen in ((shared, u + v), (inner_bn, sums)):
        mean, var = np_moments(np.concatenate(inputs_seen), [1])
        np.testing.assert_allclose(moving(layer)[0], mean.ravel(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(moving(layer)[1], var.ravel(), rtol=1e-5)


def test_population_statistics_are_pooled_in_float64_on_every_backend():
    # 1/8 steps around 1e4: each batch of two has exact float32 moments, and
    # only a float64 merge of the 500 batches (JAX without x64 included) gives
    # the correctly rounded population variance; a float32 merge was off by up
    # to 11 ulps here.
    rng = np.random.default_rng(7)
    x = (1e4 + rng.integers(-512, 512, (1000, 16)) / 8).astype("float32")
    model = keras.Sequential([keras.Input((16,)), kerasbn.BatchNorm()])
    kerasbn.recalibrate(model, x, batch_size=2)
    mean, var = np_moments(x, [1])
    np.testing.assert_array_max_ulp(
        moving(model.layers[0])[0], mean.ravel().astype("f4")
    )
    np.testing.assert_array_max_ulp(
        moving(model.layers[0])[1], var.ravel().astype("f4")
    )


def test_unbiased_layer_gets_the_unbiased_population_variance(rng):
    model = keras.Sequential(
        [keras.Input((3,)), kerasbn.BatchNorm(unbiased_moving_variance=True)]
    )
    x = rng.normal(5.0, 2.0, (50, 3)).astype("float32")
    kerasbn.recalibrate(model, x, batch_size=8)
    bn = model.layers[0]
    np.testing.assert_allclose(to_numpy(bn.moving_mean), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(bn.moving_variance), x.var(0, ddof=1), rtol=1e-5
    )


def layer_state(model) -> list:
    """Every layer's own attributes (by identity), flags and weights (by value)."""
    return [
        (
            layer.trainable,
            "call" in vars(layer),
            {k: id(v) for k, v in vars(layer).items()},
            [(w.path, w.trainable, to_numpy(w).tobytes()) for w in layer.weights],
        )
        for _, layer in kerasbn._graph.walk(model)
    ]


def test_an_exception_midway_leaves_every_layer_as_it_was(rng):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5),
            kerasbn.BatchNorm(renorm=True, trainable=False),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(2),
        ]
    )
    model.layers[2].gamma.trainable = False  # one weight frozen on its own
    randomize(model, rng)
    model(np.zeros((2, 4), "float32"))
    before = layer_state(model)
    x = rng.normal(3.0, 2.0, (16, 4)).astype("float32")

    def data():
        yield x  # these two batches move the moving statistics in the pass...
        yield x
        raise OSError("the data source broke")  # ...then the pass stops

    with pytest.raises(OSError, match="broke"):
        kerasbn.recalibrate(model, data())
    assert layer_state(model) == before


def test_tuple_of_arrays_and_dict_of_arrays_are_batched(rng):
    x = rng.normal(2.0, 3.0, (40, 3)).astype("float32")
    y = np.zeros((40, 1), "float32")
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm()])
    kerasbn.recalibrate(model, (x, y), batch_size=8)
    np.testing.assert_allclose(moving(model.layers[0])[1], x.var(0), rtol=1e-5)
    inputs = {"a": keras.Input((3,), name="a"), "b": keras.Input((3,), name="b")}
    bn = kerasbn.BatchNorm()
    two = keras.Model(inputs, bn(inputs["a"] - inputs["b"]))
    kerasbn.recalibrate(two, {"a": x, "b": 2.0 * x}, batch_size=8)
    np.testing.assert_allclose(to_numpy(bn.moving_mean), -x.mean(0), rtol=1e-5)
