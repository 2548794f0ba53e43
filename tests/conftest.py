"""Shared test set-up: backend-neutral helpers, NumPy references, a parity log.

The suite runs on whichever backend ``KERAS_BACKEND`` names. ``train_call``,
``to_numpy`` and ``float64`` hide the backend; tests of a TensorFlow-only
feature carry ``tensorflow_only`` (or skip their module) with the reason.
"""

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    import tensorflow as tf

    # Tests with tf.distribute need two devices; they must exist before TF starts.
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )


def tensorflow_only(reason: str):
    """Marks a test that needs the TensorFlow backend, saying why."""
    return pytest.mark.skipif(
        BACKEND != "tensorflow", reason=f"TensorFlow backend only: {reason}"
    )


def not_on(backend: str, reason: str):
    """Marks a test that cannot run on ``backend``, saying why."""
    return pytest.mark.skipif(BACKEND == backend, reason=f"not on {backend}: {reason}")


# Largest differences from the peer layers seen in this run, by measure name.
PARITY_LOG: dict[str, float] = {}


def record(name: str, actual, expected) -> float:
    """Records the largest absolute difference of ``actual`` from ``expected``."""
    diff = float(
        np.max(
            np.abs(
                to_numpy(actual).astype(np.float64)
                - to_numpy(expected).astype(np.float64)
            )
        )
    )
    PARITY_LOG[name] = max(PARITY_LOG.get(name, 0.0), diff)
    return diff


def assert_close_at_scale(actual, expected, rtol: float = 1e-5):
    """``actual`` equals ``expected`` to ``rtol`` of the largest ``|expected|`` (>= 1).

    For reductions such as the gradients of gamma and beta, which sum many
    terms: their rounding depends on the summation order (threads, kernels)
    and is relative to the size of the terms, not to that of one small sum.
    """
    expected = to_numpy(expected)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(to_numpy(actual), expected, rtol=rtol, atol=rtol * scale)


def assert_matches_keras_peer(rng, shape, kwargs, record_as, train=None, infer=None):
    """kerasbn's BN and Keras's, built alike, train and infer alike.

    Both get ``kwargs`` with random-normal gamma and beta and the same initial
    weights; over four training calls (batches whose mean and spread move)
    their outputs (to 1e-5) and gradients (:func:`assert_close_at_scale`)
    agree, then their weights (recorded under ``record_as``) and an inference
    output.

    Args:
        rng: the test's NumPy generator.
        shape: the input shape.
        kwargs: the constructor arguments both layers take.
        record_as: the :func:`record` name of the weights' difference.
        train: ``train(layer, x, dy) -> (y, grads)``; :func:`train_call` if None.
        infer: ``infer(layer, x) -> y``; a plain call if None.
    """
    import kerasbn

    train = train or train_call
    infer = infer or (lambda layer, x: to_numpy(layer(x)))
    tol = dict(rtol=1e-5, atol=1e-5)
    kwargs = dict(
        gamma_initializer="random_normal", beta_initializer="random_normal", **kwargs
    )
    ours, peer = kerasbn.BatchNorm(**kwargs), keras.layers.BatchNormalization(**kwargs)
    ours.build(shape)
    peer.build(shape)
    peer.set_weights(ours.get_weights())
    for step in range(4):
        x = rng.normal(2.0 - step, 1.0 + step, shape).astype("float32")
        dy = rng.normal(size=shape).astype("float32")
        y, grads = train(ours, x, dy)
        y_ref, grads_ref = train(peer, x, dy)
        np.testing.assert_allclose(to_numpy(y), to_numpy(y_ref), **tol)
        for g, g_ref in zip(grads, grads_ref):
            assert_close_at_scale(g, g_ref)
    for w, w_ref in zip(ours.get_weights(), peer.get_weights()):
        np.testing.assert_allclose(w, w_ref, **tol)
        record(record_as, w, w_ref)
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(infer(ours, x), infer(peer, x), **tol)


CONSTANT_CHANNEL_CASES = [  # (shape, axis): the lecture CNN's and common BN inputs
    ((32, 56, 56, 8), -1),
    ((32, 24, 24, 10), -1),
    ((32, 8, 8, 64), -1),
    ((32, 100), -1),
    ((8, 10, 6, 6), 1),
]
CONSTANT_VALUES = (9984.0, 1e6 + 0.5)


def assert_constant_channel_normalizes_to_zero(rng, shape, axis, value, dtype, name):
    """A training call whose channel 0 holds ``value`` everywhere gives 0 there.

    The closed form: the channel's mean is ``value`` and its variance 0, so
    ``(x - mean) / sqrt(0 + epsilon)`` is exactly 0 (epsilon 1e-5, where
    ``1 / sqrt(epsilon)`` amplifies any rounding of the mean 316 times). The
    other channels hold normal noise; the largest ``|y|`` of channel 0 is
    recorded under ``name``.
    """
    import kerasbn

    x = rng.normal(size=shape).astype("float32")
    index = [slice(None)] * len(shape)
    index[axis] = 0
    x[tuple(index)] = value
    layer = kerasbn.BatchNorm(axis=axis, epsilon=1e-5, momentum=0.0)
    y = to_numpy(layer(keras.ops.cast(x, dtype), training=True)).astype(np.float64)
    expected = np.zeros_like(y[tuple(index)])
    record(name, y[tuple(index)], expected)
    np.testing.assert_allclose(y[tuple(index)], expected, rtol=0, atol=1e-6)
    stored = float(to_numpy(keras.ops.cast(keras.ops.cast(value, dtype), "float32")))
    assert float(to_numpy(layer.moving_mean)[0]) == stored
    assert float(to_numpy(layer.moving_variance)[0]) == 0.0


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"kerasbn: Keras backend {BACKEND}")
    if PARITY_LOG:
        terminalreporter.section(f"kerasbn: largest observed differences ({BACKEND})")
        for name, diff in sorted(PARITY_LOG.items()):
            terminalreporter.write_line(f"{name}: {diff:.3g}")


def to_numpy(x):
    """A NumPy array of a tensor or variable of any backend (or of tf_keras)."""
    if isinstance(x, (list, tuple)):
        return [to_numpy(v) for v in x]
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, keras.Variable):
        x = x.value
    if type(x).__module__.startswith("tensorflow"):  # a tf_keras peer's output
        return np.asarray(x)
    return np.asarray(keras.ops.convert_to_numpy(x))


@contextlib.contextmanager
def float64():
    """Makes float64 layers compute in float64 (JAX needs x64 switched on)."""
    if BACKEND == "jax":
        import jax

        enable_x64 = getattr(jax, "enable_x64", None)
        if enable_x64 is None:  # older JAX has it in jax.experimental only
            from jax.experimental import enable_x64
        with enable_x64(True):
            yield
    else:
        yield


def np_moments(x, channel_axes, mask=None):
    """Float64 NumPy mean and biased variance per channel (channel axes kept)."""
    x = np.asarray(x, np.float64)
    axes = tuple(a for a in range(x.ndim) if a not in channel_axes)
    if mask is None:
        return x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    w = np.broadcast_to(np.asarray(mask, np.float64), x.shape)
    n = w.sum(axis=axes, keepdims=True)
    mean = (w * x).sum(axis=axes, keepdims=True) / n
    var = (w * (x - mean) ** 2).sum(axis=axes, keepdims=True) / n
    return mean, var


def np_batch_norm(x, mean, var, gamma=None, beta=None, epsilon=1e-3):
    """The BN formula in float64: gamma * (x - mean) / sqrt(var + eps) + beta."""
    y = (np.asarray(x, np.float64) - mean) / np.sqrt(var + epsilon)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y


def np_batch_norm_gradients(x, dy, gamma, channel_axes, epsilon):
    """Float64 gradients of ``sum(BN(x) * dy)`` w.r.t. x, gamma and beta.

    ``BN`` uses the batch's own statistics; gamma and beta are summed over the
    reduced axes (one value per channel, flattened).
    """
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axes = tuple(a for a in range(x.ndim) if a not in channel_axes)
    mean, var = np_moments(x, channel_axes)
    inv = 1.0 / np.sqrt(var + epsilon)
    x_hat = (x - mean) * inv
    d_x_hat = dy * gamma
    dx = inv * (
        d_x_hat
        - d_x_hat.mean(axis=axes, keepdims=True)
        - x_hat * (d_x_hat * x_hat).mean(axis=axes, keepdims=True)
    )
    return dx, (dy * x_hat).sum(axis=axes), dy.sum(axis=axes)


def train_call(layer, x, upstream):
    """One training call of a built ``layer`` on the active backend.

    Returns the output and the gradients of ``sum(y * upstream)`` with respect
    to ``x`` and ``layer.trainable_weights``, as NumPy arrays. The layer's
    non-trainable variables (moving statistics) update as in a stateful call:
    ``tf.GradientTape`` on TensorFlow, torch autograd on PyTorch, and on JAX
    ``jax.value_and_grad`` over ``layer.stateless_call``, whose new
    non-trainable values are then assigned back. A ``tf_keras`` layer (a peer
    on any backend) runs under ``tf.GradientTape``.
    """
    if not isinstance(layer, keras.Layer):
        return _tf_train_call(layer, x, upstream)
    if not layer.built:
        raise ValueError(f"train_call needs a built layer; {layer.name} is not.")
    if BACKEND == "tensorflow":
        return _tf_train_call(layer, x, upstream)
    if BACKEND == "jax":
        return _jax_train_call(layer, x, upstream)
    if BACKEND == "torch":
        return _torch_train_call(layer, x, upstream)
    raise NotImplementedError(f"train_call has no branch for backend {BACKEND!r}")


def _tf_train_call(layer, x, upstream):
    import tensorflow as tf

    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * tf.constant(upstream, y.dtype))
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    return np.asarray(y), [np.asarray(g) for g in grads]


def _jax_train_call(layer, x, upstream):
    import jax
    import jax.numpy as jnp

    frozen = [v.value for v in layer.non_trainable_variables]

    def loss(x, trainable):
        y, new_frozen = layer.stateless_call(trainable, frozen, x, training=True)
        return jnp.sum(y * jnp.asarray(upstream, y.dtype)), (y, new_frozen)

    trainable = [v.value for v in layer.trainable_variables]
    (_, (y, new_frozen)), (grad_x, grad_w) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True
    )(jnp.asarray(x), trainable)
    for variable, value in zip(layer.non_trainable_variables, new_frozen):
        variable.assign(value)
    return np.asarray(y), [np.asarray(grad_x), *[np.asarray(g) for g in grad_w]]


def _torch_train_call(layer, x, upstream):
    import torch

    x = keras.ops.convert_to_tensor(x).detach().requires_grad_(True)
    y = layer(x, training=True)
    loss = torch.sum(y * torch.as_tensor(upstream, dtype=y.dtype, device=y.device))
    weights = [w.value for w in layer.trainable_weights]
    grads = torch.autograd.grad(loss, [x, *weights])
    return to_numpy(y), [to_numpy(g) for g in grads]


def run_tflite(tflite_model: bytes, x):
    """The output of a converted TFLite model on ``x`` (its batch size resized)."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=tflite_model)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
