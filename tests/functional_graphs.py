"""A functional model with every kind of node the tools must handle.

Shared by the tests of from_keras/to_keras, fold_batch_norms and recalibrate.
"""

from __future__ import annotations

import keras
import numpy as np

import kerasbn

L = keras.layers
IMAGE, VECTOR = (8, 8, 3), (4,)


def every_node_model(bn=L.BatchNormalization) -> keras.Model:
    """Two inputs, two outputs, ``keras.ops`` nodes, a shared layer, nested
    Sequential and functional models and keyword-argument calls.

    Its BN layers: ``bn_shared_a`` and ``bn_shared_b`` after the two calls of a
    shared convolution (the second called with ``inputs=``), ``bn_c`` after a
    convolution that it alone consumes, ``bn_f`` after a convolution whose
    output an operation node uses too, one in a nested Sequential model and
    one in a nested functional model, each after a layer it alone consumes.
    """
    image = keras.Input(IMAGE, name="image")
    vector = keras.Input(VECTOR, name="vector")
    shared = L.Conv2D(4, 3, padding="same", use_bias=False, name="shared_conv")
    a = bn(name="bn_shared_a")(shared(image))
    b = bn(name="bn_shared_b")(inputs=shared(keras.ops.multiply(image, 0.5)))
    h = a * keras.ops.relu6(a + 3.0) * (1.0 / 6.0)  # hard-swish, as MobileNetV3
    c = bn(name="bn_c")(L.Conv2D(5, 1, name="conv_c")(h)) - 1.0
    nested_sequential = keras.Sequential(
        [keras.Input((8, 8, 5)), L.Conv2D(4, 3, padding="same"), bn(name="bn_seq")],
        name="nested_sequential",
    )
    d = L.Add()(inputs=[nested_sequential(c), b])
    f = L.Conv2D(4, 1, name="conv_f")(d)
    g = bn(name="bn_f")(f) + f * 0.25  # conv_f's output also feeds an op node
    inner_input = keras.Input(VECTOR)
    e = bn(name="bn_fn")(L.Dense(6, name="dense_fn")(inner_input))
    nested_functional = keras.Model(
        inner_input, keras.ops.tanh(e), name="nested_functional"
    )
    logits = L.Dense(3, name="head")(
        keras.ops.concatenate(
            [L.GlobalAveragePooling2D()(g), nested_functional(vector)], axis=-1
        )
    )
    return keras.Model(
        {"image": image, "vector": vector},
        [logits, keras.ops.sum(logits, axis=-1, keepdims=True)],
        name="every_node",
    )


FOLDED_INTO_THEIR_PRODUCER = {"bn_c", "bn_seq", "bn_fn"}
LEFT_AS_AFFINE = {"bn_shared_a", "bn_shared_b", "bn_f"}


def inputs(rng, batch: int = 6) -> dict[str, np.ndarray]:
    return {
        "image": rng.normal(1.0, 2.0, (batch, *IMAGE)).astype("float32"),
        "vector": rng.normal(0.0, 1.0, (batch, *VECTOR)).astype("float32"),
    }


def leaf_layers(model) -> list:
    """Every layer that is not a model, nested models' layers included, once."""
    found = []
    for layer in model.layers:
        found.extend(leaf_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return list({id(layer): layer for layer in found}.values())


def randomize_batch_norms(model, rng) -> None:
    """Random gamma, beta and moving statistics in every BN layer."""
    for layer in leaf_layers(model):
        if isinstance(layer, (L.BatchNormalization, kerasbn.BatchNorm)):
            layer.set_weights(
                [
                    (
                        rng.uniform(0.5, 2.0, w.shape)
                        if "variance" in w.path or "gamma" in w.path
                        else rng.normal(0.0, 0.5, w.shape)
                    ).astype(w.dtype)
                    for w in layer.weights
                ]
            )


def flat_numpy(structure) -> list[np.ndarray]:
    """The arrays of a (possibly nested) structure of tensors, flattened."""
    return [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(structure)]
