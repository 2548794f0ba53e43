"""The PyTorch fast path against NumPy, finite differences and Keras's BN on torch.

Every numeric test runs the layer with each of the fast path's formulations
forced ("channels_last": 4-D/5-D channels-last inputs permuted to PyTorch's
channels_last memory format; "rows": channels-last inputs as a (rows, C)
matrix; "planes": (outer, C, inner); "matvec": the (rows, C) matrix summed
by matrix-vector products) and with the fast path switched off
("generic", kerasbn.formulas). All are held to the same independent references,
so the fast path gives the generic path's numbers.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":
    pytest.skip(
        "the PyTorch fast path runs on the torch backend only",
        allow_module_level=True,
    )

import torch  # noqa: E402
from conftest import (  # noqa: E402
    CONSTANT_CHANNEL_CASES,
    CONSTANT_VALUES,
    assert_constant_channel_normalizes_to_zero,
    assert_implements_kernel_contract,
    assert_matches_keras_peer,
    force_formulation,
    np_batch_norm,
    np_moments,
    record,
)

import kerasbn  # noqa: E402
from kerasbn import backends  # noqa: E402
from kerasbn.backends import torch as torch_backend  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)

# (id, input shape, layer kwargs); every case is one the fast path accepts.
CASES = [
    ("2d", (24, 6), {}),
    ("4d_nhwc", (6, 5, 4, 8), {}),
    ("channels_first", (6, 8, 5, 4), dict(axis=1)),
    ("3d_channels_last", (6, 7, 5), {}),
    ("5d", (3, 4, 3, 5, 8), {}),
    ("list_axes_last", (6, 5, 4, 3), dict(axis=[2, 3])),
    ("list_axes_middle", (6, 4, 3, 5), dict(axis=[1, 2])),
    ("no_center_no_scale", (6, 5, 4, 8), dict(center=False, scale=False)),
    ("no_center", (24, 6), dict(center=False, momentum=0.5)),
    ("no_scale", (6, 5, 4, 8), dict(scale=False, epsilon=0.1)),
    ("4d_ten_channels", (8, 6, 5, 10), {}),
]
PATHS = ["channels_last", "rows", "matvec", "planes", "generic"]


def _channel_axes(shape, axis):
    axes = axis if isinstance(axis, list) else [axis]
    return sorted(a % len(shape) for a in axes)


def _path_fits(path, shape, channel_axes):
    """Whether ``path`` can view an input of ``shape`` with these channel axes."""
    rank, last = len(shape), channel_axes[-1] == len(shape) - 1
    if path == "channels_last":
        return last and len(channel_axes) == 1 and rank in (4, 5)
    if path in ("rows", "matvec"):
        return last
    return True


def _cases_and_paths():
    for name, shape, kwargs in CASES:
        channel_axes = _channel_axes(shape, kwargs.get("axis", -1))
        for path in PATHS:
            if _path_fits(path, shape, channel_axes):
                yield pytest.param(shape, kwargs, path, id=f"{name}-{path}")


@pytest.fixture
def force_path(monkeypatch):
    """``force_path(path)``: make the layer compute with ``path`` from now on."""

    def force(path):
        force_formulation(
            monkeypatch, torch_backend, None if path == "generic" else path
        )

    return force


def _plan(x, axes, mask=None, training=True):
    return backends.plan(x, axes, mask, epsilon=1e-3, training=training)


def train_call(layer, x, upstream):
    """The output and the gradients of ``sum(y * upstream)`` with respect to
    ``x`` and the layer's trainable weights, by torch autograd."""
    x = torch.as_tensor(x).clone().requires_grad_(True)
    y = layer(x, training=True)
    weights = [w.value for w in layer.trainable_weights]
    grads = torch.autograd.grad(y, [x, *weights], torch.as_tensor(upstream))
    return y.detach(), [g.detach() for g in grads]


def reference_gradients(x, dy, gamma, channel_axes, epsilon):
    """Float64 gradients of ``sum(BN(x) * dy)`` w.r.t. x, gamma and beta.

    The formula itself, written in plain float64 torch ops and differentiated
    by torch autograd (checked against finite differences below).
    """
    x = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    gamma = torch.tensor(np.asarray(gamma, np.float64), requires_grad=True)
    beta = torch.zeros_like(gamma, requires_grad=True)
    y = _formula(x, gamma, beta, channel_axes, epsilon)
    dy = torch.tensor(np.asarray(dy, np.float64))
    dx, dgamma, dbeta = torch.autograd.grad(y, [x, gamma, beta], dy)
    return dx.numpy(), dgamma.numpy(), dbeta.numpy()


def _formula(x, gamma, beta, channel_axes, epsilon):
    axes = [a for a in range(x.dim()) if a not in channel_axes]
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    return gamma * (x - mean) / torch.sqrt(var + epsilon) + beta


def _to_numpy(t):
    """A tensor as a NumPy array (float32, or float64 for float64 tensors)."""
    t = t.detach().cpu()
    return t.numpy() if t.dtype == torch.float64 else t.float().numpy()


# ------------------------------------------------------------------- selection
def test_module_implements_the_kernel_contract():
    assert_implements_kernel_contract(torch_backend)
    assert backends.current() is torch_backend


@pytest.mark.parametrize(
    "shape, axes, dtype, expected",
    [
        ((16, 6), [0], torch.float32, "rows"),
        ((4, 5, 6), [0, 1], torch.float32, "rows"),
        ((4, 5, 5, 8), [0, 1, 2], torch.float32, "channels_last"),
        ((4, 8, 5, 5), [0, 2, 3], torch.float32, "planes"),
        ((2, 3, 4, 5, 8), [0, 1, 2, 3], torch.float32, "channels_last"),
        ((4, 5, 5, 8), [0, 1], torch.float32, "rows"),  # channel axes [2, 3]
        ((4, 5, 5, 8), [0, 3], torch.float32, "planes"),  # channel axes [1, 2]
        ((4, 5, 5, 8), [0, 1, 2], torch.float16, "channels_last"),
        ((4, 5, 5, 8), [0, 1, 2], torch.bfloat16, "channels_last"),
        ((16, 6), [0], torch.float64, "rows"),
        ((32, 24, 24, 10), [0, 1, 2], torch.float32, "matvec"),  # lecture CNN
        ((16, 16, 16, 20), [0, 1, 2], torch.float32, "matvec"),  # 4,096 rows
        ((8, 16, 16, 20), [0, 1, 2], torch.float32, "channels_last"),
        ((32, 24, 24, 16), [0, 1, 2], torch.float32, "channels_last"),  # 2 x 8
        ((4096, 100), [0], torch.float32, "rows"),
    ],
)
def test_fast_path_is_selected_for_the_calls_it_claims(shape, axes, dtype, expected):
    x = torch.zeros(shape, dtype=dtype)
    assert _plan(x, axes).formulation == expected
    assert torch_backend.formulation(shape, axes).formulation == expected


@pytest.mark.parametrize(
    "shape, axes, dtype, masked",
    [
        ((16, 6), [0], torch.int32, False),
        ((16, 6), [0], torch.bool, False),
        ((0, 6), [0], torch.float32, False),
        ((4, 5, 5, 8), [0, 1, 2], torch.float32, True),
        ((4, 5, 5, 8), [0, 2], torch.float32, False),  # channel axes [1, 3]
        ((2, 4, 5, 5, 8), [0, 2, 3], torch.float32, False),  # ghost-batch grouping
    ],
)
def test_fast_path_declines_masks_integers_empty_and_split_channel_axes(
    shape, axes, dtype, masked
):
    x = torch.zeros(shape, dtype=dtype)
    mask = torch.ones(shape[:-1] + (1,), dtype=torch.bool) if masked else None
    assert _plan(x, axes, mask) is None
    assert _plan(x, axes, mask, training=False) is None


def test_fast_path_declines_what_is_not_a_torch_tensor():
    assert _plan(np.zeros((4, 3), "float32"), [0]) is None


def test_layer_calls_the_fast_path_in_training_and_inference(rng, monkeypatch):
    calls = []
    for name in ("batch_normalize", "normalize"):
        original = getattr(torch_backend, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch_backend, name, spy)
    layer = kerasbn.BatchNorm()
    x = rng.normal(size=(8, 4, 4, 3)).astype("float32")
    layer(x, training=True)
    layer(x, training=False)
    assert calls == ["batch_normalize", "normalize"]


@pytest.mark.parametrize(
    "shape, device, k",
    [
        ((32, 24, 24, 10), "cpu:avx512", 8),  # 80 lanes: five 16-lane vectors
        ((32, 24, 24, 10), "cpu:avx2", 4),  # 40 lanes: five 8-lane vectors
        ((16, 16, 16, 20), "cpu:avx512", 4),
        ((3, 7, 5), "cpu:avx512", 1),  # 21 rows: no power of two divides them
        ((6, 5, 12), "cpu:avx512", 2),  # 30 rows: 4 does not divide them
        ((32, 24, 24, 10), "cpu:other", 1),  # unmeasured: never widened
    ],
)
def test_matvec_view_is_widened_to_whole_vectors(shape, device, k):
    axes = list(range(len(shape) - 1))
    plan = torch_backend.formulation(shape, axes, device=device).using("matvec")
    x = torch.randn(shape)
    view = torch_backend._kernel_view(x, plan)
    assert tuple(view.shape) == (x.numel() // (k * shape[-1]), k * shape[-1])
    assert view.data_ptr() == x.data_ptr()
    inference = torch_backend.formulation(shape, axes, training=False, device=device)
    assert (
        torch_backend._kernel_view(x, inference.using("matvec")).shape[1] == shape[-1]
    )


def test_views_of_channels_last_inputs_copy_nothing():
    x = torch.randn(4, 5, 6, 8)
    plan = torch_backend.formulation(x.shape, [0, 1, 2])
    kernel_input = torch_backend._kernel_view(x, plan)
    assert kernel_input.data_ptr() == x.data_ptr()
    assert kernel_input.is_contiguous(memory_format=torch.channels_last)
    assert tuple(kernel_input.shape) == (4, 8, 5, 6)


# ------------------------------------------------------------------ references
def test_reference_gradients_match_central_finite_differences():
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(1, 3, 1, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(1, 3, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, g, b: _formula(x, g, b, [1], 1e-3), (x, gamma, beta)
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "shape, axes",
    [((6, 5), [0]), ((4, 3, 2, 5), [0, 1, 2]), ((4, 5, 3, 2), [0, 2, 3])],
)
def test_gradients_match_finite_differences_in_float64(path, shape, axes, force_path):
    channel_axes = [a for a in range(len(shape)) if a not in axes]
    if not _path_fits(path, shape, channel_axes):
        pytest.skip(f"{path} does not view this input")
    force_path(path)
    stats_shape = [d if a in channel_axes else 1 for a, d in enumerate(shape)]
    generator = torch.Generator().manual_seed(0)

    def tensor(shape):
        t = torch.randn(shape, generator=generator, dtype=torch.float64)
        return t.requires_grad_(True)

    x, gamma, beta = tensor(shape), tensor(stats_shape), tensor(stats_shape)
    plan = _plan(x, axes)
    assert (plan is None) == (path == "generic")
    assert plan is None or plan.formulation == path
    assert torch.autograd.gradcheck(
        lambda x, g, b: backends.batch_normalize(x, axes, g, b, 1e-3)[0],
        (x, gamma, beta),
    )
    mean, var = (
        torch.randn(stats_shape, dtype=torch.float64),
        torch.rand(stats_shape, dtype=torch.float64),
    )
    assert torch.autograd.gradcheck(
        lambda x, g, b: backends.normalize(x, axes, mean, var, g, b, 1e-3),
        (x, gamma, beta),
    )


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
    gamma = _to_numpy(layer.gamma.value).reshape(stats_shape) if layer.scale else 1.0
    beta = 0.0  # beta starts at zero and a training call leaves it there
    moving_mean, moving_var = np.zeros(stats_shape), np.ones(stats_shape)
    for step in range(3):
        x = rng.normal(step - 1.0, 1.0 + step, shape).astype("float32")
        dy = rng.normal(size=shape).astype("float32")
        y, grads = train_call(layer, x, dy)
        mean, var = np_moments(x, channel_axes)
        np.testing.assert_allclose(
            y, np_batch_norm(x, mean, var, gamma, beta, epsilon), **TOL
        )
        dx, dgamma, dbeta = reference_gradients(
            x, dy, np.broadcast_to(gamma, stats_shape), channel_axes, epsilon
        )
        np.testing.assert_allclose(grads[0], dx, **TOL)
        expected = ([dgamma] if layer.scale else []) + ([dbeta] if layer.center else [])
        for g, ref in zip(grads[1:], expected):
            np.testing.assert_allclose(g, ref.reshape(g.shape), **TOL)
            record(
                f"torch fast path gradients vs NumPy ({path})", g, ref.reshape(g.shape)
            )
        record(f"torch fast path dx vs NumPy ({path})", grads[0], dx)
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
        _to_numpy(layer(x)),
        np_batch_norm(x, moving_mean, moving_var, gamma, 0.0, epsilon),
        **TOL,
    )


@pytest.mark.parametrize("shape, kwargs, path", list(_cases_and_paths()))
def test_matches_keras_peer_layer_over_several_training_calls(
    rng, force_path, shape, kwargs, path
):
    if isinstance(kwargs.get("axis"), list) and len(kwargs["axis"]) > 1:
        pytest.skip("keras.layers.BatchNormalization takes one axis")
    force_path(path)
    assert_matches_keras_peer(
        rng,
        shape,
        kwargs,
        f"torch fast path weights vs Keras ({path})",
        train=train_call,
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "shape, axis", [((16, 6, 6, 16), -1), ((16, 6, 6, 10), 1), ((512, 12), -1)]
)
def test_statistics_stay_exact_when_the_mean_dwarfs_the_spread(
    rng, force_path, path, shape, axis
):
    # float32 can hold a mean of 1e4 only to 5e-4, a twentieth of the spread;
    # the statistics must not inherit that rounding (PyTorch's kernel alone
    # gives variances 0.2% to 2% too large here).
    channel_axes = _channel_axes(shape, axis)
    if not _path_fits(path, shape, channel_axes):
        pytest.skip(f"{path} does not view this input")
    force_path(path)
    layer = kerasbn.BatchNorm(axis=axis, momentum=0.0, epsilon=1e-5)
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype("float32")
    layer(x, training=True)
    mean, var = np_moments(x, channel_axes)
    np.testing.assert_allclose(layer.moving_mean, mean.ravel(), rtol=1e-7)
    np.testing.assert_allclose(layer.moving_variance, var.ravel(), rtol=1e-5)
    record(
        f"torch variance, mean 1e4 spread 1e-2 ({path})",
        layer.moving_variance,
        var.ravel(),
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("value", CONSTANT_VALUES)
@pytest.mark.parametrize("shape, axis", CONSTANT_CHANNEL_CASES)
@pytest.mark.parametrize("path", PATHS)
def test_a_constant_channel_normalizes_to_zero_at_any_magnitude(
    rng, force_path, path, shape, axis, value, dtype
):
    # The kernel's float32 mean of a constant 9984 is off by an ulp, which
    # 1 / sqrt(1e-5) made |y| = 0.117; the shifted input gives 0 exactly.
    if not _path_fits(path, shape, [axis % len(shape)]):
        pytest.skip(f"{path} does not view this input")
    force_path(path)
    assert_constant_channel_normalizes_to_zero(
        rng, shape, axis, value, dtype, f"torch constant channel |y| ({path})"
    )


def test_variance_below_epsilon_is_not_lost_to_it(rng):
    # A variance of 1e-8 next to epsilon 1e-3: the kernel's inverse deviation
    # 1 / sqrt(var + eps) holds it only to 1e-2 relative; the layer must not.
    layer = kerasbn.BatchNorm(momentum=0.0)
    x = (3.0 + 1e-4 * rng.standard_normal((64, 5))).astype("float32")
    layer(x, training=True)
    _, var = np_moments(x, [1])
    np.testing.assert_allclose(layer.moving_variance, var.ravel(), rtol=1e-5)


def test_non_finite_batch_leaves_the_moving_statistics_unchanged(rng):
    layer = kerasbn.BatchNorm(momentum=0.5)
    x = rng.normal(size=(8, 4, 4, 3)).astype("float32")
    layer(x, training=True)
    before = [w.copy() for w in layer.get_weights()]
    x[0, 0, 0, 1] = np.nan
    y = layer(x, training=True)
    assert np.isnan(_to_numpy(y)[..., 1]).all()
    for w, w_before in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(w, w_before)


def test_statistics_carry_no_gradient_and_non_contiguous_inputs_work(rng):
    x = torch.as_tensor(rng.normal(size=(6, 8, 5, 4)).astype("float32"))
    x = x.permute(0, 2, 3, 1).requires_grad_(True)  # a channels-last view
    plan = torch_backend.formulation(x.shape, [0, 1, 2])
    y, mean, var = torch_backend.batch_normalize(x, plan, None, None, 1e-3)
    assert not mean.requires_grad and not var.requires_grad
    ref_mean, ref_var = np_moments(x.detach().numpy(), [3])
    np.testing.assert_allclose(mean, ref_mean, **TOL)
    np.testing.assert_allclose(var, ref_var, **TOL)
    np.testing.assert_allclose(
        y.detach(), np_batch_norm(x.detach().numpy(), ref_mean, ref_var), **TOL
    )


def test_statistics_that_require_a_gradient_take_the_generic_inference_path(rng):
    x = torch.as_tensor(rng.normal(size=(6, 4)))
    mean = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    var = torch.ones(1, 4, dtype=torch.float64, requires_grad=True)
    plan = torch_backend.formulation(x.shape, [0], training=False)
    y = torch_backend.normalize(x, plan, mean, var, None, None, 1e-3)
    dmean, dvar = torch.autograd.grad(y.sum(), [mean, var])
    # d/dmean sum((x - mean) / sqrt(var + eps)) = -n / sqrt(var + eps)
    np.testing.assert_allclose(dmean, np.full((1, 4), -6 / np.sqrt(1.001)))
    expected_dvar = -0.5 * x.numpy().sum(axis=0, keepdims=True) / 1.001**1.5
    np.testing.assert_allclose(dvar, expected_dvar)


def test_float64_layer_matches_numpy_to_float64_rounding(rng):
    layer = kerasbn.BatchNorm(
        dtype="float64", momentum=0.0, gamma_initializer="random_normal"
    )
    shape = (8, 5, 4, 6)
    layer.build(shape)
    x = rng.normal(2.0, 3.0, shape)
    dy = rng.normal(size=shape)
    assert _plan(torch.as_tensor(x), [0, 1, 2]) is not None
    y, grads = train_call(layer, x, dy)
    assert y.dtype == torch.float64
    mean, var = np_moments(x, [3])
    gamma = layer.gamma.numpy().reshape(1, 1, 1, 6)
    np.testing.assert_allclose(
        y, np_batch_norm(x, mean, var, gamma), rtol=1e-12, atol=1e-12
    )
    dx, dgamma, dbeta = reference_gradients(x, dy, gamma, [3], 1e-3)
    np.testing.assert_allclose(grads[0], dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads[1], dgamma.ravel(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, var.ravel(), rtol=1e-12)


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
    low = getattr(torch, layer.compute_dtype)
    if path != "generic":
        x = torch.zeros(shape, dtype=low)
        assert _plan(x, [0, 1, 2]).formulation == path
    x = torch.as_tensor(rng.normal(3.0, 2.0, shape)).to(low)
    dy = torch.as_tensor(rng.normal(size=shape)).to(low)
    y, grads = train_call(layer, x, dy)
    assert y.dtype == low and grads[0].dtype == low
    assert all(w.dtype == "float32" for w in layer.weights)
    x64 = x.double().numpy()
    mean, var = np_moments(x64, [3])
    np.testing.assert_allclose(layer.moving_mean, mean.ravel(), **TOL)
    np.testing.assert_allclose(layer.moving_variance, var.ravel(), **TOL)
    # the outputs are rounded to the compute dtype: 8 (bfloat16) or 11 bits
    tol = dict(rtol=1e-2, atol=1e-2) if low == torch.bfloat16 else dict(atol=2e-3)
    np.testing.assert_allclose(y.float(), np_batch_norm(x64, mean, var), **tol)
    dx = reference_gradients(
        x64, dy.double().numpy(), np.ones((1, 1, 1, 8)), [3], 1e-3
    )[0]
    np.testing.assert_allclose(grads[0].float(), dx, **tol)


@pytest.mark.parametrize("path", PATHS)
def test_float16_inputs_near_6e4_give_finite_float32_statistics(rng, force_path, path):
    force_path(path)
    layer = kerasbn.BatchNorm(dtype="mixed_float16", momentum=0.0)
    x = torch.as_tensor(rng.uniform(6e4, 6.5e4, (16, 4, 4, 8)).astype("float16"))
    y, grads = train_call(layer, x, torch.ones_like(x))
    assert torch.isfinite(y).all() and torch.isfinite(grads[0]).all()
    mean, var = np_moments(x.double().numpy(), [3])
    assert layer.moving_mean.dtype == "float32"
    np.testing.assert_allclose(layer.moving_mean, mean.ravel(), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, var.ravel(), rtol=1e-4)
    assert torch.isfinite(layer(x)).all()


# ------------------------------------------------------------------ fit
@pytest.mark.parametrize("path", ["channels_last", "rows", "matvec", "planes"])
def test_fit_of_a_functional_model_matches_numpy(rng, force_path, path):
    # Building the model traces the layer on the "meta" device, where no
    # statistic can be read; fit() then runs it eagerly.
    force_path(path)
    model = keras.Sequential([keras.Input((4, 4, 8)), kerasbn.BatchNorm(momentum=0.0)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = (1e3 + rng.normal(0.0, 2.0, (16, 4, 4, 8))).astype("float32")
    model.fit(x, np.zeros_like(x), batch_size=16, verbose=0)
    mean, var = np_moments(x, [3])
    np.testing.assert_allclose(model.layers[0].moving_mean, mean.ravel(), rtol=1e-7)
    np.testing.assert_allclose(model.layers[0].moving_variance, var.ravel(), **TOL)
    predicted = model.predict(x, verbose=0)
    # x * scale + offset rounds to float32 near x * scale = 500: 3e-5
    expected = np_batch_norm(x, mean, var)
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-4)


def test_scalar_gamma_and_beta_apply_to_every_channel(rng):
    x = rng.normal(1.0, 2.0, (6, 5, 4)).astype("float32")
    plan = torch_backend.formulation(x.shape, [0, 1])
    y, mean, var = torch_backend.batch_normalize(
        torch.as_tensor(x), plan, torch.tensor(1.5), 0.25, 1e-3
    )
    ref_mean, ref_var = np_moments(x, [2])
    np.testing.assert_allclose(y, np_batch_norm(x, ref_mean, ref_var, 1.5, 0.25), **TOL)
    np.testing.assert_allclose(var, ref_var, **TOL)
