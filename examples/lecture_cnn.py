"""The BN lecture's MNIST CNN, built in one place for every example.

Example:
    >>> from lecture_cnn import build_lecture_cnn
    >>> build_lecture_cnn().count_params()
    38910
    >>> build_lecture_cnn(batch_norm=False).count_params()
    38390
"""

from __future__ import annotations

import keras

import kerasbn

ACTIVATIONS = ("relu", "sigmoid")


def build_lecture_cnn(
    batch_norm: bool = True, activation: str = "relu", name: str | None = None
) -> keras.Sequential:
    """Builds the lecture's CNN for 28x28x1 images and 10 classes.

    The layers, in the lecture's order (BN between each conv/dense layer and
    its activation)::

        Conv2D(10, 5x5), BatchNorm, Activation, MaxPooling2D(2x2),
        Conv2D(20, 5x5), BatchNorm, Activation, MaxPooling2D(2x2),
        Flatten, Dense(100), BatchNorm, Activation,
        Dense(10, softmax)

    Args:
        batch_norm: Include the three ``kerasbn.BatchNorm`` layers.
        activation: The hidden activation, ``"relu"`` or ``"sigmoid"``.
        name: The model's name; by default ``cnn_bn`` or ``cnn_no_bn``.

    Returns:
        The model, built but not compiled.

    Raises:
        ValueError: If ``activation`` is not one of ``ACTIVATIONS``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")

    def block(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
        norm = [kerasbn.BatchNorm()] if batch_norm else []
        return [layer, *norm, keras.layers.Activation(activation)]

    layers = [
        keras.Input(shape=(28, 28, 1)),
        *block(keras.layers.Conv2D(10, (5, 5))),
        keras.layers.MaxPooling2D((2, 2)),
        *block(keras.layers.Conv2D(20, (5, 5))),
        keras.layers.MaxPooling2D((2, 2)),
        keras.layers.Flatten(),
        *block(keras.layers.Dense(100)),
        keras.layers.Dense(10, activation="softmax"),
    ]
    default_name = "cnn_bn" if batch_norm else "cnn_no_bn"
    return keras.Sequential(layers, name=name or default_name)
