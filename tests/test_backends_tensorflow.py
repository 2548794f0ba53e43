"""The TensorFlow fast path against NumPy, the Keras peer layer and finite differences.

Every numeric test runs the layer four ways: with the fast path's
formulations forced ("fused" kernel; "composite" custom gradient, also on its
"widened" view) and with the fast path switched off ("generic",
kerasbn.formulas).
All are held to the same independent references, so the fast path gives the
generic path's numbers.
"""

import keras
import numpy as np
import pytest
from conftest import (
    BACKEND,
    CONSTANT_CHANNEL_CASES,
    CONSTANT_VALUES,
    assert_constant_channel_normalizes_to_zero,
    assert_implements_kernel_contract,
    assert_matches_keras_peer,
    force_formulation,
    np_batch_norm,
    np_batch_norm_gradients,
    np_moments,
    record,
    run_tflite,
)

if BACKEND != "tensorflow":
    pytest.skip(
        "TensorFlow backend only: these tests force and compare"
        " kerasbn/backends/tensorflow.py's formulations",
        allow_module_level=True,
    )

import tensorflow as tf  # noqa: E402

import kerasbn  # noqa: E402
from kerasbn import backends  # noqa: E402
from kerasbn.backends import tensorflow as tf_backend  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)

# (id, input shape, layer kwargs); every case is one the fast path accepts.
CASES = [
    ("2d", (24, 6), {}),
    ("4d_nhwc", (6, 5, 4, 8), {}),
    ("channels_first", (6, 8, 5, 4), dict(axis=1)),
    ("5d", (3, 4, 3, 5, 8), {}),
    ("list_axes_last", (6, 5, 4, 3), dict(axis=[2, 3])),
    ("list_axes_middle", (6, 4, 3, 5), dict(axis=[1, 2])),
    ("no_center_no_scale", (6, 5, 4, 8), dict(center=False, scale=False)),
    ("no_center", (24, 6), dict(center=False, momentum=0.5)),
    ("no_scale", (6, 5, 4, 8), dict(scale=False, epsilon=0.1)),
    ("4d_ten_channels", (8, 6, 5, 10), {}),
    ("2d_twelve_channels", (64, 12), dict(center=False)),
]
# "widened": the composite formulation on the (rows / k, k * C) view that it
# uses for large channels-last inputs with few channels, forced on small ones.
PATHS = ["fused", "composite", "widened", "generic"]


def _channel_axes(shape, axis):
    axes = axis if isinstance(axis, list) else [axis]
    return sorted(a % len(shape) for a in axes)


def _cases_and_paths():
    for name, shape, kwargs in CASES:
        channel_axes = _channel_axes(shape, kwargs.get("axis", -1))
        for path in PATHS:
            if path in ("fused", "widened") and channel_axes[-1] != len(shape) - 1:
                continue  # channels-last inputs only
            yield pytest.param(shape, kwargs, path, id=f"{name}-{path}")


@pytest.fixture
def force_path(monkeypatch):
    """``force_path(path)``: make the layer compute with ``path`` from now on."""

    def force(path):
        force_formulation(monkeypatch, tf_backend, None if path == "generic" else path)

    return force


def _plan(x, axes, mask=None, training=True):
    return backends.plan(x, axes, mask, epsilon=1e-3, training=training)


def _train_call(layer, x, upstream):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
    grads = tape.gradient(y, [x, *layer.trainable_weights], output_gradients=upstream)
    return y, grads


# ------------------------------------------------------------------- selection
def test_module_implements_the_kernel_contract():
    assert_implements_kernel_contract(tf_backend)
    assert backends.current() is tf_backend


@pytest.mark.parametrize(
    "shape, axes, dtype",
    [
        ((16, 6), [0], "float32"),
        ((4, 5, 5, 8), [0, 1, 2], "float32"),
        ((4, 8, 5, 5), [0, 2, 3], "float32"),
        ((2, 3, 4, 5, 8), [0, 1, 2, 3], "float32"),
        ((4, 5, 5, 8), [0, 3], "float32"),  # channel axes [1, 2]
        ((4, 5, 5, 8), [0, 1, 2], "float16"),
        ((4, 5, 5, 8), [0, 1, 2], "bfloat16"),
    ],
)
def test_fast_path_is_selected_for_the_calls_it_claims(shape, axes, dtype):
    x = tf.zeros(shape, dtype)
    assert _plan(x, axes) is not None
    assert _plan(x, axes, training=False) is not None


@pytest.mark.parametrize(
    "shape, axes, dtype, masked",
    [
        ((16, 6), [0], "float64", False),
        ((16, 6), [0], "int32", False),
        ((4, 5, 5, 8), [0, 1, 2], "float32", True),
        ((4, 5, 5, 8), [0, 2], "float32", False),  # channel axes [1, 3]
        ((2, 4, 5, 5, 8), [0, 2, 3], "float32", False),  # ghost-batch grouping
    ],
)
def test_fast_path_declines_masks_float64_and_split_channel_axes(
    shape, axes, dtype, masked
):
    x = tf.zeros(shape, dtype)
    mask = tf.ones(shape[:-1] + (1,), "bool") if masked else None
    assert _plan(x, axes, mask) is None
    assert _plan(x, axes, mask, training=False) is None


@pytest.mark.parametrize(
    "shape, axes, expected",
    [
        ((32, 56, 56, 64), [0, 1, 2], "fused"),
        ((32, 28, 28, 256), [0, 1, 2], "fused"),
        ((None, 28, 28, 256), [0, 1, 2], "fused"),
        ((8, 16, 32, 32, 32), [0, 1, 2, 3], "fused"),
        ((32, 64, 56, 56), [0, 2, 3], "composite"),  # channels first
        ((32, 24, 24, 10), [0, 1, 2], "widened"),  # lecture CNN
        ((32, 8, 8, 20), [0, 1, 2], "widened"),
        ((32, 100), [0], "composite"),
    ],
)
def test_formulation_is_fused_only_for_large_channels_last_inputs(
    shape, axes, expected
):
    for device in ("cpu:avx512:onednn", "cpu:avx2"):  # with oneDNN and without
        plan = tf_backend.formulation(shape, axes, device=device)
        assert plan.formulation == expected, device


def test_formulation_is_not_fused_below_cudnn_smallest_epsilon():
    plan = tf_backend.formulation((32, 56, 56, 64), [0, 1, 2], epsilon=1e-6)
    assert plan.formulation == "composite"


@pytest.mark.parametrize(
    "device, shape, k",
    [
        ("cpu:avx512:onednn", (32, 24, 24, 10), 8),  # 16 lanes
        ("cpu:avx512:onednn", (32, 8, 8, 20), 4),
        ("cpu:avx512:onednn", (None, 8, 8, 20), 4),
        ("cpu:avx512:onednn", (4, 5, 10), 1),
        ("cpu:avx2", (32, 24, 24, 10), 4),  # TensorFlow's own kernels: 8 lanes
        ("cpu:avx2", (32, 8, 8, 20), 2),
        ("cpu:avx2", (None, 8, 8, 20), 2),
        ("cpu:avx2", (4, 5, 10), 1),
    ],
)
def test_few_channels_are_widened_to_whole_vectors_in_large_inputs(device, shape, k):
    plan = tf_backend.formulation(shape, list(range(len(shape) - 1)), device=device)
    assert plan.formulation == ("widened" if k > 1 else "composite")
    assert k == 1 or tf_backend._widening(plan) == k


def test_layer_calls_the_fast_path_in_training_and_inference(rng, monkeypatch):
    calls = []
    for name in ("batch_normalize", "normalize"):
        original = getattr(tf_backend, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tf_backend, name, spy)
    layer = kerasbn.BatchNorm()
    x = rng.normal(size=(8, 4, 4, 3)).astype("float32")
    layer(x, training=True)
    layer(x, training=False)
    assert calls == ["batch_normalize", "normalize"]


# ------------------------------------------------------------------ references
def test_numpy_gradient_reference_matches_central_finite_differences(rng):
    shape, channel_axes, epsilon = (5, 3, 2), [1], 1e-3
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    gamma = rng.normal(size=(1, 3, 1))

    def loss(x, gamma):
        mean, var = np_moments(x, channel_axes)
        return np.sum(np_batch_norm(x, mean, var, gamma, 0.0, epsilon) * dy)

    dx, dgamma, _ = np_batch_norm_gradients(x, dy, gamma, channel_axes, epsilon)
    h = 1e-6
    numeric_dx = np.zeros(shape)
    for idx in np.ndindex(shape):
        step = np.zeros(shape)
        step[idx] = h
        numeric_dx[idx] = (loss(x + step, gamma) - loss(x - step, gamma)) / (2 * h)
    numeric_dgamma = np.zeros(3)
    for c in range(3):
        step = np.zeros((1, 3, 1))
        step[0, c, 0] = h
        numeric_dgamma[c] = (loss(x, gamma + step) - loss(x, gamma - step)) / (2 * h)
    np.testing.assert_allclose(dx, numeric_dx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dgamma.ravel(), numeric_dgamma, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------- numbers
@pytest.mark.parametrize("shape, kwargs, path", list(_cases_and_paths()))
def test_outputs_gradients_and_moving_statistics_match_numpy(
    rng, force_path, shape, kwargs, path
):
    force_path(path)
    kwargs = dict(gamma_initializer="random_uniform", **kwargs)
    layer = kerasbn.BatchNorm(**kwargs)
    layer.build(shape)
    channel_axes = _channel_axes(shape, kwargs.get("axis", -1))
    stats_shape = [shape[a] if a in channel_axes else 1 for a in range(len(shape))]
    momentum, epsilon = layer.momentum, layer.epsilon
    gamma = layer.gamma.numpy().reshape(stats_shape) if layer.scale else 1.0
    beta = 0.0  # beta starts at zero and a training call leaves it there
    moving_mean, moving_var = np.zeros(stats_shape), np.ones(stats_shape)
    for step in range(3):
        x = rng.normal(step - 1.0, 1.0 + step, shape).astype("float32")
        dy = rng.normal(size=shape).astype("float32")
        y, grads = _train_call(layer, x, dy)
        mean, var = np_moments(x, channel_axes)
        np.testing.assert_allclose(
            y, np_batch_norm(x, mean, var, gamma, beta, epsilon), **TOL
        )
        dx, dgamma, dbeta = np_batch_norm_gradients(x, dy, gamma, channel_axes, epsilon)
        np.testing.assert_allclose(grads[0], dx, **TOL)
        expected = ([dgamma] if layer.scale else []) + ([dbeta] if layer.center else [])
        for g, ref in zip(grads[1:], expected):
            np.testing.assert_allclose(g, ref.reshape(g.shape), **TOL)
            record(f"fast path gradients vs NumPy ({path})", g, ref.reshape(g.shape))
        record(f"fast path dx vs NumPy ({path})", grads[0], dx)
        moving_mean = momentum * moving_mean + (1 - momentum) * mean
        moving_var = momentum * moving_var + (1 - momentum) * var
    stats_size = int(np.prod(stats_shape))
    np.testing.assert_allclose(
        layer.moving_mean, moving_mean.reshape(layer.moving_mean.shape), **TOL
    )
    np.testing.assert_allclose(
        layer.moving_variance, moving_var.reshape(layer.moving_variance.shape), **TOL
    )
    assert layer.moving_mean.numpy().size == stats_size
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(
        layer(x), np_batch_norm(x, moving_mean, moving_var, gamma, 0.0, epsilon), **TOL
    )


@pytest.mark.parametrize("shape, kwargs, path", list(_cases_and_paths()))
def test_matches_keras_peer_layer_over_several_training_calls(
    rng, force_path, shape, kwargs, path
):
    if isinstance(kwargs.get("axis"), list) and len(kwargs["axis"]) > 1:
        pytest.skip("keras.layers.BatchNormalization takes one axis")
    force_path(path)
    assert_matches_keras_peer(
        rng, shape, kwargs, f"fast path weights vs Keras ({path})", train=_train_call
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape, axis", [((16, 6, 6, 16), -1), ((16, 6, 6, 10), 1)])
def test_statistics_stay_exact_when_the_mean_dwarfs_the_spread(
    rng, force_path, path, shape, axis
):
    # float32 can hold a mean of 1e4 only to 5e-4, a twentieth of the spread;
    # the statistics must not inherit that rounding (the outputs do, on every
    # path: they are computed from the rounded mean or as x * scale + offset).
    if path in ("fused", "widened") and axis != -1:
        pytest.skip("channels-last inputs only")
    force_path(path)
    layer = kerasbn.BatchNorm(axis=axis, momentum=0.0, epsilon=1e-5)
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype("float32")
    layer(x, training=True)
    mean, var = np_moments(x, _channel_axes(shape, axis))
    np.testing.assert_allclose(layer.moving_mean, mean.ravel(), rtol=1e-7)
    np.testing.assert_allclose(layer.moving_variance, var.ravel(), rtol=1e-5)
    record(
        f"variance, mean 1e4 spread 1e-2 ({path})", layer.moving_variance, var.ravel()
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("value", CONSTANT_VALUES)
@pytest.mark.parametrize("shape, axis", CONSTANT_CHANNEL_CASES)
@pytest.mark.parametrize("path", PATHS)
def test_a_constant_channel_normalizes_to_zero_at_any_magnitude(
    rng, force_path, path, shape, axis, value, dtype
):
    # A float32 sum of a constant 1e6 + 0.5 over 100,352 values is off by 113
    # in the mean, and the fused kernel's mean by enough to give |y| = 1.0;
    # shifted by a sample, the channel is 0 exactly.
    if path in ("fused", "widened") and axis != -1:
        pytest.skip("channels-last inputs only")
    force_path(path)
    assert_constant_channel_normalizes_to_zero(
        rng, shape, axis, value, dtype, f"constant channel |y| ({path})"
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(4, 4, 8), (4, 3, 10)])
def test_unknown_batch_size_inside_tf_function_matches_numpy(
    rng, force_path, path, shape
):
    force_path(path)
    layer = kerasbn.BatchNorm(momentum=0.0)
    layer.build((None, *shape))

    @tf.function(input_signature=[tf.TensorSpec((None, *shape))] * 2)
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return y, tape.gradient(y, x, output_gradients=dy)

    for batch in (6, 3):
        x = rng.normal(1.0, 2.0, (batch, *shape)).astype("float32")
        dy = rng.normal(size=x.shape).astype("float32")
        y, dx = step(x, dy)
        mean, var = np_moments(x, [3])
        np.testing.assert_allclose(y, np_batch_norm(x, mean, var), **TOL)
        ref_dx = np_batch_norm_gradients(x, dy, 1.0, [3], 1e-3)[0]
        np.testing.assert_allclose(dx, ref_dx, **TOL)
        np.testing.assert_allclose(layer.moving_variance, var.ravel(), **TOL)


# --------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_takes_the_fast_path_with_float32_statistics(
    rng, force_path, policy, path
):
    force_path(path)
    shape = (8, 4, 4, 8)
    layer = kerasbn.BatchNorm(dtype=policy, momentum=0.0)
    layer.build(shape)
    low = layer.compute_dtype
    if path != "generic":
        assert _plan(tf.zeros(shape, low), [0, 1, 2]).formulation == path
    x = tf.cast(rng.normal(3.0, 2.0, shape), low)
    dy = tf.cast(rng.normal(size=shape), low)
    y, grads = _train_call(layer, x, dy)
    assert y.dtype == low and grads[0].dtype == low
    assert all(w.dtype == "float32" for w in layer.weights)
    x64 = tf.cast(x, "float64").numpy()
    mean, var = np_moments(x64, [3])
    np.testing.assert_allclose(layer.moving_mean, mean.ravel(), **TOL)
    np.testing.assert_allclose(layer.moving_variance, var.ravel(), **TOL)
    # the outputs are rounded to the compute dtype: 8 (bfloat16) or 11 bits
    tol = dict(rtol=1e-2, atol=1e-2) if low == "bfloat16" else dict(atol=2e-3)
    np.testing.assert_allclose(
        tf.cast(y, "float32"), np_batch_norm(x64, mean, var), **tol
    )
    dx = np_batch_norm_gradients(x64, tf.cast(dy, "float64"), 1.0, [3], 1e-3)[0]
    np.testing.assert_allclose(tf.cast(grads[0], "float32"), dx, **tol)


@pytest.mark.parametrize("path", PATHS)
def test_float16_inputs_near_6e4_give_finite_float32_statistics(rng, force_path, path):
    force_path(path)
    layer = kerasbn.BatchNorm(dtype="mixed_float16", momentum=0.0)
    x = tf.constant(rng.uniform(6e4, 6.5e4, (16, 4, 4, 8)).astype("float16"))
    y, grads = _train_call(layer, x, tf.ones_like(x))
    assert np.all(np.isfinite(y.numpy())) and np.all(np.isfinite(grads[0].numpy()))
    mean, var = np_moments(x.numpy().astype("float64"), [3])
    assert layer.moving_mean.dtype == "float32"
    np.testing.assert_allclose(layer.moving_mean, mean.ravel(), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, var.ravel(), rtol=1e-4)
    assert np.all(np.isfinite(layer(x).numpy()))


# ------------------------------------------------------------- fit and export
@pytest.mark.parametrize("path", ["fused", "composite", "widened"])
def test_fit_compiled_with_xla_matches_numpy(rng, force_path, path):
    force_path(path)
    model = keras.Sequential([keras.Input((4, 4, 8)), kerasbn.BatchNorm(momentum=0.0)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=True)
    x = rng.normal(3.0, 2.0, (16, 4, 4, 8)).astype("float32")
    model.fit(x, np.zeros_like(x), batch_size=16, verbose=0)
    mean, var = np_moments(x, [3])
    np.testing.assert_allclose(model.layers[0].moving_mean, mean.ravel(), **TOL)
    np.testing.assert_allclose(model.layers[0].moving_variance, var.ravel(), **TOL)


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_fit_export_and_tflite_with_the_fused_kernel(rng, tmp_path):
    inputs = keras.Input((32, 32, 16))  # 32 * 16384 elements: the fused kernel
    assert tf_backend.formulation((None, 32, 32, 16), [0, 1, 2]).formulation == (
        "fused"
    )
    outputs = keras.layers.Dense(2)(
        keras.layers.GlobalAveragePooling2D()(kerasbn.BatchNorm(momentum=0.5)(inputs))
    )
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = rng.normal(1.0, 3.0, (8, 32, 32, 16)).astype("float32")
    model.fit(x, np.zeros((8, 2)), batch_size=4, shuffle=False, verbose=0)
    bn = model.layers[1]
    mean_a, var_a = np_moments(x[:4], [3])
    mean_b, var_b = np_moments(x[4:], [3])
    expected_var = 0.25 + 0.25 * var_a.ravel() + 0.5 * var_b.ravel()
    np.testing.assert_allclose(bn.moving_variance, expected_var, **TOL)
    expected_mean = 0.25 * mean_a.ravel() + 0.5 * mean_b.ravel()
    np.testing.assert_allclose(bn.moving_mean, expected_mean, **TOL)
    predicted = model.predict(x, verbose=0)
    path = str(tmp_path / "saved")
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)
    np.testing.assert_allclose(loaded.serve(tf.constant(x)), predicted, **TOL)
    lite = run_tflite(tf.lite.TFLiteConverter.from_saved_model(path).convert(), x)
    np.testing.assert_allclose(lite, predicted, rtol=1e-4, atol=1e-4)
