"""Ghost batch normalization (virtual_batch_size) against tf_keras and NumPy.

tf_keras (Keras 2 on TensorFlow) is the peer on every Keras 3 backend: its
numbers are compared as NumPy arrays.
"""

import numpy as np
import pytest
from conftest import (
    np_batch_norm,
    np_moments,
    record,
    tensorflow_only,
    to_numpy,
    train_call,
)

import kerasbn

tf_keras = pytest.importorskip("tf_keras")
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((12, 5), dict(virtual_batch_size=4)),
        ((8, 4, 4, 3), dict(virtual_batch_size=2, momentum=0.5)),
        ((8, 3, 4, 4), dict(virtual_batch_size=4, axis=1, epsilon=0.1)),
        ((6, 2, 3, 4, 3), dict(virtual_batch_size=3, center=False)),
        (
            (12, 5),
            dict(virtual_batch_size=6, renorm=True, renorm_clipping={"rmax": 1.5}),
        ),
    ],
)
def test_ghost_batches_match_tf_keras(rng, shape, kwargs):
    ours = kerasbn.BatchNorm(**kwargs)
    peer = tf_keras.layers.BatchNormalization(**kwargs)
    ours.build(shape)
    peer.build(shape)
    for step in range(3):
        x = rng.normal(step, 1.0 + step, shape).astype("float32")
        upstream = rng.normal(size=shape).astype("float32")
        y, grads = train_call(ours, x, upstream)
        y_ref, grads_ref = train_call(peer, x, upstream)
        np.testing.assert_allclose(y, y_ref, **TOL)
        record("ghost batches: training output vs tf_keras", y, y_ref)
        for g, g_ref in zip(grads, grads_ref):
            np.testing.assert_allclose(g, np.reshape(g_ref, np.shape(g)), **TOL)
        for w, w_ref in zip(ours.get_weights(), peer.get_weights()):
            np.testing.assert_allclose(w, np.reshape(w_ref, w.shape), **TOL)
            record(
                "ghost batches: moving statistics vs tf_keras",
                w,
                np.reshape(w_ref, w.shape),
            )
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(
        to_numpy(ours(x, training=False)), to_numpy(peer(x, training=False)), **TOL
    )


def test_each_ghost_batch_is_normalized_with_its_own_statistics(rng):
    v, groups = 4, 3
    x = rng.normal(2.0, 3.0, (v * groups, 5)).astype("float32")
    layer = kerasbn.BatchNorm(virtual_batch_size=v, momentum=0.0, epsilon=1e-3)
    y = to_numpy(layer(x, training=True))
    means, variances = [], []
    for g in range(groups):
        members = np.arange(g, v * groups, groups)  # tf.keras's strided layout
        mean, var = np_moments(x[members], [1])
        np.testing.assert_allclose(
            y[members], np_batch_norm(x[members], mean, var), **TOL
        )
        means.append(mean.ravel())
        variances.append(var.ravel())
    np.testing.assert_allclose(to_numpy(layer.moving_mean), np.mean(means, 0), **TOL)
    np.testing.assert_allclose(
        to_numpy(layer.moving_variance), np.mean(variances, 0), **TOL
    )


def test_inference_ignores_virtual_batch_size(rng):
    layer = kerasbn.BatchNorm(
        virtual_batch_size=4, moving_mean_initializer="random_normal"
    )
    x = rng.normal(size=(7, 3)).astype("float32")  # 7 is not divisible by 4
    layer.build(x.shape)
    expected = np_batch_norm(
        x, to_numpy(layer.moving_mean), to_numpy(layer.moving_variance)
    )
    np.testing.assert_allclose(to_numpy(layer(x)), expected, **TOL)


def test_batch_not_divisible_by_virtual_batch_size_is_rejected(rng):
    layer = kerasbn.BatchNorm(virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"virtual_batch_size.*=4.*batch of 6"):
        layer(rng.normal(size=(6, 3)).astype("float32"), training=True)


@tensorflow_only("only tf.function traces a call with an unknown batch size")
def test_dynamic_batch_not_divisible_by_virtual_batch_size_fails_in_graph(rng):
    import tensorflow as tf

    layer = kerasbn.BatchNorm(virtual_batch_size=4)
    layer.build((None, 3))
    dynamic = tf.function(
        lambda x: layer(x, training=True),
        input_signature=[tf.TensorSpec((None, 3), tf.float32)],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="virtual_batch_size"):
        dynamic(rng.normal(size=(6, 3)).astype("float32"))


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(virtual_batch_size=0), ValueError, r"virtual_batch_size.*positive.*0"),
        (dict(virtual_batch_size=2.5), TypeError, r"virtual_batch_size.*2\.5"),
        (dict(virtual_batch_size=2, synchronized=True), ValueError, r"synchronized"),
    ],
)
def test_bad_virtual_batch_size_is_rejected(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        kerasbn.BatchNorm(**kwargs)


def test_virtual_batches_cannot_normalize_the_batch_axis():
    with pytest.raises(ValueError, match=r"axis 0 is the batch axis.*axis=0"):
        kerasbn.BatchNorm(axis=0, virtual_batch_size=2).build((4, 3))


def test_masked_ghost_batches_use_only_unmasked_positions(rng):
    v, groups = 2, 2
    x = rng.normal(size=(v * groups, 6, 3)).astype("float32")
    mask = rng.random((v * groups, 6)) > 0.3
    layer = kerasbn.BatchNorm(virtual_batch_size=v, momentum=0.0)
    layer(x, training=True, mask=mask)
    means = []
    for g in range(groups):
        members = np.arange(g, v * groups, groups)
        mean, _ = np_moments(x[members], [2], mask[members][..., None])
        means.append(mean.ravel())
    np.testing.assert_allclose(to_numpy(layer.moving_mean), np.mean(means, 0), **TOL)
