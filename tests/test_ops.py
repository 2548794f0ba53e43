"""kerasbn.ops against NumPy and closed forms."""

import keras
import numpy as np
import pytest
from conftest import np_batch_norm, np_moments, to_numpy

from kerasbn import ops as bn_ops

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
    mean, var = bn_ops.moments(x, axes)
    ref_mean, ref_var = np_moments(x, channel_axes)
    np.testing.assert_allclose(_np(mean), ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(var), ref_var, rtol=1e-5, atol=1e-5)


def test_masked_moments_ignore_masked_values_even_nan(rng):
    x = rng.normal(size=(6, 7, 4)).astype("float32")
    mask = rng.random((6, 7, 1)) > 0.4
    x_dirty = np.where(mask, x, np.nan).astype("float32")
    mean, var = bn_ops.moments(x_dirty, [0, 1], mask)
    ref_mean, ref_var = np_moments(x, [2], mask)
    np.testing.assert_allclose(_np(mean), ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(var), ref_var, rtol=1e-5, atol=1e-6)


def test_fully_masked_moments_are_zero_and_finite(rng):
    x = rng.normal(size=(5, 3)).astype("float32")
    mean, var = bn_ops.moments(x, [0], np.zeros((5, 1), bool))
    np.testing.assert_array_equal(_np(mean), 0.0)
    np.testing.assert_array_equal(_np(var), 0.0)


def test_moments_stay_accurate_for_large_mean_and_small_spread(rng):
    # float32 data with mean 1e4 and std 1e-2; a naive E[x^2] - E[x]^2 or an
    # unshifted float32 sum loses the variance completely at this size.
    x = (1e4 + 1e-2 * rng.standard_normal((64, 56, 56, 4))).astype("float32")
    _, var = bn_ops.moments(x, [0, 1, 2])
    _, ref_var = np_moments(x, [3])
    assert np.max(np.abs(_np(var) - ref_var) / ref_var) <= 1e-3


def test_variance_is_never_negative(rng):
    x = np.full((33, 2), 0.1, "float32") + rng.normal(0, 1e-9, (33, 2)).astype(
        "float32"
    )
    _, var = bn_ops.moments(x, [0])
    assert np.all(_np(var) >= 0.0)


def test_combine_moments_equals_moments_of_concatenation(rng):
    parts = [
        (1e4 + 1e-2 * rng.standard_normal((n, 3))).astype("float32")
        for n in (5, 0, 17, 1)
    ]
    moments = [bn_ops.sufficient_moments(p, [0]) for p in parts]
    stacked = bn_ops.Moments(*[keras.ops.stack(fields) for fields in zip(*moments)])
    merged = bn_ops.combine_moments(stacked)
    ref_mean, ref_var = np_moments(np.concatenate(parts), [1])
    assert float(_np(merged.count)[0, 0]) == 23.0
    np.testing.assert_allclose(_np(merged.mean), ref_mean, rtol=1e-6)
    np.testing.assert_allclose(_np(merged.variance), ref_var, rtol=1e-3)


def test_merge_moments_is_chan_update(rng):
    a = rng.normal(1.0, 2.0, (10, 2)).astype("float32")
    b = rng.normal(-3.0, 0.5, (7, 2)).astype("float32")
    merged = bn_ops.merge_moments(
        bn_ops.sufficient_moments(a, [0]), bn_ops.sufficient_moments(b, [0])
    )
    ref_mean, ref_var = np_moments(np.concatenate([a, b]), [1])
    np.testing.assert_allclose(_np(merged.mean), ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(merged.variance), ref_var, rtol=1e-5)


def test_normalize_matches_formula(rng):
    x = rng.normal(size=(8, 3)).astype("float32")
    mean, var = rng.normal(size=3), rng.random(3) + 0.5
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    y = bn_ops.normalize(
        *[keras.ops.convert_to_tensor(a, "float32") for a in (x, mean, var)],
        *[keras.ops.convert_to_tensor(a, "float32") for a in (gamma, beta)],
        1e-3,
    )
    np.testing.assert_allclose(
        _np(y), np_batch_norm(x, mean, var, gamma, beta, 1e-3), rtol=1e-5, atol=1e-5
    )


def test_batch_normalize_returns_output_and_batch_statistics(rng):
    x = rng.normal(4.0, 2.0, (32, 5)).astype("float32")
    y, mean, var = bn_ops.batch_normalize(x, [0], None, None, 1e-3)
    ref_mean, ref_var = np_moments(x, [1])
    np.testing.assert_allclose(_np(mean), ref_mean, rtol=1e-5)
    np.testing.assert_allclose(_np(var), ref_var, rtol=1e-5)
    np.testing.assert_allclose(
        _np(y), np_batch_norm(x, ref_mean, ref_var), rtol=1e-5, atol=1e-5
    )


def test_ema_update_uses_keras_momentum_convention():
    assert float(bn_ops.ema_update(10.0, 0.0, 0.9)) == pytest.approx(9.0)
    assert float(bn_ops.ema_update(10.0, 0.0, 0.0)) == 0.0


def test_all_finite_detects_nan_and_inf():
    assert bool(bn_ops.all_finite(np.ones(2), np.zeros(2)))
    big = np.full(2, 3e38, "float32")  # big + big overflows float32
    assert bool(bn_ops.all_finite(big, big))
    assert not bool(bn_ops.all_finite(np.ones(2), np.array([0.0, np.inf])))
    assert not bool(bn_ops.all_finite(np.array([-np.inf, 1.0]), np.zeros(2)))
    assert not bool(bn_ops.all_finite(np.array([np.nan])))


def test_renorm_correction_matches_closed_form():
    mean, var, eps = np.float32(2.0), np.float32(8.0), 1.0
    r, d = bn_ops.renorm_correction(mean, var, 1.0, 2.0, eps, {})
    assert float(r) == pytest.approx(3.0 / 2.0)
    assert float(d) == pytest.approx(0.5)
    r, d = bn_ops.renorm_correction(
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
