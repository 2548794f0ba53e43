"""Synchronized statistics under MirroredStrategy (two logical CPUs) against NumPy."""

import keras
import numpy as np
import pytest
from conftest import np_batch_norm, np_moments, record, tensorflow_only, to_numpy

import kerasbn

MIRRORED = tensorflow_only("runs under tf.distribute.MirroredStrategy")


@pytest.fixture(scope="module")
def strategy():
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2
    return tf.distribute.MirroredStrategy(devices)


def _replica_batches(strategy, parts):
    """Per-replica values: replica i gets ``parts[i]`` (shapes may differ)."""
    import tensorflow as tf

    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
    )


def _sync_train_step(strategy, layer, parts, upstream_parts):
    """Runs one training call per replica; returns outputs and input gradients."""
    import tensorflow as tf

    xs = _replica_batches(strategy, parts)
    ups = _replica_batches(strategy, upstream_parts)

    @tf.function
    def step(x, up):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * up)
        return y, tape.gradient(loss, x)

    ys, grads = strategy.run(step, args=(xs, ups))
    local = strategy.experimental_local_results
    return np.concatenate(local(ys)), np.concatenate(local(grads))


@MIRRORED
@pytest.mark.parametrize("sizes", [(8, 8), (9, 4), (5, 1)])
def test_synchronized_statistics_are_those_of_the_global_batch(rng, strategy, sizes):
    import tensorflow as tf

    parts = [
        rng.normal(i * 3.0, 1.0 + i, (n, 4, 3)).astype("float32")
        for i, n in enumerate(sizes)
    ]
    with strategy.scope():
        layer = kerasbn.BatchNorm(synchronized=True, momentum=0.0)
        layer.build((None, 4, 3))
    full = np.concatenate(parts)
    ups = [rng.normal(size=p.shape).astype("float32") for p in parts]
    y, grad_x = _sync_train_step(strategy, layer, parts, ups)
    mean, var = np_moments(full, [2])
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), mean.ravel(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(layer.moving_variance.numpy(), var.ravel(), rtol=1e-5)
    np.testing.assert_allclose(y, np_batch_norm(full, mean, var), rtol=1e-5, atol=1e-5)
    # The input gradient equals the single-device full-batch gradient of Keras's BN.
    peer = keras.layers.BatchNormalization()
    x_full = tf.constant(full)
    with tf.GradientTape() as tape:
        tape.watch(x_full)
        loss = tf.reduce_sum(peer(x_full, training=True) * np.concatenate(ups))
    grad_ref = tape.gradient(loss, x_full)
    np.testing.assert_allclose(grad_x, grad_ref, rtol=1e-5, atol=1e-5)
    record("synchronized gradient vs single-device Keras", grad_x, grad_ref)


def _relative_variance_error(strategy, layer_class, x):
    with strategy.scope():
        layer = layer_class(synchronized=True, momentum=0.0)
        layer.build((None, x.shape[-1]))
    halves = np.split(x, 2)
    _sync_train_step(strategy, layer, halves, [np.ones_like(h) for h in halves])
    _, var = np_moments(x, [1])
    return float(
        np.max(np.abs(layer.moving_variance.numpy() - var.ravel()) / var.ravel())
    )


@MIRRORED
def test_synchronized_variance_is_accurate_for_large_mean_small_spread(rng, strategy):
    x = (1e4 + 1e-2 * rng.standard_normal((4096, 8))).astype("float32")
    ours = _relative_variance_error(strategy, kerasbn.BatchNorm, x)
    keras_error = _relative_variance_error(strategy, keras.layers.BatchNormalization, x)
    record("sync relative variance error, mean 1e4 std 1e-2 (kerasbn)", ours, 0.0)
    record("sync relative variance error, mean 1e4 std 1e-2 (Keras)", keras_error, 0.0)
    assert ours <= 1e-3


def _refuses_synchronized() -> bool:
    try:
        kerasbn.BatchNorm(synchronized=True)
    except ValueError:
        return True
    return False


@pytest.mark.skipif(
    _refuses_synchronized(),
    reason="kerasbn refuses synchronized=True on this backend (as Keras's BN does):"
    " no synchronization engine for it yet",
)
def test_synchronized_outside_a_strategy_is_the_local_computation(rng):
    x = rng.normal(2.0, 3.0, (16, 3)).astype("float32")
    layer = kerasbn.BatchNorm(synchronized=True, momentum=0.0)
    y = to_numpy(layer(x, training=True))
    mean, var = np_moments(x, [1])
    np.testing.assert_allclose(y, np_batch_norm(x, mean, var), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.moving_variance), var.ravel(), rtol=1e-5)


@MIRRORED
def test_synchronized_fit_under_mirrored_strategy_matches_full_batch_numpy(
    rng, strategy
):
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((3,)), kerasbn.BatchNorm(synchronized=True, momentum=0.0)]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = rng.normal(5.0, 2.0, (12, 3)).astype("float32")
    model.fit(x, np.zeros_like(x), batch_size=12, epochs=1, shuffle=False, verbose=0)
    mean, var = np_moments(x, [1])
    bn = model.layers[0]
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var.ravel(), rtol=1e-5)


@MIRRORED
def test_synchronized_unbiased_variance_uses_the_global_count(rng, strategy):
    parts = [
        rng.normal(i, 1.0 + i, (n, 3)).astype("float32") for i, n in [(0, 5), (1, 3)]
    ]
    with strategy.scope():
        layer = kerasbn.BatchNorm(
            synchronized=True, momentum=0.0, unbiased_moving_variance=True
        )
        layer.build((None, 3))
    _sync_train_step(strategy, layer, parts, [np.ones_like(p) for p in parts])
    full = np.concatenate(parts)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), full.var(0, ddof=1), rtol=1e-5
    )
