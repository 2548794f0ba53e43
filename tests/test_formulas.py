"""kerasbn.formulas against NumPy, float64, finite differences and closed forms."""

import keras
import numpy as np
import pytest
from conftest import float64, np_batch_norm, np_moments, to_numpy

from kerasbn import formulas

_np = to_numpy


@pytest.mark.parametrize(
    "shape, channel_axes",
    [
        ((16, 3), [1]),
        ((4, 5, 6, 3), [3]),
        ((4, 3, 5, 6), [1]),
        ((2, 3, 4, 5, 6), [1, 4]),
    ],
)
def test_moments_match_numpy(rng, shape, channel_axes):
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    axes = [a for a in range(len(shape)) if a not in channel_axes]
    mean, var = formulas.moments(x, axes)
    ref_mean, ref_var = np_moments(x, channel_axes)
    np.testing.assert_allclose(_np(mean), ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(var), ref_var, rtol=1e-5, atol=1e-5)


def test_masked_moments_ignore_masked_values_even_nan(rng):
    x = rng.normal(size=(6, 7, 4)).astype("float32")
    mask = rng.random((6, 7, 1)) > 0.4
    x_dirty = np.where(mask, x, np.nan).astype("float32")
    mean, var = formulas.moments(x_dirty, [0, 1], mask)
    ref_mean, ref_var = np_moments(x, [2], mask)
    np.testing.assert_allclose(_np(mean), ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(var), ref_var, rtol=1e-5, atol=1e-6)


def test_fully_masked_moments_are_zero_and_finite(rng):
    x = rng.normal(size=(5, 3)).astype("float32")
    mean, var = formulas.moments(x, [0], np.zeros((5, 1), bool))
    np.testing.assert_array_equal(_np(mean), 0.0)
    np.testing.assert_array_equal(_np(var), 0.0)


def test_moments_stay_accurate_for_large_mean_and_small_spread(rng):
    # float32 data with mean 1e4 and std 1e-2; a naive E[x^2] - E[x]^2 or an
    # unshifted float32 sum loses the variance completely at this size.
    x = (1e4 + 1e-2 * rng.standard_normal((64, 56, 56, 4))).astype("float32")
    _, var = formulas.moments(x, [0, 1, 2])
    _, ref_var = np_moments(x, [3])
    assert np.max(np.abs(_np(var) - ref_var) / ref_var) <= 1e-3


def test_variance_is_never_negative(rng):
    x = np.full((33, 2), 0.1, "float32") + rng.normal(0, 1e-9, (33, 2)).astype(
        "float32"
    )
    _, var = formulas.moments(x, [0])
    assert np.all(_np(var) >= 0.0)


def test_combine_moments_equals_moments_of_concatenation(rng):
    parts = [
        (1e4 + 1e-2 * rng.standard_normal((n, 3))).astype("float32")
        for n in (5, 0, 17, 1)
    ]
    moments = [formulas.sufficient_moments(p, [0]) for p in parts]
    stacked = formulas.Moments(*[keras.ops.stack(fields) for fields in zip(*moments)])
    merged = formulas.combine_moments(stacked)
    ref_mean, ref_var = np_moments(np.concatenate(parts), [1])
    assert float(_np(merged.count)[0, 0]) == 23.0
    np.testing.assert_allclose(_np(merged.mean), ref_mean, rtol=1e-6)
    np.testing.assert_allclose(_np(merged.variance), ref_var, rtol=1e-3)


def test_host_chan_merge_of_two_moments_matches_numpy_in_float64(rng):
    # The merge recalibration runs across batches: NumPy float64 arrays.
    a = rng.normal(1e4, 2.0, (10, 2))
    b = rng.normal(1e4 - 3.0, 0.5, (7, 2))
    empty = np.zeros((0, 2))

    def host_moments(x):
        count = np.full((1, 2), float(len(x)))
        shift = x[:1] if len(x) else np.zeros((1, 2))
        d = x - shift
        offset = d.sum(0, keepdims=True) / np.maximum(count, 1.0)
        m2 = ((d - offset) ** 2).sum(0, keepdims=True)
        return formulas.Moments(count, shift, offset, m2)

    merged = host_moments(a)
    for part in (b, empty):
        pair = formulas.Moments(*map(np.stack, zip(merged, host_moments(part))))
        merged = formulas.combine_moments(pair, xp=formulas.HOST)
    both = np.concatenate([a, b])
    assert merged.count.dtype == np.float64
    np.testing.assert_array_equal(merged.count, [[17.0, 17.0]])
    np.testing.assert_allclose(merged.mean, both.mean(0, keepdims=True), rtol=1e-14)
    np.testing.assert_allclose(
        merged.m2 / merged.count, both.var(0, keepdims=True), rtol=1e-11
    )


def test_host_inference_affine_is_the_folded_closed_form_in_float64(rng):
    # The affine that folding absorbs: gamma / sqrt(var + eps), beta - mean * it.
    mean, var = rng.normal(size=5), rng.random(5) + 0.1
    gamma, beta = rng.normal(size=5), rng.normal(size=5)
    scale, offset = formulas.affine_from_statistics(
        mean, var, gamma, beta, 1e-3, formulas.HOST
    )
    expected = gamma / np.sqrt(var + 1e-3)
    assert scale.dtype == np.float64
    np.testing.assert_allclose(scale, expected, rtol=1e-15)
    np.testing.assert_allclose(offset, beta - mean * expected, rtol=1e-14)
    scale, offset = formulas.affine_from_statistics(
        mean, var, None, None, 1e-3, formulas.HOST
    )
    np.testing.assert_allclose(scale, 1.0 / np.sqrt(var + 1e-3), rtol=1e-15)
    np.testing.assert_allclose(offset, -mean / np.sqrt(var + 1e-3), rtol=1e-14)


def test_kernel_formulas_give_numpy_statistics_and_the_gradients_of_bn(rng):
    # The per-channel formulas of the fast paths, in NumPy float64: forward
    # from the sums of d = x - shift and d * d, backward from the sums of dy
    # and dy * d; the gradients against central finite differences.
    x = rng.normal(50.0, 3.0, (40, 3))
    dy = rng.normal(size=(40, 3))
    gamma, beta, eps = rng.normal(size=3), rng.normal(size=3), 1e-3

    def forward(x, gamma, beta):
        d = x - x[:1]
        offset, variance = formulas.shifted_statistics(
            d.sum(0), (d * d).sum(0), len(x), formulas.HOST
        )
        inv = formulas.inverse_std(variance, eps, formulas.HOST)
        scale, bias = formulas.affine(inv, offset, gamma, beta)
        return formulas.normalized(d, scale, bias, formulas.HOST), (
            d,
            offset,
            variance,
            inv,
            scale,
        )

    y, (d, offset, variance, inv, scale) = forward(x, gamma, beta)
    np.testing.assert_allclose(x[0] + offset, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(variance, x.var(0), rtol=1e-12)
    np.testing.assert_allclose(
        y, np_batch_norm(x, x.mean(0), x.var(0), gamma, beta, eps), atol=1e-12
    )
    dgamma, dbeta, slope, constant = formulas.backward_coefficients(
        dy.sum(0), (dy * d).sum(0), len(x), offset, inv, scale
    )
    dx = formulas.input_gradient(dy, d, scale, slope, constant, formulas.HOST)

    def loss(x, gamma, beta):
        mean, var = x.mean(0), x.var(0)
        return np.sum(np_batch_norm(x, mean, var, gamma, beta, eps) * dy)

    for arg, analytic in ((0, dx), (1, dgamma), (2, dbeta)):
        args = [x, gamma, beta]
        numeric = np.zeros_like(args[arg])
        for i in np.ndindex(numeric.shape):
            for sign in (1.0, -1.0):
                moved = [a.copy() for a in args]
                moved[arg][i] += sign * 1e-6
                numeric[i] += sign * loss(*moved) / 2e-6
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_far_from_zero_and_the_bessel_factors():
    assert formulas.far_from_zero(np.array([3.1, -3.1, 2.9]), 1.0, 3.0).tolist() == [
        True,
        True,
        False,
    ]
    assert formulas.biased_variance(4.0, 4.0) == 3.0
    assert formulas.biased_variance(4.0, 1.0) == 0.0
    assert float(formulas.unbiased_variance(keras.ops.array(3.0), 4.0)) == 4.0


def test_shifted_moments_keep_float64():
    # 1e-18 is far below float32's resolution at 1.
    with float64():
        x = keras.ops.convert_to_tensor(np.array([[1.0], [1.0 + 2e-9]]), "float64")
        moments = formulas.sufficient_moments(x, [0])
        dtypes = {keras.backend.standardize_dtype(t.dtype) for t in moments}
        variance = _np(moments.variance)
    assert dtypes == {"float64"}
    np.testing.assert_allclose(variance, [[1e-18]], rtol=1e-6)


def test_normalize_matches_formula(rng):
    x = rng.normal(size=(8, 3)).astype("float32")
    mean, var = rng.normal(size=3), rng.random(3) + 0.5
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    y = formulas.normalize(
        *[keras.ops.convert_to_tensor(a, "float32") for a in (x, mean, var)],
        *[keras.ops.convert_to_tensor(a, "float32") for a in (gamma, beta)],
        1e-3,
    )
    np.testing.assert_allclose(
        _np(y), np_batch_norm(x, mean, var, gamma, beta, 1e-3), rtol=1e-5, atol=1e-5
    )


def test_batch_normalize_returns_output_and_batch_statistics(rng):
    x = rng.normal(4.0, 2.0, (32, 5)).astype("float32")
    y, mean, var = formulas.batch_normalize(x, [0], None, None, 1e-3)
    ref_mean, ref_var = np_moments(x, [1])
    np.testing.assert_allclose(_np(mean), ref_mean, rtol=1e-5)
    np.testing.assert_allclose(_np(var), ref_var, rtol=1e-5)
    np.testing.assert_allclose(
        _np(y), np_batch_norm(x, ref_mean, ref_var), rtol=1e-5, atol=1e-5
    )


def test_ema_update_uses_keras_momentum_convention():
    assert float(formulas.ema_update(10.0, 0.0, 0.9)) == pytest.approx(9.0)
    assert float(formulas.ema_update(10.0, 0.0, 0.0)) == 0.0


def test_all_finite_detects_nan_and_inf():
    assert bool(formulas.all_finite(np.ones(2), np.zeros(2)))
    big = np.full(2, 3e38, "float32")  # big + big overflows float32
    assert bool(formulas.all_finite(big, big))
    assert not bool(formulas.all_finite(np.ones(2), np.array([0.0, np.inf])))
    assert not bool(formulas.all_finite(np.array([-np.inf, 1.0]), np.zeros(2)))
    assert not bool(formulas.all_finite(np.array([np.nan])))


def test_renorm_correction_matches_closed_form():
    mean, var, eps = np.float32(2.0), np.float32(8.0), 1.0
    r, d = formulas.renorm_correction(mean, var, 1.0, 2.0, eps, {})
    assert float(r) == pytest.approx(3.0 / 2.0)
    assert float(d) == pytest.approx(0.5)
    r, d = formulas.renorm_correction(
        mean, var, 1.0, 2.0, eps, {"rmax": 1.2, "dmax": 0.25}
    )
    assert (float(r), float(d)) == pytest.approx((1.2, 0.25))


@pytest.mark.parametrize("size", [1, 20, 32, 33, 100, 1000, 2049])
def test_backend_all_finite_matches_numpy(size):
    from kerasbn import backends

    rng = np.random.default_rng(size)
    base = rng.normal(0.0, 1e30, size).astype("float32")
    cases = [base]
    for position in {0, size // 2, size - 1}:
        for bad in (np.nan, np.inf, -np.inf):
            case = base.copy()
            case[position] = bad
            cases.append(case)
    for case in cases:
        for first, second in ((case, base), (base, case)):
            expected = bool(np.isfinite(first).all() and np.isfinite(second).all())
            got = backends.all_finite(
                keras.ops.convert_to_tensor(first), keras.ops.convert_to_tensor(second)
            )
            assert bool(keras.ops.convert_to_numpy(got)) == expected


@pytest.mark.parametrize("usable", [True, False, [True, False, True]])
def test_backend_assign_where_assigns_only_where_usable(usable):
    from kerasbn import backends

    held = np.array([1.0, 2.0, 3.0], "float32")
    value = np.array([-1.0, np.nan, 7.5], "float32")
    variable = keras.Variable(held)
    current = variable.value
    condition = keras.ops.convert_to_tensor(np.array(usable))
    backends.assign_where(condition, [(variable, current, keras.ops.array(value))])
    expected = np.where(np.array(usable), value, held)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), expected)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99, 0.999, 1.0])
def test_backend_moving_average_is_kerass_to_float32_rounding(momentum):
    """``moving * momentum + value * (1 - momentum)`` in float64 NumPy, within
    two float32 roundings; the ends exactly: momentum 1 keeps ``moving``,
    momentum 0 takes ``value``."""
    from kerasbn import backends

    rng = np.random.default_rng(7)
    moving = (rng.normal(0, 1, 64) * 10.0 ** rng.integers(-6, 7, 64)).astype("float32")
    value = (rng.normal(0, 1, 64) * 10.0 ** rng.integers(-6, 7, 64)).astype("float32")
    got = backends.moving_average(
        keras.Variable(moving).value, keras.ops.convert_to_tensor(value), momentum
    )
    got = keras.ops.convert_to_numpy(got)
    assert got.dtype == np.float32
    m, v = moving.astype(np.float64), value.astype(np.float64)
    expected = m * momentum + v * (1.0 - momentum)
    scale = np.abs(m) * momentum + np.abs(v) * (1.0 - momentum)
    np.testing.assert_array_less(np.abs(got - expected), 2.5 * 2.0**-24 * scale + 1e-45)
    if momentum in (0.0, 1.0):
        np.testing.assert_array_equal(got, moving if momentum else value)
