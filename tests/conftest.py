"""Shared test set-up: two logical CPU devices, NumPy references, a parity log."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Tests with tf.distribute need two devices; they must exist before TF starts.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

# Largest differences from the peer layers seen in this run, by measure name.
PARITY_LOG: dict[str, float] = {}


def record(name: str, actual, expected) -> float:
    """Records the largest absolute difference of ``actual`` from ``expected``."""
    diff = float(
        np.max(
            np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
        )
    )
    PARITY_LOG[name] = max(PARITY_LOG.get(name, 0.0), diff)
    return diff


def pytest_terminal_summary(terminalreporter):
    if PARITY_LOG:
        terminalreporter.section("kerasbn: largest observed differences")
        for name, diff in sorted(PARITY_LOG.items()):
            terminalreporter.write_line(f"{name}: {diff:.3g}")


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
    """One training call: output, and gradients of sum(y * upstream) w.r.t. x and
    the layer's trainable weights."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * upstream)
    return y, tape.gradient(loss, [x] + layer.trainable_weights)


def run_tflite(tflite_model: bytes, x):
    """The output of a converted TFLite model on ``x`` (its batch size resized)."""
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
