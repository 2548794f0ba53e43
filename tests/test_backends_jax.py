"""The JAX fast path against NumPy, the Keras peer layer and finite differences.

Every numeric test runs the layer several ways: with the fast path's
formulations forced (the ``jax.custom_vjp`` of ``kerasbn.backends.jax`` with
"shifted" statistics, and with "rough" ones that fall back on the shifted ones
for far means) and with the fast path switched off ("generic",
kerasbn.formulas). All are held to the same independent references, so the
fast path gives the generic path's numbers. Training calls run as
Keras's JAX trainer runs them: ``stateless_call`` under ``jax.jit``, with
gradients from ``jax.grad``.

Run: ``KERAS_BACKEND=jax python -m pytest -q tests/test_backends_jax.py``.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip(
        "tests of the JAX fast path: run with KERAS_BACKEND=jax",
        allow_module_level=True,
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import (  # noqa: E402
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
)

import kerasbn  # noqa: E402
from kerasbn import backends  # noqa: E402
from kerasbn.backends import jax as jax_backend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import xla_programs  # noqa: E402  (the counts bench_layer.py --kernels prints)

TOL = dict(rtol=1e-5, atol=1e-5)
ROOT = Path(__file__).resolve().parents[1]

# (id, input shape, layer kwargs); every case is one the fast path accepts.
CASES = [
    ("2d", (24, 6), {}),
    ("4d_nhwc", (6, 5, 4, 8), {}),
    ("channels_first", (6, 8, 5, 4), dict(axis=1)),
    ("channel_axis_2_of_3", (6, 8, 5), dict(axis=1)),
    ("5d", (3, 4, 3, 5, 8), {}),
    ("list_axes_last", (6, 5, 4, 3), dict(axis=[2, 3])),
    ("list_axes_middle", (6, 4, 3, 5), dict(axis=[1, 2])),
    ("no_center_no_scale", (6, 5, 4, 8), dict(center=False, scale=False)),
    ("no_center", (24, 6), dict(center=False, momentum=0.5)),
    ("no_scale", (6, 5, 4, 8), dict(scale=False, epsilon=0.1)),
    ("4d_ten_channels", (8, 6, 5, 10), {}),
]
PATHS = ["shifted", "rough", "generic"]
FAST_PATHS = PATHS[:-1]


def _channel_axes(shape, axis):
    axes = axis if isinstance(axis, list) else [axis]
    return sorted(a % len(shape) for a in axes)


def _cases_and_paths():
    for name, shape, kwargs in CASES:
        for path in PATHS:
            yield pytest.param(shape, kwargs, path, id=f"{name}-{path}")


@pytest.fixture
def force_path(monkeypatch):
    """``force_path(path)``: make the layer compute with ``path`` from now on."""

    def force(path):
        force_formulation(monkeypatch, jax_backend, None if path == "generic" else path)

    return force


def _plan(x, axes, mask=None, training=True):
    return backends.plan(x, axes, mask, epsilon=1e-3, training=training)


def _name(plan):
    return "generic" if plan is None else plan.formulation


def train_call(layer, x, upstream):
    """One jitted training call through ``stateless_call``, as Keras's JAX
    trainer makes it; the new moving statistics are assigned to the layer.

    (``conftest.train_call`` runs eagerly and returns NumPy arrays; the fast
    path must hold under ``jax.jit``, and these tests check the dtypes of the
    JAX arrays it returns.)

    Returns:
        ``y`` and the gradients of ``sum(y * upstream)`` (``jax.grad``) with
        respect to ``x`` and the layer's trainable weights.
    """
    if not layer.built:
        layer.build(np.shape(x))
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def step(x, upstream, trainable, non_trainable):
        def loss(x, trainable):
            y, new = layer.stateless_call(trainable, non_trainable, x, training=True)
            return jnp.sum(y.astype("float32") * upstream), (y, new)

        grads, (y, new) = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, trainable)
        return y, grads, new

    y, (dx, d_trainable), new = step(
        jnp.asarray(x), jnp.asarray(upstream, "float32"), trainable, non_trainable
    )
    for variable, value in zip(layer.non_trainable_variables, new):
        variable.assign(value)
    return y, [dx, *d_trainable]


def infer_call(layer, x):
    """A jitted inference call through ``stateless_call``."""
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    y, _ = jax.jit(
        lambda x: layer.stateless_call(trainable, non_trainable, x, training=False)
    )(jnp.asarray(x))
    return y


def _run(script: str, timeout: float = 300.0, **env) -> str:
    """Runs ``script`` in a fresh Python on the JAX backend; returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


# ------------------------------------------------------------------- selection
def test_module_implements_the_kernel_contract():
    assert_implements_kernel_contract(jax_backend)
    assert backends.current() is jax_backend


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
    x = jnp.zeros(shape, dtype)
    assert _plan(x, axes) is not None
    assert _name(jax_backend.formulation(shape, axes, dtype=dtype)) != "generic"


@pytest.mark.parametrize(
    "shape, axes, dtype, masked",
    [
        ((16, 6), [0], "int32", False),
        ((16, 6), [0], "bool", False),
        ((4, 5, 5, 8), [0, 1, 2], "float32", True),
        ((4, 5, 5, 8), [0, 2], "float32", False),  # channel axes [1, 3]
        ((2, 4, 5, 5, 8), [0, 2, 3], "float32", False),  # ghost-batch grouping
        ((4, 5), [], "float32", False),  # nothing to reduce
        ((0, 5), [0], "float32", False),  # an empty batch
    ],
)
def test_fast_path_declines_masks_integers_split_channel_axes_and_empty_batches(
    shape, axes, dtype, masked
):
    x = jnp.zeros(shape, dtype)
    mask = jnp.ones(shape[:-1] + (1,), "bool") if masked else None
    assert _plan(x, axes, mask) is None
    assert _plan(x, axes, mask, training=False) is None


@pytest.mark.parametrize(
    "shape, axes, expected",
    [
        ((32, 56, 56, 64), [0, 1, 2], "rough"),
        ((32, 28, 28, 256), [0, 1, 2], "rough"),
        ((32, 64, 56, 56), [0, 2, 3], "rough"),  # channels first
        ((1024, 1024), [0], "rough"),  # 2**20 elements
        ((1023, 1024), [0], "shifted"),
        ((32, 24, 24, 10), [0, 1, 2], "shifted"),  # lecture CNN
        ((32, 8, 8, 20), [0, 1, 2], "shifted"),
        ((32, 100), [0], "shifted"),
        ((3, 100), [0], "shifted"),
        ((4, 5, 6), [1], "generic"),
    ],
)
def test_formulation_is_rough_for_large_inputs_and_shifted_for_small_ones(
    shape, axes, expected
):
    assert _name(jax_backend.formulation(shape, axes)) == expected


def test_fast_path_declines_inputs_without_a_known_shape():
    class Unshaped:
        dtype = "float32"

    assert _plan(Unshaped(), [0]) is None
    assert _plan(keras.KerasTensor((None, 4), "float32"), [0]) is None


def test_layer_calls_the_fast_path_in_training_and_inference(rng, monkeypatch):
    calls = []
    for name in ("batch_normalize", "normalize"):
        original = getattr(jax_backend, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(jax_backend, name, spy)
    layer = kerasbn.BatchNorm()
    x = rng.normal(size=(8, 4, 4, 3)).astype("float32")
    train_call(layer, x, np.ones_like(x))
    infer_call(layer, x)
    assert calls == ["batch_normalize", "normalize"]


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
    gamma = np.asarray(layer.gamma).reshape(stats_shape) if layer.scale else 1.0
    moving_mean, moving_var = np.zeros(stats_shape), np.ones(stats_shape)
    for step in range(3):
        x = rng.normal(step - 1.0, 1.0 + step, shape).astype("float32")
        dy = rng.normal(size=shape).astype("float32")
        y, grads = train_call(layer, x, dy)
        mean, var = np_moments(x, channel_axes)
        # beta starts at zero and no optimizer step moves it
        np.testing.assert_allclose(
            y, np_batch_norm(x, mean, var, gamma, 0.0, epsilon), **TOL
        )
        dx, dgamma, dbeta = np_batch_norm_gradients(x, dy, gamma, channel_axes, epsilon)
        np.testing.assert_allclose(grads[0], dx, **TOL)
        record(f"JAX fast path dx vs NumPy ({path})", grads[0], dx)
        expected = ([dgamma] if layer.scale else []) + ([dbeta] if layer.center else [])
        assert len(grads) == 1 + len(expected)
        for g, ref in zip(grads[1:], expected):
            np.testing.assert_allclose(g, ref.reshape(g.shape), **TOL)
            record(
                f"JAX fast path gradients vs NumPy ({path})", g, ref.reshape(g.shape)
            )
        moving_mean = momentum * moving_mean + (1 - momentum) * mean
        moving_var = momentum * moving_var + (1 - momentum) * var
    np.testing.assert_allclose(
        layer.moving_mean, moving_mean.reshape(layer.moving_mean.shape), **TOL
    )
    np.testing.assert_allclose(
        layer.moving_variance, moving_var.reshape(layer.moving_variance.shape), **TOL
    )
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(
        infer_call(layer, x),
        np_batch_norm(x, moving_mean, moving_var, gamma, 0.0, epsilon),
        **TOL,
    )


@pytest.mark.parametrize("shape, kwargs, path", list(_cases_and_paths()))
def test_matches_keras_peer_layer_over_several_training_calls(
    rng, force_path, shape, kwargs, path
):
    if isinstance(kwargs.get("axis"), list):
        pytest.skip("keras.layers.BatchNormalization takes one axis")
    force_path(path)
    assert_matches_keras_peer(
        rng,
        shape,
        kwargs,
        f"JAX fast path weights vs Keras ({path})",
        train=train_call,
        infer=infer_call,
    )


def test_gradients_match_central_finite_differences_in_float64():
    # float64 needs jax_enable_x64, set before any array exists: a fresh process.
    out = _run(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np
        from kerasbn.backends import jax as jb

        rng = np.random.default_rng(0)
        worst = 0.0
        for shape, axes in [((5, 3, 4), [0, 2]), ((7, 2, 3), [0, 1]), ((6, 4), [0])]:
            gshape = [1 if a in axes else s for a, s in enumerate(shape)]
            x = jnp.asarray(rng.normal(3.0, 2.0, shape))
            g, b = (jnp.asarray(rng.normal(size=gshape)) for _ in range(2))
            dy = jnp.asarray(rng.normal(size=shape))
            plan = jb.formulation(shape, axes, dtype="float64")
            assert plan.formulation == "shifted"

            def loss(x, g, b):
                y, mean, var = jb.batch_normalize(x, plan, g, b, 1e-3)
                assert y.dtype == jnp.float64
                return jnp.sum(y * dy)

            analytic = jax.grad(loss, argnums=(0, 1, 2))(x, g, b)
            for arg, grad in enumerate(analytic):
                args = [x, g, b]
                flat = np.asarray(args[arg]).ravel()
                numeric = np.zeros_like(flat)
                h = 1e-6
                for i in range(flat.size):
                    for sign in (1, -1):
                        moved = flat.copy()
                        moved[i] += sign * h
                        args[arg] = jnp.asarray(moved.reshape(grad.shape))
                        numeric[i] += sign * float(loss(*args)) / (2 * h)
                error = np.max(np.abs(np.asarray(grad).ravel() - numeric))
                worst = max(worst, error / max(1.0, np.max(np.abs(numeric))))
        print(worst)
        """
    )
    assert float(out.split()[-1]) < 1e-7


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape, axis", [((16, 6, 6, 16), -1), ((16, 6, 6, 10), 1)])
def test_statistics_stay_exact_when_the_mean_dwarfs_the_spread(
    rng, force_path, path, shape, axis
):
    # float32 can hold a mean of 1e4 only to 5e-4, a twentieth of the spread;
    # the statistics must not inherit that rounding.
    force_path(path)
    layer = kerasbn.BatchNorm(axis=axis, momentum=0.0, epsilon=1e-5)
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    y, grads = train_call(layer, x, dy)
    channel_axes = _channel_axes(shape, axis)
    mean, var = np_moments(x, channel_axes)
    np.testing.assert_allclose(layer.moving_mean, mean.ravel(), rtol=1e-7)
    np.testing.assert_allclose(layer.moving_variance, var.ravel(), rtol=1e-5)
    record(
        f"JAX variance, mean 1e4 spread 1e-2 ({path})",
        layer.moving_variance,
        var.ravel(),
    )
    if path == "generic":
        # kerasbn.formulas forms x * scale + offset: its output inherits the
        # rounding of the mean
        return
    # the fast path normalizes x - shift, which is exact: its output and
    # gradients do not inherit the mean's rounding either
    np.testing.assert_allclose(
        y, np_batch_norm(x, mean, var, epsilon=1e-5), rtol=1e-4, atol=1e-4
    )
    record(
        f"JAX output, mean 1e4 spread 1e-2 ({path})",
        y,
        np_batch_norm(x, mean, var, epsilon=1e-5),
    )
    dx, dgamma, dbeta = np_batch_norm_gradients(x, dy, 1.0, channel_axes, 1e-5)
    np.testing.assert_allclose(grads[0], dx, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(grads[1], dgamma.ravel(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(grads[2], dbeta.ravel(), rtol=1e-5, atol=1e-4)
    record(f"JAX dx, mean 1e4 spread 1e-2 ({path})", grads[0], dx)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("value", CONSTANT_VALUES)
@pytest.mark.parametrize("shape, axis", CONSTANT_CHANNEL_CASES)
@pytest.mark.parametrize("path", PATHS)
def test_a_constant_channel_normalizes_to_zero_at_any_magnitude(
    rng, force_path, path, shape, axis, value, dtype
):
    force_path(path)
    assert_constant_channel_normalizes_to_zero(
        rng, shape, axis, value, dtype, f"JAX constant channel |y| ({path})"
    )


@pytest.mark.parametrize("spreads", [0.5, 0.9, 1.1, 3.0])
def test_rough_statistics_hold_float32_precision_near_the_far_mean_limit(
    rng, force_path, spreads
):
    # The rough statistics come from the sums of x and x * x: their relative
    # error grows like (1 + (mean / std)**2) * eps, at most about 1e-6 below
    # ROUGH_MAX_MEAN_SPREADS; beyond it the shifted statistics take over.
    force_path("rough")
    shape = (64, 16, 16, 8)
    far = jax_backend.ROUGH_MAX_MEAN_SPREADS
    x = (spreads * far + rng.standard_normal(shape)).astype("float32")
    dy = rng.standard_normal(shape).astype("float32")
    layer = kerasbn.BatchNorm(momentum=0.0)
    y, grads = train_call(layer, x, dy)
    mean, var = np_moments(x, [3])
    np.testing.assert_allclose(layer.moving_mean, mean.ravel(), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, var.ravel(), rtol=5e-6)
    record(
        "JAX rough variance near ROUGH_MAX_MEAN_SPREADS (relative)",
        layer.moving_variance / var.ravel(),
        1.0,
    )
    np.testing.assert_allclose(y, np_batch_norm(x, mean, var), atol=1e-5)
    dx, dgamma, dbeta = np_batch_norm_gradients(x, dy, 1.0, [3], 1e-3)
    np.testing.assert_allclose(grads[0], dx, atol=1e-5 * np.max(np.abs(dx)))
    np.testing.assert_allclose(grads[1], dgamma, atol=1e-5 * np.max(np.abs(dgamma)))
    np.testing.assert_allclose(grads[2], dbeta, rtol=1e-5, atol=1e-3)


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
        assert _name(_plan(jnp.zeros(shape, low), [0, 1, 2])) == path
    x = jnp.asarray(rng.normal(3.0, 2.0, shape), low)
    dy = rng.normal(size=shape).astype("float32")
    y, grads = train_call(layer, x, dy)
    assert y.dtype == low and grads[0].dtype == low
    assert all(w.dtype == "float32" for w in layer.weights)
    x64 = np.asarray(x.astype("float32"), np.float64)
    mean, var = np_moments(x64, [3])
    np.testing.assert_allclose(layer.moving_mean, mean.ravel(), **TOL)
    np.testing.assert_allclose(layer.moving_variance, var.ravel(), **TOL)
    # the outputs are rounded to the compute dtype: 8 (bfloat16) or 11 bits
    tol = dict(rtol=1e-2, atol=1e-2) if low == "bfloat16" else dict(atol=2e-3)
    np.testing.assert_allclose(
        np.asarray(y.astype("float32")), np_batch_norm(x64, mean, var), **tol
    )
    dx = np_batch_norm_gradients(x64, dy, 1.0, [3], 1e-3)[0]
    np.testing.assert_allclose(np.asarray(grads[0].astype("float32")), dx, **tol)


@pytest.mark.parametrize("path", PATHS)
def test_float16_inputs_near_6e4_give_finite_float32_statistics(rng, force_path, path):
    force_path(path)
    layer = kerasbn.BatchNorm(dtype="mixed_float16", momentum=0.0)
    x = jnp.asarray(rng.uniform(6e4, 6.5e4, (16, 4, 4, 8)), "float16")
    y, grads = train_call(layer, x, np.ones(x.shape, "float32"))
    assert np.all(np.isfinite(np.asarray(y))) and np.all(np.isfinite(grads[0]))
    mean, var = np_moments(np.asarray(x, np.float64), [3])
    assert layer.moving_mean.dtype == "float32"
    np.testing.assert_allclose(layer.moving_mean, mean.ravel(), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, var.ravel(), rtol=1e-4)
    assert np.all(np.isfinite(np.asarray(infer_call(layer, x))))


def test_batch_normalize_returns_statistics_without_gradient(rng):
    x = jnp.asarray(rng.normal(size=(6, 3)), "float32")

    plan = jax_backend.formulation(x.shape, [0])

    def loss(x):
        _, mean, variance = jax_backend.batch_normalize(x, plan, None, None, 1e-3)
        return jnp.sum(mean) + jnp.sum(variance)

    np.testing.assert_array_equal(jax.grad(loss)(x), np.zeros((6, 3)))


# ------------------------------------------------------------------------ fit
@pytest.mark.parametrize("path", PATHS)
def test_fit_compiled_with_jit_matches_numpy(rng, force_path, path):
    force_path(path)
    model = keras.Sequential([keras.Input((4, 4, 8)), kerasbn.BatchNorm(momentum=0.0)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=True)
    x = rng.normal(3.0, 2.0, (16, 4, 4, 8)).astype("float32")
    model.fit(x, np.zeros_like(x), batch_size=16, verbose=0)
    mean, var = np_moments(x, [3])
    np.testing.assert_allclose(model.layers[0].moving_mean, mean.ravel(), **TOL)
    np.testing.assert_allclose(model.layers[0].moving_variance, var.ravel(), **TOL)
    predicted = model.predict(x, verbose=0)
    np.testing.assert_allclose(predicted, np_batch_norm(x, mean, var), **TOL)


def test_fit_trains_a_conv_net_as_keras_bn_does(rng):
    def build(norm):
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((8, 8, 2)),
                keras.layers.Conv2D(6, 3),
                norm(momentum=0.5),
                keras.layers.Activation("relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(3),
            ]
        )

    x = rng.normal(1.0, 2.0, (32, 8, 8, 2)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")
    models = [build(kerasbn.BatchNorm), build(keras.layers.BatchNormalization)]
    for model in models:
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for w, w_ref in zip(models[0].get_weights(), models[1].get_weights()):
        np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-5)
        record("JAX fit conv net weights vs Keras", w, w_ref)


@pytest.mark.parametrize(
    "shape, axis", [((8, 6, 6, 16), -1), ((8, 16, 6, 6), 1), ((32, 100), -1)]
)
def test_inference_compiles_to_the_program_of_keras_bn(shape, axis):
    ours, peer = (
        kerasbn.BatchNorm(axis=axis),
        keras.layers.BatchNormalization(axis=axis),
    )
    ours.build(shape)
    peer.build(shape)
    assert xla_programs.inference_ops(ours, shape) == xla_programs.inference_ops(
        peer, shape
    )


@pytest.mark.parametrize("shape", [(32, 100), (32, 8, 8, 20), (256, 1024)])
def test_train_step_with_its_finiteness_guard_compiles_to_no_more_kernels_than_keras_bn(
    shape,
):
    ours, peer = kerasbn.BatchNorm(), keras.layers.BatchNormalization()
    ours.build(shape)
    peer.build(shape)
    ours = xla_programs.train_step_ops(ours, shape)
    peer = xla_programs.train_step_ops(peer, shape)
    assert len(ours) <= len(peer), (ours, peer)
