"""``from_keras`` and ``to_keras``: swap every BN layer of a model for the other kind.

``kerasbn.BatchNorm`` takes the constructor arguments, config keys and weight
order of ``keras.layers.BatchNormalization``, so a swapped layer keeps its
config (name, dtype policy and trainability included) and its variables. The
swap happens in place, on the layer object (:func:`kerasbn._graph.transplant`),
wherever the model holds it; by default on a true copy of the model.
``from_keras`` makes :class:`kerasbn.BatchNormalization` layers (``BatchNorm``
under Keras's class name), so that Keras's saving files them where it files
Keras's BN layers, and ``load_model`` is plain loading followed by
``from_keras``: nothing in Keras is rebound.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import tempfile
import warnings
import zipfile

import keras

from kerasbn import _graph
from kerasbn.layer import BatchNorm, BatchNormalization

__all__ = ["from_keras", "load_model", "to_keras"]

# The classes each swap converts; their subclasses are left with a warning.
_KERAS_KINDS = (keras.layers.BatchNormalization,)
_KERASBN_KINDS = (BatchNorm, BatchNormalization)


def _swap(model, function: str, kinds, new_class, config_of, in_place: bool):
    """Every BN layer of ``model``'s tree whose class is one of ``kinds``
    becomes a ``new_class`` layer.

    Each layer is changed in place (:func:`kerasbn._graph.transplant`), keeping
    its variables; the configs are all checked before any layer changes.
    """
    _graph.check_model(
        model, function, "transplant", *(() if in_place else ("copy", "graph"))
    )
    target = model if in_place else _graph.copy_model(model, function)
    found = [(path, bn) for path, bn in _graph.batch_norms(target) if type(bn) in kinds]
    for path, bn in _graph.batch_norms(target):
        if type(bn) not in kinds and isinstance(bn, kinds):
            warnings.warn(
                f"`{function}` left BN layer {path!r} as it is: it is a "
                f"{type(bn).__name__}, a subclass of {kinds[0].__name__} whose own "
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
    """``model`` with every Keras BN layer, at any depth, turned into kerasbn's.

    Every ``keras.layers.BatchNormalization`` in the model's layer tree is
    reached: nodes of functional and Sequential graphs (nested ones too), and
    BN layers held by custom layers and subclassed models (as attributes, in
    lists, tuples or dicts, created in ``build()``), keras_hub backbones and
    tasks included. Each becomes a :class:`kerasbn.BatchNormalization`
    (``kerasbn.BatchNorm`` under Keras's class name) with the same config and
    the same variables: names, weight paths, values (moving statistics
    included) and optimizer slots are unchanged. So is the rest of the model:
    its class, config, attributes and layers. A subclass of
    ``keras.layers.BatchNormalization`` is left as it is, with a warning
    naming its path.

    By default the model is copied first (a true copy, object by object: see
    ``in_place``) and the copy is changed; the original is left as it was. A
    compiled model's copy is compiled with copies of its losses and metrics
    (functions or objects, registered or not) and a new optimizer of the same
    class and config; a model may be copied after ``fit()``, and each layer of
    the copy keeps one graph node per call.

    The converted model's ``.keras`` file loads with plain
    ``keras.models.load_model`` wherever the original's did: a BN that is a
    node of a functional or Sequential graph loads as kerasbn's, and one that
    the model's own code creates (a custom layer, a subclass, a keras_hub
    model) loads as the code creates it, with the saved statistics.
    :func:`load_model` loads it with kerasbn layers everywhere.

    Args:
        model: a ``keras.Model`` of any kind.
        in_place: change ``model`` itself instead of a copy.

    Returns:
        The changed copy, or ``model`` itself with ``in_place=True``.

    Raises:
        ValueError: if ``model`` is not a ``keras.Model``, or (without
            ``in_place``) an object of the model cannot be copied (its path
            is in the message).
        kerasbn._keras_internals.KerasInternalsError: the installed Keras
            lacks an internal this tool relies on (nothing is changed).

    Example:
        >>> import keras, kerasbn
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                           keras.layers.BatchNormalization()])
        >>> [type(layer) for layer in kerasbn.from_keras(model).layers][1:]
        [<class 'kerasbn.layer.BatchNormalization'>]
    """
    return _swap(
        model,
        "from_keras",
        _KERAS_KINDS,
        BatchNormalization,
        lambda bn: bn.get_config(),
        in_place,
    )


def to_keras(model: keras.Model, *, in_place: bool = False) -> keras.Model:
    """``model`` with every ``kerasbn.BatchNorm``, at any depth, turned into Keras's BN.

    The inverse of :func:`from_keras`, for deploying without kerasbn: each
    ``kerasbn.BatchNorm`` (or ``kerasbn.BatchNormalization``) anywhere in
    the layer tree becomes a
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
        ValueError: if ``model`` is not a ``keras.Model``, an object of it
            cannot be copied, or a BN layer's config has what Keras cannot
            express: several axes, or a kerasbn-only option set to a value
            other than its default (checked for every layer before any
            changes).
        kerasbn._keras_internals.KerasInternalsError: the installed Keras
            lacks an internal this tool relies on (nothing is changed).

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
        _KERASBN_KINDS,
        keras.layers.BatchNormalization,
        _keras_config,
        in_place,
    )


def load_model(filepath, **kwargs) -> keras.Model:
    """Loads a ``.keras`` file with every BN layer as kerasbn's.

    The file is loaded by ``keras.models.load_model``, as it is: each BN that
    the file's config describes loads as that class, and each BN that the
    model's own code creates (a custom layer's or a subclass's, however the
    code names Keras's BN class) as the code creates it, with the saved
    statistics. Then :func:`from_keras` turns every Keras BN layer of the
    loaded model into a :class:`kerasbn.BatchNormalization` in place, keeping
    its weights. Nothing in Keras is rebound, so another thread that loads
    or builds a model meanwhile gets Keras's own layers.

    A file written by kerasbn 0.1.0, whose converted BN layers held in lists,
    dicts or ``Sequential`` models were filed under ``BatchNorm``'s name
    (``batch_norm``) rather than Keras's, loads too: where plain loading
    finds no statistics for such a layer, a copy of the file in which those
    entries are also filed under Keras's names is loaded instead.

    Args:
        filepath: the ``.keras`` file.
        **kwargs: passed on to ``keras.models.load_model``.

    Returns:
        The loaded model, with kerasbn BN layers.

    Raises:
        ValueError: as ``keras.models.load_model`` raises.

    Example:
        >>> import keras, kerasbn, tempfile, os
        >>> model = kerasbn.from_keras(keras.Sequential([
        ...     keras.Input((3,)), keras.layers.BatchNormalization()]))
        >>> path = os.path.join(tempfile.mkdtemp(), "model.keras")
        >>> model.save(path)
        >>> [type(layer).__name__ for layer in kerasbn.load_model(path).layers]
        ['BatchNormalization']
        >>> isinstance(kerasbn.load_model(path).layers[0], kerasbn.BatchNorm)
        True
    """
    try:
        model = keras.models.load_model(filepath, **kwargs)
    except ValueError as error:
        with tempfile.TemporaryDirectory() as folder:
            renamed = _with_keras_names(filepath, folder)
            if renamed is None:
                raise
            try:
                model = keras.models.load_model(renamed, **kwargs)
            except ValueError:
                raise error from None
    return from_keras(model, in_place=True)


# The names Keras's saving gives kerasbn.BatchNorm layers held in a container.
_OLD_NAME = re.compile(r"^batch_norm(_\d+)?$")


def _with_keras_names(filepath, folder: str) -> str | None:
    """A copy of the ``.keras`` file ``filepath`` in ``folder`` in which every
    weights entry filed under ``BatchNorm``'s name (``batch_norm_3``) is also
    filed under Keras's BN name (``batch_normalization_3``), where that name
    is free; None if the file is no such archive or has no such entry."""
    import h5py  # a dependency of Keras's own saving

    if not zipfile.is_zipfile(filepath):
        return None
    target = os.path.join(folder, "model.keras")
    weights = os.path.join(folder, "model.weights.h5")
    with zipfile.ZipFile(filepath) as archive:
        names = archive.namelist()
        if "model.weights.h5" not in names:
            return None
        with archive.open("model.weights.h5") as source, open(weights, "wb") as out:
            shutil.copyfileobj(source, out)
        added = 0
        with h5py.File(weights, "r+") as store:
            groups = []
            store.visititems(
                lambda path, item: (
                    groups.append(path)
                    if isinstance(item, h5py.Group)
                    and _OLD_NAME.match(path.split("/")[-1])
                    else None
                )
            )
            for path in groups:
                parent, _, name = path.rpartition("/")
                new = (
                    parent + "/" + name.replace("batch_norm", "batch_normalization", 1)
                )
                if new.lstrip("/") not in store:
                    store.copy(store[path], new.lstrip("/"))
                    added += 1
        if not added:
            return None
        with zipfile.ZipFile(target, "w") as copy:
            for name in names:
                if name == "model.weights.h5":
                    copy.write(weights, name)
                else:
                    copy.writestr(archive.getinfo(name), archive.read(name))
    return target
