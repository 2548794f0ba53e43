"""kerasbn.BatchNorm against keras.layers.BatchNormalization, NumPy and finite differences."""

import inspect

import keras
import numpy as np
import pytest
from conftest import (
    float64,
    np_batch_norm,
    np_moments,
    record,
    tensorflow_only,
    to_numpy,
    train_call,
)

import kerasbn

TOL = dict(rtol=1e-5, atol=1e-5)


def _pair(input_shape, **kwargs):
    """A kerasbn layer and a Keras layer built with the same arguments and weights."""
    ours, peer = kerasbn.BatchNorm(**kwargs), keras.layers.BatchNormalization(**kwargs)
    ours.build(input_shape)
    peer.build(input_shape)
    peer.set_weights(ours.get_weights())
    return ours, peer


# ------------------------------------------------------------------- names, args
def test_exported_names_and_registration():
    # BatchNormalization is BatchNorm under Keras's class name (Keras's saving
    # files layers held in containers under their class name).
    assert issubclass(kerasbn.BatchNormalization, kerasbn.BatchNorm)
    assert kerasbn.BatchNormalization.__name__ == "BatchNormalization"
    for cls in (kerasbn.BatchNorm, kerasbn.BatchNormalization):
        name = f"kerasbn>{cls.__name__}"
        assert keras.saving.get_registered_name(cls) == name
        assert keras.saving.get_registered_object(name) is cls


def test_constructor_has_keras_arguments_and_defaults():
    keras_params = inspect.signature(
        keras.layers.BatchNormalization.__init__
    ).parameters
    our_params = inspect.signature(kerasbn.BatchNorm.__init__).parameters
    for name, param in keras_params.items():
        assert name in our_params, name
        assert our_params[name].default == param.default, name


def test_default_config_equals_keras_config():
    ours = kerasbn.BatchNorm(name="bn").get_config()
    peer = keras.layers.BatchNormalization(name="bn").get_config()
    for key, value in peer.items():
        assert ours[key] == value, key


@pytest.mark.parametrize("renorm", [False, True])
def test_weights_match_keras_names_shapes_order_and_trainability(renorm):
    ours, peer = _pair((None, 5, 7), renorm=renorm)
    assert [w.name for w in ours.weights] == [w.name for w in peer.weights]
    assert [tuple(w.shape) for w in ours.weights] == [
        tuple(w.shape) for w in peer.weights
    ]
    assert [w.trainable for w in ours.weights] == [w.trainable for w in peer.weights]
    assert all(w.dtype == "float32" for w in ours.weights)


def test_lecture_cnn_summary_counts():
    model = keras.Sequential([keras.Input((28, 28, 1))])
    for layer in [
        keras.layers.Conv2D(10, (5, 5)),
        kerasbn.BatchNorm(),
        keras.layers.Activation("relu"),
        keras.layers.MaxPooling2D((2, 2)),
        keras.layers.Conv2D(20, (5, 5)),
        kerasbn.BatchNorm(),
        keras.layers.Activation("relu"),
        keras.layers.MaxPooling2D((2, 2)),
        keras.layers.Flatten(),
        keras.layers.Dense(100),
        kerasbn.BatchNorm(),
        keras.layers.Activation("relu"),
        keras.layers.Dense(10, activation="softmax"),
    ]:
        model.add(layer)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    assert (model.count_params(), trainable, frozen) == (38_910, 38_650, 260)
    bn_params = [
        layer.count_params()
        for layer in model.layers
        if isinstance(layer, kerasbn.BatchNorm)
    ]
    assert bn_params == [4 * 10, 4 * 20, 4 * 100]


# ------------------------------------------------------------------ parity matrix
PARITY_CASES = [
    dict(shape=(16, 6)),
    dict(shape=(8, 5, 5, 3)),
    dict(shape=(8, 3, 5, 5), axis=1),
    dict(shape=(4, 3, 4, 5, 2), axis=-1, momentum=0.5),
    dict(shape=(4, 3, 4, 5, 2), axis=2, epsilon=1e-1),
    dict(shape=(6, 9, 4), axis=1, momentum=0.0),
    dict(shape=(6, 9, 4), momentum=1.0),
    dict(shape=(8, 5, 5, 3), center=False),
    dict(shape=(8, 5, 5, 3), scale=False),
    dict(shape=(8, 5, 5, 3), center=False, scale=False),
    dict(
        shape=(16, 6),
        gamma_initializer="random_normal",
        beta_initializer="random_uniform",
        moving_mean_initializer="random_normal",
        moving_variance_initializer="ones",
    ),
    dict(
        shape=(16, 6),
        gamma_regularizer="l2",
        beta_regularizer="l1",
        gamma_constraint="non_neg",
        beta_constraint="max_norm",
    ),
    dict(shape=(8, 5, 5, 3), renorm=True),
    dict(shape=(8, 5, 5, 3), renorm=True, renorm_momentum=0.5, momentum=0.8),
    dict(
        shape=(16, 6),
        renorm=True,
        renorm_clipping={"rmax": 1.1, "rmin": 0.9, "dmax": 0.1},
    ),
    dict(shape=(16, 6), renorm=True, center=False, scale=False),
    pytest.param(
        dict(shape=(16, 6), synchronized=True),
        marks=tensorflow_only(
            "keras.layers.BatchNormalization, the peer, accepts synchronized=True"
            " only on the TensorFlow backend"
        ),
    ),
]


@pytest.mark.parametrize(
    "case", PARITY_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_matches_keras_outputs_gradients_and_moving_statistics(rng, case):
    case = dict(case)
    shape = case.pop("shape")
    ours, peer = _pair(shape, **case)
    for step in range(4):
        x = rng.normal(step - 1.0, 1.0 + step, shape).astype("float32")
        upstream = rng.normal(size=shape).astype("float32")
        y, grads = train_call(ours, x, upstream)
        y_ref, grads_ref = train_call(peer, x, upstream)
        np.testing.assert_allclose(y, y_ref, **TOL)
        record("training output", y, y_ref)
        for g, g_ref in zip(grads, grads_ref):
            np.testing.assert_allclose(g, g_ref, **TOL)
            record("gradients (x, gamma, beta)", g, g_ref)
        for w, w_ref in zip(ours.get_weights(), peer.get_weights()):
            np.testing.assert_allclose(w, w_ref, **TOL)
            record("moving statistics and weights", w, w_ref)
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(to_numpy(ours(x)), to_numpy(peer(x)), **TOL)
    record("inference output", ours(x), peer(x))
    assert ours.losses == [] or np.allclose(
        to_numpy(sum(ours.losses)), to_numpy(sum(peer.losses)), **TOL
    )


@pytest.mark.parametrize("direction", ["keras_to_kerasbn", "kerasbn_to_keras"])
def test_set_weights_from_the_other_layer_gives_same_outputs(rng, direction):
    shape = (8, 4, 4, 3)
    ours, peer = _pair(shape, gamma_initializer="random_normal")
    source, target = (peer, ours) if direction == "keras_to_kerasbn" else (ours, peer)
    for _ in range(3):
        source(rng.normal(2.0, 3.0, shape).astype("float32"), training=True)
    target.set_weights(source.get_weights())
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(to_numpy(ours(x)), to_numpy(peer(x)), **TOL)
    np.testing.assert_allclose(
        to_numpy(ours(x, training=True)), to_numpy(peer(x, training=True)), **TOL
    )


def test_training_output_and_moving_statistics_match_numpy(rng):
    layer = kerasbn.BatchNorm(axis=[1, 3], momentum=0.8, epsilon=1e-2)
    shape = (6, 3, 5, 2)
    layer.build(shape)
    assert tuple(layer.moving_mean.shape) == (3, 2)
    moving_mean, moving_var = np.zeros((1, 3, 1, 2)), np.ones((1, 3, 1, 2))
    for step in range(3):
        x = rng.normal(step, 2.0, shape).astype("float32")
        mean, var = np_moments(x, [1, 3])
        y = to_numpy(layer(x, training=True))
        np.testing.assert_allclose(y, np_batch_norm(x, mean, var, epsilon=1e-2), **TOL)
        moving_mean = 0.8 * moving_mean + 0.2 * mean
        moving_var = 0.8 * moving_var + 0.2 * var
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), moving_mean.reshape(3, 2), **TOL
    )
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), moving_var.reshape(3, 2), **TOL
    )
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(
        to_numpy(layer(x)),
        np_batch_norm(x, moving_mean, moving_var, epsilon=1e-2),
        **TOL,
    )


@pytest.mark.parametrize("axis", [-1, 1, [1, 2]])
def test_gradients_match_central_finite_differences(rng, axis):
    with float64():
        _check_gradients_against_finite_differences(rng, axis)


def _check_gradients_against_finite_differences(rng, axis):
    shape = (5, 3, 2)
    layer = kerasbn.BatchNorm(
        axis=axis,
        dtype="float64",
        gamma_initializer="random_normal",
        beta_initializer="random_normal",
    )
    layer.build(shape)
    x = rng.normal(size=shape)
    upstream = rng.normal(size=shape)
    params = [x] + [to_numpy(w) for w in layer.trainable_weights]

    def loss(values):
        for w, v in zip(layer.trainable_weights, values[1:]):
            w.assign(v)
        return float(np.sum(to_numpy(layer(values[0], training=True)) * upstream))

    _, analytic = train_call(layer, x, upstream)
    h = 1e-6
    for i, p in enumerate(params):
        numeric = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            plus = [q.copy() for q in params]
            minus = [q.copy() for q in params]
            plus[i][idx] += h
            minus[i][idx] -= h
            numeric[idx] = (loss(plus) - loss(minus)) / (2 * h)
        np.testing.assert_allclose(analytic[i], numeric, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- training flag
def _small_model(kind, **bn_kwargs):
    if kind == "sequential":
        model = keras.Sequential([keras.Input((4,))])
        model.add(keras.layers.Dense(3, kernel_initializer="ones"))
        model.add(kerasbn.BatchNorm(**bn_kwargs))
        return model
    if kind == "functional":
        inputs = keras.Input((4,))
        outputs = kerasbn.BatchNorm(**bn_kwargs)(keras.layers.Dense(3)(inputs))
        return keras.Model(inputs, outputs)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)
            self.bn = kerasbn.BatchNorm(**bn_kwargs)

        def call(self, x, training=None):
            return self.bn(self.dense(x), training=training)

    model = Subclassed()
    model(np.zeros((2, 4), "float32"))
    return model


def _bn(model):
    return next(
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, kerasbn.BatchNorm)
    )


def _dense(model):
    return next(
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.Dense)
    )


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_fit_updates_moving_statistics_and_predict_uses_them(rng, kind):
    model = _small_model(kind, momentum=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = rng.normal(3.0, 2.0, (64, 4)).astype("float32")
    model.fit(x, np.zeros((64, 3)), batch_size=16, epochs=1, shuffle=False, verbose=0)
    bn = _bn(model)
    h = to_numpy(_dense(model)(x))  # SGD(0): the dense layer did not change
    moving_mean, moving_var = np.zeros(3), np.ones(3)
    for batch in np.split(h, 4):
        mean, var = batch.mean(0), batch.var(0)
        moving_mean, moving_var = (
            0.5 * moving_mean + 0.5 * mean,
            0.5 * moving_var + 0.5 * var,
        )
    np.testing.assert_allclose(to_numpy(bn.moving_mean), moving_mean, **TOL)
    np.testing.assert_allclose(to_numpy(bn.moving_variance), moving_var, **TOL)
    before = [w.copy() for w in bn.get_weights()]
    predicted = model.predict(x, verbose=0)
    model.evaluate(x, np.zeros((64, 3)), verbose=0)
    for w, w_before in zip(bn.get_weights(), before):
        np.testing.assert_array_equal(w, w_before)
    np.testing.assert_allclose(
        predicted, np_batch_norm(h, moving_mean, moving_var), **TOL
    )


def test_trainable_false_forces_inference_mode_and_freezes_statistics(rng):
    model = _small_model("sequential", momentum=0.5)
    bn = _bn(model)
    bn.trainable = False
    model.compile(optimizer="sgd", loss="mse")
    before = [w.copy() for w in bn.get_weights()]
    x = rng.normal(3.0, 2.0, (32, 4)).astype("float32")
    model.fit(x, np.zeros((32, 3)), batch_size=8, verbose=0)
    for w, w_before in zip(bn.get_weights(), before):
        np.testing.assert_array_equal(w, w_before)
    h = rng.normal(size=(8, 3)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(bn(h, training=True)), np_batch_norm(h, 0.0, 1.0), **TOL
    )


def test_training_false_and_none_use_moving_statistics(rng):
    layer = kerasbn.BatchNorm(moving_mean_initializer="random_normal")
    x = rng.normal(size=(8, 3)).astype("float32")
    layer.build(x.shape)
    ref = np_batch_norm(x, to_numpy(layer.moving_mean), to_numpy(layer.moving_variance))
    np.testing.assert_allclose(to_numpy(layer(x, training=False)), ref, **TOL)
    np.testing.assert_allclose(to_numpy(layer(x)), ref, **TOL)


def test_custom_training_loop_updates_statistics(rng):
    # The backend's own gradient machinery (tape, autograd, stateless_call).
    model = _small_model("functional", momentum=0.0)
    x = rng.normal(1.0, 2.0, (16, 4)).astype("float32")
    optimizer = keras.optimizers.SGD(0.1)
    h = to_numpy(_dense(model)(x))
    upstream = rng.normal(size=(16, 3)).astype("float32")
    _, grads = train_call(model, x, upstream)
    grads = [keras.ops.convert_to_tensor(g) for g in grads[1:]]
    optimizer.apply_gradients(zip(grads, model.trainable_weights))
    np.testing.assert_allclose(to_numpy(_bn(model).moving_mean), h.mean(0), **TOL)
    np.testing.assert_allclose(to_numpy(_bn(model).moving_variance), h.var(0), **TOL)


def test_stateless_call_returns_updated_statistics_and_leaves_the_layer():
    x = np.random.default_rng(0).normal(2.0, 3.0, (16, 3)).astype("float32")
    layer = kerasbn.BatchNorm(momentum=0.25)
    layer.build(x.shape)
    trainable = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]
    x_tensor = keras.ops.convert_to_tensor(x)
    y, new = layer.stateless_call(trainable, frozen, x_tensor, training=True)
    np.testing.assert_allclose(to_numpy(new[0]), 0.75 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(to_numpy(new[1]), 0.25 + 0.75 * x.var(0), rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(y), np_batch_norm(x, x.mean(0), x.var(0)), **TOL
    )
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), 0.0)
    np.testing.assert_array_equal(to_numpy(layer.moving_variance), 1.0)


def test_predict_of_one_sample_equals_batch_predict(rng):
    model = _small_model("sequential")
    model.compile(optimizer="sgd", loss="mse")
    x = rng.normal(2.0, 1.0, (40, 4)).astype("float32")
    model.fit(x, np.zeros((40, 3)), batch_size=8, verbose=0)
    batch = model.predict(x, verbose=0)
    for i in (0, 17, 39):
        np.testing.assert_allclose(
            model.predict(x[i : i + 1], verbose=0)[0], batch[i], rtol=1e-6, atol=1e-6
        )


# ----------------------------------------------------------------------- masking
# (input shape, axis): ranks 2 to 5, first, middle, last and list axes. The
# mask follows Keras's rule: the input's shape without its last axis.
MASK_CASES = [
    ((12, 3), -1),
    ((12, 3), 0),
    ((6, 7, 3), -1),
    ((6, 3, 7), 1),
    ((6, 7, 3), 0),
    ((4, 5, 6, 3), -1),
    ((4, 3, 5, 6), 1),
    ((4, 5, 6, 3), 2),
    ((3, 4, 5, 6, 2), -1),
    ((3, 2, 4, 5, 6), 1),
    ((3, 4, 2, 5, 6), 2),
    ((4, 5, 6, 3), [1, 2]),
    ((3, 4, 5, 6, 2), [-2, -1]),
]


def _channels(shape, axis):
    axes = axis if isinstance(axis, list) else [axis]
    return sorted(a % len(shape) for a in axes)


def _masked_reference(x, axis, mask):
    """NumPy statistics under Keras's mask rule, and which channels saw a value."""
    channels = _channels(x.shape, axis)
    full = np.broadcast_to(mask[..., None] if mask.ndim < x.ndim else mask, x.shape)
    with np.errstate(invalid="ignore"):  # channels that saw no value
        mean, var = np_moments(np.where(full, x, 0.0), channels, full)
    reduced = tuple(a for a in range(x.ndim) if a not in channels)
    seen = full.any(axis=reduced, keepdims=True)
    return mean, var, seen, full


@pytest.mark.parametrize("shape, axis", MASK_CASES)
@pytest.mark.parametrize("fill", [1e6, np.nan])
def test_masked_positions_do_not_count_towards_statistics(rng, shape, axis, fill):
    layer = kerasbn.BatchNorm(axis=axis, momentum=0.0)
    mask = rng.random(shape[:-1]) > 0.3
    x = rng.normal(2.0, 3.0, shape)
    mean, var, seen, full = _masked_reference(x, axis, mask)
    x = np.where(full, x, fill).astype("float32")
    y = to_numpy(layer(x, training=True, mask=mask))
    expected = np_batch_norm(x, mean, var)
    counted = full & seen
    np.testing.assert_allclose(y[counted], expected[counted], rtol=1e-5, atol=1e-4)
    # A channel that saw no value keeps its moving statistics (here 0 and 1).
    np.testing.assert_allclose(
        layer.moving_mean, np.where(seen, mean, 0.0).squeeze(), **TOL
    )
    np.testing.assert_allclose(
        layer.moving_variance, np.where(seen, var, 1.0).squeeze(), **TOL
    )


@pytest.mark.parametrize(
    "shape, axis", [c for c in MASK_CASES if not isinstance(c[1], list)]
)
def test_masked_training_matches_keras(rng, shape, axis):
    ours, peer = _pair(shape, axis=axis, momentum=0.5)
    always_seen = True
    for _ in range(2):
        x = rng.normal(1.0, 2.0, shape).astype("float32")
        mask = rng.random(shape[:-1]) > 0.3
        always_seen = always_seen & _masked_reference(x, axis, mask)[2].squeeze()
        y_ours = to_numpy(ours(x, training=True, mask=mask))
        y_peer = to_numpy(peer(x, training=True, mask=mask))
        np.testing.assert_allclose(y_ours, y_peer, rtol=1e-5, atol=1e-5)
        record("masked training output", y_ours, y_peer)
    # Keras moves a channel that saw no value towards mean 0 and variance 0;
    # kerasbn keeps its statistics (see the README): compare the others.
    for w, w_ref in zip(ours.get_weights(), peer.get_weights()):
        np.testing.assert_allclose(w[always_seen], w_ref[always_seen], **TOL)
        record("masked moving statistics", w[always_seen], w_ref[always_seen])


def test_broadcastable_mask_is_accepted_as_keras_does(rng):
    ours, peer = _pair((1, 2, 3, 4), momentum=0.0)
    x = rng.normal(size=(1, 2, 3, 4)).astype("float32")
    mask = np.array([True, False]).reshape(1, 2, 1)
    np.testing.assert_allclose(
        to_numpy(ours(x, training=True, mask=mask)),
        to_numpy(peer(x, training=True, mask=mask)),
        rtol=1e-5,
        atol=1e-5,
    )
    mean, var = np_moments(x[:, :1], [3])
    np.testing.assert_allclose(ours.moving_mean, mean.ravel(), **TOL)
    np.testing.assert_allclose(ours.moving_variance, var.ravel(), **TOL)


@pytest.mark.parametrize("mask_shape", [(6, 7, 3), (6, 7, 1), (1, 7, 3)])
def test_full_rank_broadcastable_mask_is_accepted(rng, mask_shape):
    layer = kerasbn.BatchNorm(momentum=0.0)
    x = rng.normal(2.0, 3.0, (6, 7, 3)).astype("float32")
    mask = rng.random(mask_shape) > 0.3
    mean, var = np_moments(x, [2], np.broadcast_to(mask, x.shape))
    layer(x, training=True, mask=mask)
    np.testing.assert_allclose(layer.moving_mean, mean.ravel(), **TOL)
    np.testing.assert_allclose(layer.moving_variance, var.ravel(), **TOL)


def _fit_masked(bn_class, x, y, **bn_kwargs):
    """A Masking -> BN -> pooling -> Dense model after three SGD steps."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input(x.shape[1:])
    h = keras.layers.Masking(0.0)(inputs)
    h = bn_class(**bn_kwargs)(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("axis", [1, -1])
def test_masking_then_batchnorm_trains_with_fit_as_keras(rng, axis):
    x = rng.normal(1.0, 2.0, (12, 6, 3)).astype("float32")
    x[:, 4:] = 0.0  # the last two steps are masked in every sample
    x[::3, 3] = 0.0
    y = rng.normal(size=(12, 1)).astype("float32")
    ours = _fit_masked(kerasbn.BatchNorm, x, y, axis=axis, momentum=0.5)
    peer = _fit_masked(keras.layers.BatchNormalization, x, y, axis=axis, momentum=0.5)
    bn = _bn(ours)
    if axis == 1:  # steps 4 and 5 never saw a value: kerasbn keeps 0 and 1
        np.testing.assert_array_equal(bn.moving_mean.numpy()[4:], 0.0)
        np.testing.assert_array_equal(bn.moving_variance.numpy()[4:], 1.0)
    for w, w_ref in zip(ours.get_weights(), peer.get_weights()):
        if w.shape == (6,):  # per-step statistics: compare the steps seen
            w, w_ref = w[:4], w_ref[:4]
        np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-5)
        record("masked fit weights", w, w_ref)
    np.testing.assert_allclose(
        ours.predict(x, verbose=0), peer.predict(x, verbose=0), rtol=1e-4, atol=1e-4
    )


def test_embedding_mask_zero_then_batchnorm_matches_keras(rng):
    tokens = rng.integers(1, 20, (8, 5))
    tokens[:, 3:] = 0  # padding

    def build(bn_class):
        keras.utils.set_random_seed(5)
        inputs = keras.Input((5,), dtype="int32")
        h = keras.layers.Embedding(20, 4, mask_zero=True)(inputs)
        h = bn_class(momentum=0.0)(h)
        return keras.Model(inputs, h)

    ours, peer = build(kerasbn.BatchNorm), build(keras.layers.BatchNormalization)
    y = to_numpy(ours(tokens, training=True))
    np.testing.assert_allclose(y, to_numpy(peer(tokens, training=True)), **TOL)
    embedded = ours.layers[1].embeddings.numpy()[tokens[:, :3]]
    mean, var = np_moments(embedded.reshape(-1, 4), [1])
    np.testing.assert_allclose(_bn(ours).moving_mean, mean.ravel(), **TOL)
    np.testing.assert_allclose(_bn(ours).moving_variance, var.ravel(), **TOL)


def test_fully_masked_batch_keeps_moving_statistics_and_is_finite(rng):
    layer = kerasbn.BatchNorm(momentum=0.5)
    x = rng.normal(size=(4, 5, 3)).astype("float32")
    layer(x, training=True)
    before = [w.copy() for w in layer.get_weights()]
    y = layer(x, training=True, mask=np.zeros((4, 5), bool))
    assert np.all(np.isfinite(to_numpy(y)))
    for w, w_before in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(w, w_before)


@pytest.mark.parametrize(
    "mask_shape, pattern",
    [
        ((4,), r"The mask provided should be one dimension less than the inputs"),
        ((4, 3, 5, 1), r"should be one dimension less.*\(4, 3, 5, 1\).*\(4, 3, 5\)"),
        ((4, 5), r"mask.*\(4, 5\).*does not broadcast.*\(4, 3, 5\).*rank minus one"),
        ((4, 2, 5), r"mask.*\(4, 2, 5\).*does not broadcast.*\(4, 3, 5\)"),
    ],
)
def test_mask_that_breaks_keras_rule_is_rejected(rng, mask_shape, pattern):
    layer = kerasbn.BatchNorm(axis=1)
    x = rng.normal(size=(4, 3, 5)).astype("float32")
    with pytest.raises(ValueError, match=pattern):
        layer(x, training=True, mask=np.ones(mask_shape, bool))


# -------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_statistics_float32_output_in_compute_dtype(rng, policy):
    layer = kerasbn.BatchNorm(dtype=policy, momentum=0.0)
    x = rng.normal(3.0, 2.0, (32, 4)).astype("float32")
    y = layer(x, training=True)
    assert layer.compute_dtype == policy.split("_")[1]
    assert keras.backend.standardize_dtype(y.dtype) == layer.compute_dtype
    assert all(w.dtype == "float32" for w in layer.weights)
    x_low = to_numpy(keras.ops.cast(keras.ops.cast(x, layer.compute_dtype), "float32"))
    mean, var = np_moments(x_low, [1])
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), mean.ravel(), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(to_numpy(layer.moving_variance), var.ravel(), rtol=1e-5)
    atol = 1e-2 if policy == "mixed_float16" else 5e-2
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(y, "float32")),
        np_batch_norm(x_low, mean, var),
        atol=atol,
    )


def test_float16_inputs_near_the_float16_limit_stay_finite(rng):
    layer = kerasbn.BatchNorm(dtype="mixed_float16", momentum=0.0)
    x = rng.uniform(6e4, 6.5e4, (64, 3)).astype("float16")
    y = layer(x, training=True)
    assert np.all(np.isfinite(to_numpy(y)))
    mean, var = np_moments(x.astype("float32"), [1])
    np.testing.assert_allclose(to_numpy(layer.moving_mean), mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.moving_variance), var.ravel(), rtol=1e-4)
    assert np.all(np.isfinite(to_numpy(layer(x))))


# ------------------------------------------------------------- non-finite input
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_batch_leaves_moving_statistics_unchanged(rng, bad):
    layer = kerasbn.BatchNorm(momentum=0.5)
    layer(rng.normal(size=(8, 3)).astype("float32"), training=True)
    before = [w.copy() for w in layer.get_weights()]
    x = rng.normal(size=(8, 3)).astype("float32")
    x[2, 1] = bad
    layer(x, training=True)
    for w, w_before in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(w, w_before)
    x = rng.normal(size=(8, 3)).astype("float32")
    layer(x, training=True)
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean), 0.5 * before[2] + 0.5 * x.mean(0), **TOL
    )


def test_non_finite_batch_inside_fit_does_not_poison_statistics(rng):
    model = _small_model("sequential")
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = rng.normal(size=(32, 4)).astype("float32")
    x[8] = np.nan
    model.fit(x, np.zeros((32, 3)), batch_size=8, shuffle=False, verbose=0)
    bn = _bn(model)
    assert np.all(np.isfinite(to_numpy(bn.moving_mean)))
    assert np.all(np.isfinite(to_numpy(bn.moving_variance)))


# -------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(momentum=1.5), ValueError, r"momentum.*\[0, 1\].*1\.5"),
        (dict(momentum=-0.1), ValueError, r"momentum.*-0\.1"),
        (dict(momentum="high"), TypeError, r"momentum.*'high'"),
        (dict(renorm_momentum=2.0), ValueError, r"renorm_momentum.*2\.0"),
        (dict(epsilon=0.0), ValueError, r"epsilon.*> 0.*0\.0"),
        (dict(epsilon=-1e-3), ValueError, r"epsilon.*-0\.001"),
        (dict(axis=[1, 1]), ValueError, r"axis.*\[1, 1\]"),
        (dict(axis="channels"), TypeError, r"axis.*'channels'"),
        (
            dict(renorm=True, renorm_clipping={"rmaxx": 3}),
            ValueError,
            r"Received invalid keys for `renorm_clipping` argument.*rmaxx",
        ),
        (
            dict(renorm=True, renorm_clipping={"rmax": 1, "rmin": 2}),
            ValueError,
            r"rmax should be greater than rmin.*rmax >= rmin.*rmax=1, rmin=2",
        ),
        (
            dict(renorm=True, renorm_clipping={"dmax": -1}),
            ValueError,
            r"dmax should be non-negative.*dmax >= 0.*dmax=-1",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        kerasbn.BatchNorm(**kwargs)


@pytest.mark.parametrize(
    "axis, shape, pattern",
    [
        (4, (2, 3, 4, 5), r"Axis 4 is out of bounds for input shape.*rank 4"),
        (-5, (2, 3, 4, 5), r"Axis -5 is out of bounds.*-4\.\.3"),
        ([-1, 3], (2, 3, 4, 5), r"same axis twice.*\[-1, 3\]"),
        (-1, (2, None), r"axis 1.*\(2, None\).*unknown.*must be fully-defined"),
    ],
)
def test_bad_axis_or_unknown_channel_size_fails_at_build(axis, shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        kerasbn.BatchNorm(axis=axis).build(shape)


def test_input_of_another_rank_than_built_is_rejected(rng):
    layer = kerasbn.BatchNorm()
    layer(rng.normal(size=(4, 3)).astype("float32"))
    with pytest.raises(ValueError, match=r"expected ndim=2, found ndim=3"):
        layer(rng.normal(size=(4, 5, 3)).astype("float32"))


def test_one_value_per_channel_in_training_is_rejected_where_shape_is_known(rng):
    layer = kerasbn.BatchNorm()
    with pytest.raises(ValueError, match=r"more than one value per channel.*\(1, 3\)"):
        layer(rng.normal(size=(1, 3)).astype("float32"), training=True)
    y = layer(rng.normal(size=(1, 3)).astype("float32"))
    assert np.all(np.isfinite(to_numpy(y)))


@tensorflow_only("only tf.function traces a call with an unknown batch size")
def test_one_value_per_channel_with_unknown_shape_gives_finite_output(rng):
    import tensorflow as tf

    layer = kerasbn.BatchNorm()
    layer.build((None, 3))
    call = tf.function(
        lambda x: layer(x, training=True),
        input_signature=[tf.TensorSpec((None, 3), tf.float32)],
    )
    y = call(rng.normal(size=(1, 3)).astype("float32"))
    assert np.all(np.isfinite(y.numpy()))
    np.testing.assert_allclose(y, 0.0)


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        (
            dict(renorm_clipping={"rmaxx": 3}),
            "Received invalid keys for `renorm_clipping`",
        ),
        (
            dict(renorm_clipping={"rmax": 1, "rmin": 2}),
            "rmax should be greater than rmin",
        ),
        (dict(renorm_clipping={"dmax": -1}), "dmax should be non-negative"),
    ],
)
def test_bad_arguments_carry_keras_own_phrase(kwargs, phrase):
    for layer_class in (keras.layers.BatchNormalization, kerasbn.BatchNorm):
        with pytest.raises(ValueError, match=phrase):
            layer_class(renorm=True, **kwargs)


def test_mask_of_wrong_rank_carries_keras_own_phrase(rng):
    x = rng.normal(size=(4, 3, 5)).astype("float32")
    phrase = "The mask provided should be one dimension less than the inputs"
    for layer_class in (keras.layers.BatchNormalization, kerasbn.BatchNorm):
        with pytest.raises(ValueError, match=phrase):
            layer_class()(x, training=True, mask=np.ones((4,), bool))


# ------------------------------------------------- unbiased moving variance
def _np_unbiased(var, n):
    return var * n / (n - 1)


@pytest.mark.parametrize(
    "shape, kwargs, channel_axes, n",
    [
        ((8, 5, 3), dict(), [2], 40),
        ((6, 3, 4, 4), dict(axis=1, momentum=0.25), [1], 96),
        ((4, 6, 5), dict(axis=[1, 2]), [1, 2], 4),
        ((16, 24, 24, 32), dict(momentum=0.9), [3], 16 * 24 * 24),  # fast paths
        ((16, 32, 24, 24), dict(axis=1), [1], 16 * 24 * 24),
        ((12, 5), dict(renorm=True, momentum=0.5), [1], 12),
    ],
)
def test_unbiased_moving_variance_moves_towards_bessel_corrected_variance(
    rng, shape, kwargs, channel_axes, n
):
    kwargs = {"momentum": 0.5, **kwargs}
    layer = kerasbn.BatchNorm(unbiased_moving_variance=True, **kwargs)
    layer.build(shape)
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    y, _ = train_call(layer, x, np.ones(shape, "float32"))
    mean, var = np_moments(x, channel_axes)
    if not kwargs.get("renorm"):  # (renorm's output has its r, d corrections)
        np.testing.assert_allclose(y, np_batch_norm(x, mean, var), **TOL)  # biased
    m = kwargs["momentum"]
    expected_var = m * 1.0 + (1 - m) * _np_unbiased(var, n)
    if kwargs.get("renorm"):  # moving_stddev moves, the variance follows it
        stddev = m * 1.0 + (1 - m) * np.sqrt(_np_unbiased(var, n) + 1e-3)
        expected_var = stddev**2 - 1e-3
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance),
        expected_var.reshape(layer.moving_variance.shape),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        to_numpy(layer.moving_mean),
        ((1 - m) * mean).reshape(layer.moving_mean.shape),
        rtol=1e-5,
        atol=1e-6,
    )
    record(
        "unbiased moving variance vs NumPy",
        layer.moving_variance,
        expected_var.reshape(layer.moving_variance.shape),
    )


def test_unbiased_moving_variance_counts_unmasked_values_and_ghost_groups(rng):
    x = rng.normal(1.0, 2.0, (6, 5, 3)).astype("float32")
    mask = rng.random((6, 5)) > 0.4
    mask[:, 0] = True
    layer = kerasbn.BatchNorm(unbiased_moving_variance=True, momentum=0.0)
    layer(x, training=True, mask=mask)
    values = x[mask]  # (count, 3)
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), values.var(0, ddof=1), rtol=1e-5
    )
    ghost = kerasbn.BatchNorm(
        unbiased_moving_variance=True, momentum=0.0, virtual_batch_size=3
    )
    ghost(x, training=True)
    groups = [x[g::2].reshape(-1, 3) for g in range(2)]  # tf.keras's strided groups
    expected = np.mean([g.var(0, ddof=1) for g in groups], axis=0)
    np.testing.assert_allclose(to_numpy(ghost.moving_variance), expected, rtol=1e-5)


def test_unbiased_channel_with_one_unmasked_value_keeps_its_statistics(rng):
    x = rng.normal(size=(4, 3, 2)).astype("float32")
    mask = np.zeros((4, 3), bool)
    mask[0, 0] = True  # one value per channel: no unbiased variance
    layer = kerasbn.BatchNorm(unbiased_moving_variance=True, momentum=0.0)
    y = layer(x, training=True, mask=mask)
    assert np.all(np.isfinite(to_numpy(y)))
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), [0.0, 0.0])
    np.testing.assert_array_equal(to_numpy(layer.moving_variance), [1.0, 1.0])


# ----------------------------------------------------------- statistics modes
def test_statistics_moving_normalizes_with_moving_statistics_and_never_updates(rng):
    layer = kerasbn.BatchNorm(
        statistics="moving",
        moving_mean_initializer="random_normal",
        gamma_initializer="random_normal",
    )
    x = rng.normal(3.0, 2.0, (16, 3)).astype("float32")
    layer.build(x.shape)
    before = [w.copy() for w in layer.get_weights()]
    gamma, beta, mean, var = before
    upstream = rng.normal(size=x.shape).astype("float32")
    y, (grad_x, grad_gamma, grad_beta) = train_call(layer, x, upstream)
    x_hat = (x - mean) / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(y, gamma * x_hat + beta, **TOL)
    np.testing.assert_allclose(grad_x, upstream * gamma / np.sqrt(var + 1e-3), **TOL)
    np.testing.assert_allclose(grad_gamma, (upstream * x_hat).sum(0), **TOL)
    np.testing.assert_allclose(grad_beta, upstream.sum(0), **TOL)
    for w, w_before in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(w, w_before)


def test_statistics_batch_uses_batch_statistics_in_inference_too(rng):
    layer = kerasbn.BatchNorm(statistics="batch", momentum=0.5)
    x = rng.normal(3.0, 2.0, (16, 3)).astype("float32")
    mean, var = np_moments(x, [1])
    np.testing.assert_allclose(to_numpy(layer(x)), np_batch_norm(x, mean, var), **TOL)
    np.testing.assert_allclose(
        to_numpy(layer(x, training=False)), np_batch_norm(x, mean, var), **TOL
    )
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), np.zeros(3))
    np.testing.assert_array_equal(to_numpy(layer.moving_variance), np.ones(3))
    layer(x, training=True)  # training still moves the moving statistics
    np.testing.assert_allclose(to_numpy(layer.moving_mean), 0.5 * mean.ravel(), **TOL)
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), 0.5 + 0.5 * var.ravel(), **TOL
    )


def test_statistics_and_unbiased_flag_are_serialized():
    layer = kerasbn.BatchNorm(statistics="batch", unbiased_moving_variance=True)
    config = layer.get_config()
    assert config["statistics"] == "batch"
    assert config["unbiased_moving_variance"] is True
    again = kerasbn.BatchNorm.from_config(config)
    assert (again.statistics, again.unbiased_moving_variance) == ("batch", True)
    default = kerasbn.BatchNorm().get_config()
    assert (default["statistics"], default["unbiased_moving_variance"]) == (
        "auto",
        False,
    )


@pytest.mark.parametrize("value", ["frozen", None, 1])
def test_bad_statistics_mode_is_rejected_naming_the_allowed_modes(value):
    with pytest.raises(
        ValueError,
        match=r"`statistics` must be one of \['auto', 'moving', 'batch'\]; got "
        rf"statistics={value!r}",
    ):
        kerasbn.BatchNorm(statistics=value)


FIT_MODES = [
    # (statistics, trainable): moving statistics kept?, gamma/beta trained?
    ("auto", True),
    ("auto", False),
    ("moving", True),
    ("moving", False),
    ("batch", True),
]


@pytest.mark.parametrize("statistics, trainable", FIT_MODES)
def test_fine_tuning_modes_under_fit(rng, statistics, trainable):
    model = keras.Sequential([keras.Input((4,))])
    model.add(keras.layers.Dense(3))
    bn = kerasbn.BatchNorm(
        momentum=0.5,
        statistics=statistics,
        moving_mean_initializer="random_normal",
        trainable=trainable,
    )
    model.add(bn)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x = rng.normal(1.0, 1.0, (32, 4)).astype("float32")
    target = rng.normal(size=(32, 3)).astype("float32")
    before = [w.copy() for w in bn.get_weights()]
    model.fit(x, target, batch_size=8, epochs=2, shuffle=False, verbose=0)
    after = bn.get_weights()
    statistics_moved = max(
        float(np.max(np.abs(a - b))) for a, b in zip(after[2:], before[2:])
    )
    affine_moved = max(
        float(np.max(np.abs(a - b))) for a, b in zip(after[:2], before[:2])
    )
    record(
        f"fit, statistics={statistics} trainable={trainable}: moving stats change",
        statistics_moved,
        0.0,
    )
    record(
        f"fit, statistics={statistics} trainable={trainable}: gamma/beta change",
        affine_moved,
        0.0,
    )
    if statistics == "moving" or not trainable:
        assert statistics_moved == 0.0
    else:
        assert statistics_moved > 1e-3
    assert (affine_moved > 1e-4) == trainable
    h = to_numpy(model.layers[0](x))
    gamma, beta, mean, var = after
    if statistics == "batch":
        mean, var = np_moments(h, [1])
    expected = np_batch_norm(h, mean, var, gamma, beta)
    predicted = model.predict(x, verbose=0)
    np.testing.assert_allclose(predicted, expected, **TOL)
    record(
        f"fit, statistics={statistics} trainable={trainable}: predict vs NumPy",
        predicted,
        expected,
    )
