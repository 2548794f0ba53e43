"""``from_keras`` and ``to_keras``: swap every BN layer of a model for the other kind.

``kerasbn.BatchNorm`` takes the constructor arguments, config keys and weight
order of ``keras.layers.BatchNormalization``, so a swapped layer keeps its
config (name, dtype policy and trainability included) and its variables. The
swap happens in place, on the layer object (:func:`kerasbn._graph.transplant`),
wherever the model holds it; by default on a true copy of the model.
"""

from __future__ import annotations

import inspect
import warnings

import keras

from kerasbn import _graph
from kerasbn.layer import BatchNorm


def _swap(model, function: str, kind, new_class, config_of, in_place: bool):
    """Every ``kind`` BN layer of ``model``'s tree becomes a ``new_class`` layer.

    Each layer is changed in place (:func:`kerasbn._graph.transplant`), keeping
    its variables; the configs are all checked before any layer changes.
    """
    _graph.check_model(model, function)
    target = model if in_place else _graph.copy_model(model, function)
    found = [(path, bn) for path, bn in _graph.batch_norms(target) if type(bn) is kind]
    for path, bn in _graph.batch_norms(target):
        if type(bn) is not kind and isinstance(bn, kind):
            warnings.warn(
                f"`{function}` left BN layer {path!r} as it is: it is a "
                f"{type(bn).__name__}, a subclass of {kind.__name__} whose own "
                "behaviour a swap would lose.",
                stacklevel=3,
            )
    fresh = [
        _graph.build_like(new_class.from_config(config_of(bn)), bn) for _, bn in found
    ]
    for (_, bn), new in zip(found, fresh):
        _graph.transplant(bn, new, keep_variables=True)
    _graph.forget_compiled_functions(target)
    return target


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


def from_keras(model: keras.Model, *, in_place: bool = False) -> keras.Model:
    """``model`` with every Keras BN layer, at any depth, turned into ``kerasbn.BatchNorm``.

    Every ``keras.layers.BatchNormalization`` in the model's layer tree is
    reached: nodes of functional and Sequential graphs (nested ones too), and
    BN layers held by custom layers and subclassed models (as attributes, in
    lists, tuples or dicts, created in ``build()``), keras_hub backbones and
    tasks included. Each becomes a ``kerasbn.BatchNorm`` with the same config
    and the same variables: names, weight paths, values (moving statistics
    included) and optimizer slots are unchanged. So is the rest of the model:
    its class, config, attributes and layers. A subclass of
    ``BatchNormalization`` is left as it is, with a warning naming its path.

    By default the model is copied first (a true copy, through Keras's own
    ``.keras`` serialization) and the copy is changed; the original is left
    as it was.

    After ``model.save``, a BN that is a node of a functional or Sequential
    graph loads back as ``kerasbn.BatchNorm``. A BN that the model's code
    creates (a custom layer's or a subclass's constructor) loads back as the
    code creates it: :func:`load_model` loads such a file with kerasbn layers
    and the saved statistics.

    Args:
        model: a ``keras.Model`` of any kind.
        in_place: change ``model`` itself instead of a copy.

    Returns:
        The changed copy, or ``model`` itself with ``in_place=True``.

    Raises:
        ValueError: if ``model`` is not a ``keras.Model``, or (without
            ``in_place``) Keras cannot save and load it to make the copy.

    Example:
        >>> import keras, kerasbn
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                           keras.layers.BatchNormalization()])
        >>> [type(layer).__name__ for layer in kerasbn.from_keras(model).layers]
        ['Dense', 'BatchNorm']
    """
    return _swap(
        model,
        "from_keras",
        keras.layers.BatchNormalization,
        BatchNorm,
        lambda bn: bn.get_config(),
        in_place,
    )


def to_keras(model: keras.Model, *, in_place: bool = False) -> keras.Model:
    """``model`` with every ``kerasbn.BatchNorm``, at any depth, turned into Keras's BN.

    The inverse of :func:`from_keras`, for deploying without kerasbn: each
    ``kerasbn.BatchNorm`` anywhere in the layer tree becomes a
    ``keras.layers.BatchNormalization`` with the same config and variables. A
    one-element list ``axis`` becomes that int. Like :func:`from_keras`, it
    changes a true copy unless ``in_place=True``, and keeps the model's class,
    config, layer names and weight paths.

    Args:
        model: a ``keras.Model`` of any kind.
        in_place: change ``model`` itself instead of a copy.

    Returns:
        The changed copy, or ``model`` itself with ``in_place=True``.

    Raises:
        ValueError: if ``model`` is not a ``keras.Model``, Keras cannot copy
            it, or a BN layer's config has what Keras cannot express: several
            axes, or a kerasbn-only option set to a value other than its
            default (checked for every layer before any changes).

    Example:
        >>> import keras, kerasbn
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                           kerasbn.BatchNorm()])
        >>> [type(layer).__name__ for layer in kerasbn.to_keras(model).layers]
        ['Dense', 'BatchNormalization']
    """
    return _swap(
        model,
        "to_keras",
        BatchNorm,
        keras.layers.BatchNormalization,
        _keras_config,
        in_place,
    )


def load_model(filepath, **kwargs) -> keras.Model:
    """Loads a ``.keras`` file of a model whose BN layers are ``kerasbn.BatchNorm``.

    A BN that is a node of a functional or Sequential graph is saved as
    ``kerasbn.BatchNorm`` and loads back as one through plain
    ``keras.models.load_model``. A BN that the model's own code creates (a
    custom layer's or a subclass's constructor, as keras_hub models do) is
    created again by that code on loading. This call has that code create
    ``kerasbn.BatchNorm`` where it asks for ``keras.layers.BatchNormalization``,
    so every saved statistic lands in a kerasbn layer. A file whose BN layers
    were saved as Keras's (the model was never swapped) is loaded as it is
    and then swapped in place with :func:`from_keras`. Either way every BN of
    the result is a ``kerasbn.BatchNorm`` with the saved weights.

    Args:
        filepath: the ``.keras`` file.
        **kwargs: passed on to ``keras.models.load_model``.

    Returns:
        The loaded model.

    Example:
        >>> import keras, kerasbn, tempfile, os
        >>> model = kerasbn.from_keras(keras.Sequential([
        ...     keras.Input((3,)), keras.layers.BatchNormalization()]))
        >>> path = os.path.join(tempfile.mkdtemp(), "model.keras")
        >>> model.save(path)
        >>> [type(layer).__name__ for layer in kerasbn.load_model(path).layers]
        ['BatchNorm']
    """
    keras_bn = keras.layers.BatchNormalization
    keras.layers.BatchNormalization = BatchNorm  # what the model's code asks for
    try:
        model = keras.models.load_model(filepath, **kwargs)
    except ValueError:  # weights saved under Keras's BN (not swapped before)
        model = None
    finally:
        keras.layers.BatchNormalization = keras_bn
    if model is None:
        model = keras.models.load_model(filepath, **kwargs)
    return from_keras(model, in_place=True)
