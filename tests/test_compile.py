"""Compiled training: XLA on TensorFlow, ``torch.compile`` on PyTorch.

``model.compile(jit_compile=True)`` trains a model with kerasbn to the weights
and moving statistics of the same model with Keras's BN compiled the same
way. On PyTorch, ``torch._dynamo.explain`` counts the graph breaks of one
layer call, which must not exceed Keras's BN's at the same shape.
"""

import keras
import numpy as np
import pytest
from conftest import BACKEND, record

import kerasbn

COMPILED = pytest.mark.skipif(
    BACKEND not in ("tensorflow", "torch"),
    reason="jit_compile=True compiles the train step with XLA (TensorFlow) or "
    "torch.compile (PyTorch); JAX's steps are always jitted (test_backends_jax.py)",
)


def _model(bn):
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(10, 3),
            bn(),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(12),
            bn(),
            keras.layers.Dense(1),
        ]
    )


@COMPILED
def test_jit_compiled_fit_trains_as_keras_bn_compiled_the_same_way():
    rng = np.random.default_rng(15)
    x = rng.normal(1.0, 2.0, (48, 8, 8, 3)).astype("float32")
    y = rng.normal(size=(48, 1)).astype("float32")
    ours = _model(lambda: kerasbn.BatchNorm(momentum=0.5))
    peer = _model(lambda: keras.layers.BatchNormalization(momentum=0.5))
    peer.set_weights(ours.get_weights())
    for model in (ours, peer):
        model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=True)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for w, w_ref in zip(ours.get_weights(), peer.get_weights()):
        np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-5)
        record(f"jit_compile fit weights vs Keras BN ({BACKEND})", w, w_ref)


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile graph breaks")
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("shape", [(32, 24, 24, 10), (32, 8, 8, 64), (32, 100)])
def test_graph_breaks_are_no_more_than_keras_bn(shape, training):
    import torch

    breaks = {}
    for name, cls in (
        ("kerasbn", kerasbn.BatchNorm),
        ("keras", keras.layers.BatchNormalization),
    ):
        layer = cls()
        layer.build(shape)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(
            lambda t, layer=layer: layer(t, training=training)
        )(torch.randn(shape))
        breaks[name] = explained.graph_break_count
        data_dependent = [
            r.reason for r in explained.break_reasons if "data-dependent" in r.reason
        ]
        assert name != "kerasbn" or not data_dependent, data_dependent
    assert breaks["kerasbn"] <= breaks["keras"], breaks
    # kerasbn's own count: one break in training, which dynamo gives no
    # reason for, and none in inference. A module import or a host read in
    # the layer's call (a backend lookup did both once) adds breaks.
    assert breaks["kerasbn"] <= (1 if training else 0), breaks
