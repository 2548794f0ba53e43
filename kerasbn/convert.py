"""``from_keras`` and ``to_keras``: swap every BN layer of a model for the other kind.

``kerasbn.BatchNorm`` takes the constructor arguments, config keys and weight
order of ``keras.layers.BatchNormalization``, so a swapped layer keeps its
config (name, dtype policy and trainability included) and its weights.
"""

from __future__ import annotations

import inspect

import keras

from kerasbn import _graph
from kerasbn.layer import BatchNorm


def _swap(layer, new_class, config: dict):
    """A ``new_class`` layer from ``config`` with ``layer``'s weights."""
    return _graph.copy_state(layer, new_class.from_config(config))


def _keras_config(layer: BatchNorm) -> dict:
    """``layer``'s config as ``keras.layers.BatchNormalization`` takes it.

    Raises:
        ValueError: if the config sets something Keras cannot express.
    """
    config = layer.get_config()
    axis = config["axis"]
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(
                f"`to_keras` cannot convert BN layer {layer.name!r}: "
                f"keras.layers.BatchNormalization takes one axis; got axis={axis!r}."
            )
        config["axis"] = axis[0]
    keras_keys = set(keras.layers.BatchNormalization().get_config())
    defaults = inspect.signature(type(layer).__init__).parameters
    for key in sorted(set(config) - keras_keys):
        default = defaults[key].default if key in defaults else None
        if config[key] != default:
            raise ValueError(
                f"`to_keras` cannot convert BN layer {layer.name!r}: "
                f"keras.layers.BatchNormalization has no `{key}`; got "
                f"{key}={config[key]!r}, and only the default {default!r} converts."
            )
        del config[key]
    return config


def from_keras(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with every Keras BN layer replaced by ``kerasbn.BatchNorm``.

    Each ``keras.layers.BatchNormalization``, in nested Sequential and
    functional models too, becomes a ``kerasbn.BatchNorm`` with the same
    config and weights (moving statistics included). Every other layer is
    copied with its weights. The original model is not modified.

    Args:
        model: a built Sequential or functional model.

    Returns:
        The new model; compiled from ``model``'s compile config if ``model``
        was compiled.

    Raises:
        ValueError: if ``model`` is not a built Sequential or functional model.

    Example:
        >>> import keras, kerasbn
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                           keras.layers.BatchNormalization()])
        >>> [type(layer).__name__ for layer in kerasbn.from_keras(model).layers]
        ['Dense', 'BatchNorm']
    """
    _graph.check_model(model, "from_keras")

    def replace(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return _swap(layer, BatchNorm, layer.get_config())
        return layer

    return _graph.rewrite(model, replace)


def to_keras(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with every ``kerasbn.BatchNorm`` replaced by Keras's BN.

    The inverse of :func:`from_keras`, for deploying without kerasbn: each
    ``kerasbn.BatchNorm``, in nested Sequential and functional models too,
    becomes a ``keras.layers.BatchNormalization`` with the same config and
    weights. A one-element list ``axis`` becomes that int.

    Args:
        model: a built Sequential or functional model.

    Returns:
        The new model; compiled from ``model``'s compile config if ``model``
        was compiled.

    Raises:
        ValueError: if ``model`` is not a built Sequential or functional model,
            or a BN layer's config has what Keras cannot express: several
            axes, or a kerasbn-only option set to a value other than its
            default.

    Example:
        >>> import keras, kerasbn
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                           kerasbn.BatchNorm()])
        >>> [type(layer).__name__ for layer in kerasbn.to_keras(model).layers]
        ['Dense', 'BatchNormalization']
    """
    _graph.check_model(model, "to_keras")

    def replace(layer):
        if isinstance(layer, BatchNorm):
            config = _keras_config(layer)
            return _swap(layer, keras.layers.BatchNormalization, config)
        return layer

    return _graph.rewrite(model, replace)
