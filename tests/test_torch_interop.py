"""from_torch / to_torch against torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm.

torch (installed, whatever Keras's backend) is the peer: its eval output, one
training step's output, gradients and running statistics, compared as NumPy
arrays on every Keras backend.
"""

import numpy as np
import pytest
from conftest import record, to_numpy, train_call

import kerasbn

torch = pytest.importorskip("torch")
TOL = dict(rtol=1e-5, atol=1e-5)


def _random_module(cls, channels, rng, **kwargs):
    module = cls(channels, **kwargs)
    with torch.no_grad():
        if module.affine:
            module.weight.copy_(torch.from_numpy(rng.normal(1, 0.5, channels)))
            module.bias.copy_(torch.from_numpy(rng.normal(0, 0.5, channels)))
        if module.track_running_stats:
            module.running_mean.copy_(torch.from_numpy(rng.normal(0, 1, channels)))
            module.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, channels)))
    return module


def _to_layout(x, data_format):
    return np.moveaxis(x, 1, -1) if data_format == "channels_last" else x


def _from_layout(x, data_format):
    return np.moveaxis(x, -1, 1) if data_format == "channels_last" else x


CASES = [
    # (torch class name, torch input shape, module kwargs, from_torch kwargs)
    ("BatchNorm1d", (16, 5), dict(), dict()),
    ("BatchNorm1d", (8, 4, 6), dict(momentum=0.3), dict(input_rank=3)),
    (
        "BatchNorm1d",
        (8, 4, 6),
        dict(),
        dict(input_rank=3, data_format="channels_first"),
    ),
    ("BatchNorm2d", (4, 3, 5, 5), dict(), dict()),
    ("BatchNorm2d", (4, 3, 5, 5), dict(eps=1e-3), dict(data_format="channels_first")),
    ("BatchNorm2d", (4, 3, 5, 5), dict(affine=False, momentum=0.5), dict()),
    ("BatchNorm2d", (4, 3, 5, 5), dict(track_running_stats=False), dict()),
    ("BatchNorm3d", (2, 3, 3, 4, 4), dict(momentum=0.01), dict()),
    ("BatchNorm2d", (8, 32, 12, 12), dict(), dict()),  # a fast-path size
    ("SyncBatchNorm", (4, 3, 5, 5), dict(), dict()),
]


@pytest.mark.parametrize("name, shape, module_kwargs, kwargs", CASES)
def test_from_torch_matches_torch_in_eval_and_one_training_step(
    rng, name, shape, module_kwargs, kwargs
):
    module = _random_module(getattr(torch.nn, name), shape[1], rng, **module_kwargs)
    layer = kerasbn.from_torch(module, **kwargs)
    data_format = kwargs.get("data_format", "channels_last")
    label = f"{name}{shape} {module_kwargs or ''} {data_format}"
    x = rng.normal(0.5, 2.0, shape).astype("float32")
    keras_x = _to_layout(x, data_format)

    module.eval()
    expected = module(torch.from_numpy(x)).detach().numpy()
    ours = _from_layout(to_numpy(layer(keras_x, training=False)), data_format)
    np.testing.assert_allclose(ours, expected, **TOL)
    record(f"from_torch eval output, {label}", ours, expected)

    module.train()
    xt = torch.from_numpy(x).requires_grad_(True)
    dy = rng.normal(size=shape).astype("float32")
    y_ref = module(xt)
    (y_ref * torch.from_numpy(dy)).sum().backward()
    y, grads = train_call(layer, keras_x, _to_layout(dy, data_format))
    np.testing.assert_allclose(_from_layout(y, data_format), y_ref.detach(), **TOL)
    np.testing.assert_allclose(_from_layout(grads[0], data_format), xt.grad, **TOL)
    record(
        f"from_torch training output, {label}",
        _from_layout(y, data_format),
        y_ref.detach().numpy(),
    )
    if module.affine:
        np.testing.assert_allclose(grads[1], module.weight.grad, **TOL)
        np.testing.assert_allclose(grads[2], module.bias.grad, **TOL)
    if module.track_running_stats:
        for ours, theirs in (
            (layer.moving_mean, module.running_mean),
            (layer.moving_variance, module.running_var),
        ):
            np.testing.assert_allclose(to_numpy(ours), theirs.numpy(), rtol=1e-6)
            record(
                f"from_torch running statistics after one step, {label}",
                ours,
                theirs.numpy(),
            )
    else:  # torch keeps none; kerasbn's moving ones do not take part
        y_eval = module.eval()(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(
            _from_layout(to_numpy(layer(keras_x)), data_format), y_eval, **TOL
        )


def test_leaving_kerasbn_defaults_differs_from_torch_by_what_the_mapping_fixes(rng):
    # The bias from_torch removes: epsilon 1e-3 instead of 1e-5, biased variance.
    module = _random_module(torch.nn.BatchNorm1d, 4, rng).train()
    x = rng.normal(0.0, 0.1, (8, 4)).astype("float32")  # small variance: eps matters
    naive = kerasbn.BatchNorm(momentum=0.9)
    naive.build(x.shape)
    naive.set_weights([p.detach().numpy() for p in module.state_dict().values()][:4])
    y_ref = module(torch.from_numpy(x)).detach().numpy()
    y_naive = to_numpy(naive(x, training=True))
    record("naive port (kerasbn defaults) training output vs torch", y_naive, y_ref)
    assert np.max(np.abs(y_naive - y_ref)) > 1e-2
    np.testing.assert_raises(
        AssertionError,
        np.testing.assert_allclose,
        to_numpy(naive.moving_variance),
        module.running_var.numpy(),
        rtol=1e-6,
    )


def test_round_trip_torch_to_kerasbn_to_torch_is_exact(rng):
    for cls, kwargs in [
        (torch.nn.BatchNorm2d, dict(momentum=0.1, eps=1e-5)),
        (torch.nn.BatchNorm1d, dict(momentum=0.3, eps=2e-4, affine=False)),
        (torch.nn.BatchNorm3d, dict(momentum=0.01, track_running_stats=False)),
        (torch.nn.SyncBatchNorm, dict(momentum=0.997)),
    ]:
        module = _random_module(cls, 6, rng, **kwargs)
        back = kerasbn.to_torch(kerasbn.from_torch(module))
        assert type(back) is cls
        for attribute in ("num_features", "eps", "momentum", "affine"):
            assert getattr(back, attribute) == getattr(module, attribute), attribute
        assert back.track_running_stats == module.track_running_stats
        state, state_back = module.state_dict(), back.state_dict()
        assert state.keys() == state_back.keys()
        for key in state:
            if key != "num_batches_tracked":  # kerasbn counts no batches
                assert torch.equal(state[key], state_back[key]), key


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(), (None, 6, 6, 3)),
        (dict(axis=1, momentum=0.95, epsilon=1e-4), (None, 3, 6)),
        (dict(statistics="batch", unbiased_moving_variance=True), (None, 3)),
        (dict(center=False, scale=False), (None, 2, 4, 4, 3)),
    ],
)
def test_round_trip_kerasbn_to_torch_to_kerasbn_is_exact(rng, kwargs, shape):
    layer = kerasbn.BatchNorm(
        gamma_initializer="random_normal",
        moving_mean_initializer="random_normal",
        **kwargs,
    )
    layer.build(shape)
    data_format = "channels_first" if kwargs.get("axis") == 1 else "channels_last"
    back = kerasbn.from_torch(
        kerasbn.to_torch(layer), data_format, input_rank=len(shape)
    )
    config, config_back = layer.get_config(), back.get_config()
    for key in ("momentum", "epsilon", "center", "scale", "statistics"):
        assert config_back[key] == config[key], key
    weights = layer.get_weights()
    if kwargs.get("statistics") == "batch":  # torch keeps no running statistics
        weights = weights[:2]
    for w, w_back in zip(weights, back.get_weights()):
        np.testing.assert_array_equal(w, w_back)


def test_to_torch_of_a_keras_trained_layer_predicts_the_same(rng):
    layer = kerasbn.BatchNorm(momentum=0.5, scale=False)
    x = rng.normal(2.0, 3.0, (8, 3, 4, 5)).astype("float32")
    layer.build(x.shape)
    for _ in range(3):
        train_call(layer, x, np.ones_like(x))
    module = kerasbn.to_torch(layer).eval()
    assert not module.weight.requires_grad  # scale=False: gamma fixed at 1
    ours = to_numpy(layer(x))
    theirs = module(torch.from_numpy(np.moveaxis(x, -1, 1))).detach().numpy()
    np.testing.assert_allclose(np.moveaxis(theirs, 1, -1), ours, **TOL)
    record("to_torch eval output vs kerasbn", np.moveaxis(theirs, 1, -1), ours)


def test_momentum_none_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match=r"momentum=None.*cumulative.*recalibrate"):
        kerasbn.from_torch(torch.nn.BatchNorm2d(3, momentum=None))


@pytest.mark.parametrize(
    "module, kwargs, error, pattern",
    [
        (torch.nn.LayerNorm(3), dict(), TypeError, r"module.*LayerNorm"),
        (torch.nn.BatchNorm2d(3), dict(data_format="NHWC"), ValueError, "NHWC"),
        (torch.nn.BatchNorm2d(3), dict(input_rank=3), ValueError, r"\[4\].*3"),
        (torch.nn.BatchNorm1d(3), dict(input_rank=4), ValueError, r"\[2, 3\].*4"),
    ],
)
def test_from_torch_bad_arguments_name_the_argument(module, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        kerasbn.from_torch(module, **kwargs)


@pytest.mark.parametrize(
    "kwargs, shape, pattern",
    [
        (dict(axis=2), (None, 3, 4, 5), r"axis=2"),
        (dict(axis=[1, 2]), (None, 3, 4, 5), r"axis=\[1, 2\]"),
        (dict(virtual_batch_size=2), (None, 3), r"virtual_batch_size=2"),
        (dict(renorm=True), (None, 3), r"renorm=True"),
        (dict(statistics="moving"), (None, 3), r"statistics='moving'.*eval\(\)"),
        (dict(), (None, 2, 2, 2, 2, 3), r"rank 6"),
    ],
)
def test_to_torch_refuses_what_torch_cannot_express(kwargs, shape, pattern):
    layer = kerasbn.BatchNorm(**kwargs)
    layer.build(shape)
    with pytest.raises(ValueError, match=pattern):
        kerasbn.to_torch(layer)


def test_to_torch_needs_a_built_layer():
    with pytest.raises(ValueError, match="built"):
        kerasbn.to_torch(kerasbn.BatchNorm())
