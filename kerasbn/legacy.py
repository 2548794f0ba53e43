"""``load_legacy_model``: tf_keras / Keras 2 ``.h5`` models with kerasbn's BN.

Keras 3 loads a Keras 2 ``.h5`` file itself (``keras.models.load_model``),
but not every batch-normalization layer in it, even with kerasbn as a custom
object: tf_keras saves a ghost-batch layer (``virtual_batch_size``) with the
axis of its internal 5-D view and 5-D ``(1, 1, 1, 1, C)`` weights, a layer
over several axes with full-rank ``(1, H, W, 1)`` weights (and Keras's
legacy loader drops a list axis), and ``SyncBatchNormalization`` as a class
of its own. :func:`load_legacy_model` rewrites a copy of the file's model
config and BN weights for kerasbn, then lets Keras load that copy, so every
other layer loads exactly as Keras loads it.

tf_keras normalizes a 4-D (or 5-D) input over axis 1 or the last one with
TensorFlow's fused kernel unless told otherwise (``fused=None``, its default,
is not saved in the file). In training, that kernel moves the moving variance
towards the *unbiased* batch variance (``n / (n - 1)`` times the biased one).
Such layers load with ``unbiased_moving_variance=True``, so that training
the loaded model moves its statistics as tf_keras moves them.

h5py and tf_keras's file layout are the only things this module needs; it
exists for that one framework's files and imports h5py when it is called.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings

import keras

from kerasbn import _graph
from kerasbn.layer import BatchNorm

__all__ = ["load_legacy_model", "translate_training_config"]

# class name in the file -> synchronized
_BN_CLASSES = {"BatchNormalization": False, "SyncBatchNormalization": True}
# Saved arguments that only choose a kernel: accepted, and without effect.
IGNORED_HINTS = ("fused",)
# Compute dtypes that tf_keras's fused kernel accepts.
_FUSED_DTYPES = (
    None,
    "float32",
    "float16",
    "bfloat16",
    "mixed_float16",
    "mixed_bfloat16",
)
_CLASS = "kerasbn>LegacyBatchNorm"  # the class name the rewritten config uses
_AXIS = "kerasbn_legacy_axis"  # the axis, where Keras's legacy loader keeps out


def load_legacy_model(path, **kwargs) -> keras.Model:
    """Loads a tf_keras / Keras 2 ``.h5`` model with every BN as ``kerasbn.BatchNorm``.

    Every ``BatchNormalization`` and ``SyncBatchNormalization`` layer of the
    file, in nested models too, becomes a ``kerasbn.BatchNorm`` with its
    name, arguments and weights:

    * ``virtual_batch_size`` (ghost batches) and list axes, with their
      weights reshaped from tf_keras's broadcastable shapes;
    * ``renorm``, ``renorm_clipping``, ``renorm_momentum``, ``momentum``,
      ``epsilon``, ``center``, ``scale``, initializers, regularizers,
      constraints, ``trainable`` and ``dtype``;
    * ``SyncBatchNormalization`` as ``synchronized=True``. (tf_keras does not
      save ``synchronized=True`` of a ``BatchNormalization`` layer; such a
      layer loads unsynchronized.)
    * layers that tf_keras ran with its fused kernel (Keras 2 files only:
      a 4-D or 5-D input normalized over axis 1 or the last axis, without
      renorm, ghost batches or synchronization, in float32/16 or bfloat16)
      with ``unbiased_moving_variance=True``, as that kernel updates them.

    ``fused``, a kernel hint, is accepted wherever it is saved and has no
    effect of its own. A saved ``adjustment`` that is not None cannot be
    honoured (kerasbn has no adjustment of the batch statistics) and raises.
    Every other layer loads as ``keras.models.load_model`` loads it.

    A compiled model's training config is translated for Keras 3
    (:func:`translate_training_config`): loss and metric objects that
    tf_keras saved with arguments Keras 3's classes do not take (such as
    ``SparseCategoricalCrossentropy(from_logits=True)``), and tf_keras's
    optimizers with their learning rate. Where a part cannot be translated,
    the model loads uncompiled, with a warning that names what was dropped.
    (Keras 3 does not restore tf_keras's optimizer state: its slots start
    fresh, as Keras itself warns.)

    Args:
        path: the ``.h5`` (or ``.hdf5``) file of a whole model.
        **kwargs: passed to ``keras.models.load_model`` (``compile``,
            ``custom_objects``, ``safe_mode``).

    Returns:
        The Keras model.

    Raises:
        ValueError: the file holds no model config (a weights-only file), or
            a BN layer holds an argument that cannot be honoured (its name
            and the argument are in the message).

    Warns:
        UserWarning: naming the parts of the training config that Keras 3
            cannot compile, when the model loads uncompiled for them.

    Example:
        >>> import os, tempfile, numpy as np, tf_keras, kerasbn
        >>> old = tf_keras.Sequential([tf_keras.Input((4, 4, 3)),
        ...     tf_keras.layers.BatchNormalization(virtual_batch_size=2)])
        >>> path = os.path.join(tempfile.mkdtemp(), "old.h5")
        >>> old.save(path)
        >>> model = kerasbn.load_legacy_model(path, compile=False)
        >>> bn = model.layers[0]
        >>> type(bn).__name__, bn.axis, bn.virtual_batch_size, tuple(bn.moving_mean.shape)
        ('BatchNorm', 3, 2, (3,))
    """
    import h5py

    custom_objects = dict(kwargs.pop("custom_objects", None) or {})
    with h5py.File(path, "r") as source:
        if "model_config" not in source.attrs:
            raise ValueError(
                f"{os.fspath(path)!r} holds no model config (a weights-only file?); "
                "load_legacy_model needs a whole model saved with model.save()."
            )
        version = _text(source.attrs.get("keras_version", "2"))
        factory = _Factory(keras2=version.startswith("2."))
        config = factory.rewrite(json.loads(_text(source.attrs["model_config"])))
        dropped: list[str] = []
        with tempfile.TemporaryDirectory() as folder:
            rewritten = os.path.join(folder, "model.h5")
            with h5py.File(rewritten, "w") as target:
                for key, value in source.attrs.items():
                    target.attrs[key] = value
                target.attrs["model_config"] = json.dumps(config)
                if "training_config" in source.attrs:
                    with keras.saving.custom_object_scope(custom_objects):
                        training, dropped = translate_training_config(
                            json.loads(_text(source.attrs["training_config"]))
                        )
                    if training is None:
                        del target.attrs["training_config"]
                    else:
                        target.attrs["training_config"] = json.dumps(training)
                for name in source:
                    source.copy(source[name], target, name)
                weights = (
                    target["model_weights"] if "model_weights" in target else target
                )
                _reshape_weights(h5py, weights, factory.weight_axes)
            custom_objects[_CLASS] = factory
            model = keras.models.load_model(
                rewritten, custom_objects=custom_objects, **kwargs
            )
    if dropped and kwargs.get("compile", True):
        warnings.warn(
            f"load_legacy_model: the training config of {os.fspath(path)!r} has "
            f"what Keras 3 cannot compile, which was dropped: {'; '.join(dropped)}."
            + " The model is loaded uncompiled: compile it before training.",
            stacklevel=2,
        )
    if factory.keras2 and model.compiled:
        # Keras 3 restores no tf_keras optimizer state, and builds the new
        # optimizer over the model's own variable list (empty for a
        # functional model): compile anew with a fresh, unbuilt optimizer.
        _graph.compile_like(model, model)
    factory.mark_fused_layers()
    return model


# Arguments that tf_keras saves in an optimizer's config and Keras 3's
# optimizers do not take (Keras 3 refuses unknown arguments).
_TF_KERAS_OPTIMIZER_ONLY = ("is_legacy_optimizer", "jit_compile")
# Metric names that compile resolves from the model's outputs, as tf_keras did.
_SPECIAL_METRICS = ("accuracy", "acc", "crossentropy", "ce")


def translate_training_config(config: dict) -> tuple[dict | None, list[str]]:
    """A tf_keras / Keras 2 training config as Keras 3's loader can compile it.

    tf_keras saves loss and metric objects with arguments that Keras 3's
    classes do not take (``fn``, the function a wrapper class calls, and
    ``reduction="auto"``) and its optimizers as ``"Custom>Adam"`` with
    tf_keras-only arguments; Keras 3's loader then fails (a loss object) or
    silently compiles a default optimizer (the saved learning rate is lost).
    Each of these is translated: ``fn`` dropped where the class is the
    function's own (``SparseCategoricalCrossentropy``), a bare wrapper of a
    function replaced by that function's name, ``"auto"`` reduction made
    Keras 3's default ``"sum_over_batch_size"``, the optimizer's class name
    and arguments made Keras 3's. Each loss, metric and optimizer is then
    deserialized by Keras 3 (with the custom objects in scope) to check it.
    If any part still fails, the whole config is dropped, so that the model
    loads uncompiled rather than compiled with less than it was.

    Args:
        config: the parsed ``training_config`` of an ``.h5`` file.

    Returns:
        ``(translated, dropped)``: the config to save in its place, or None
        if a part cannot be translated (the model then loads uncompiled),
        and a description of each part that cannot.

    Example:
        >>> config = {"loss": {"class_name": "SparseCategoricalCrossentropy",
        ...     "config": {"from_logits": True, "reduction": "auto",
        ...                "fn": "sparse_categorical_crossentropy"}},
        ...     "metrics": None, "weighted_metrics": None, "loss_weights": None,
        ...     "optimizer_config": {"class_name": "Custom>SGD",
        ...         "config": {"learning_rate": 0.5, "is_legacy_optimizer": False}}}
        >>> translated, dropped = translate_training_config(config)
        >>> translated["loss"]["config"], translated["optimizer_config"]["class_name"]
        ({'from_logits': True, 'reduction': 'sum_over_batch_size'}, 'SGD')
        >>> dropped
        []
    """
    dropped: list[str] = []
    optimizer = _optimizer_config(config.get("optimizer_config"))
    if optimizer is None:
        dropped.append(f"the optimizer {config.get('optimizer_config')!r}")
        return None, dropped
    translated = dict(config, optimizer_config=optimizer)
    loss = _translate(config.get("loss"), keras.losses, dropped, "loss")
    translated["loss"] = loss
    for key in ("metrics", "weighted_metrics"):
        metrics = _translate(config.get(key), keras.metrics, dropped, key)
        if isinstance(metrics, list) and len(metrics) == 1:
            metrics = metrics[0]  # tf_keras's list per output, for one output
        translated[key] = metrics
    return (None if dropped else translated), dropped


def _optimizer_config(config):
    """An optimizer config Keras 3 deserializes to that optimizer, or None."""
    if not isinstance(config, dict) or "class_name" not in config:
        return None
    name = config["class_name"].split(">")[-1]  # "Custom>Adam": tf_keras's Adam
    arguments = {
        k: v
        for k, v in config.get("config", {}).items()
        if k not in _TF_KERAS_OPTIMIZER_ONLY
    }
    translated = {**config, "class_name": name, "config": arguments}
    try:
        optimizer = keras.optimizers.deserialize(copy.deepcopy(translated))
    except (TypeError, ValueError):
        return None
    return translated if isinstance(optimizer, keras.optimizers.Optimizer) else None


def _translate(node, module, dropped: list[str], where: str):
    """A loss or metric structure (a name, a config, or lists and dicts of
    them, per output) translated for Keras 3; parts that Keras 3 cannot
    deserialize are left out (None in a structure), named in ``dropped``."""
    if node is None:
        return None
    if isinstance(node, list):
        items = [
            _translate(n, module, dropped, f"{where}[{i}]") for i, n in enumerate(node)
        ]
        return (
            [item for item in items if item is not None]
            if module is keras.metrics
            else items
        )
    if isinstance(node, dict) and "class_name" not in node:
        return {
            k: _translate(v, module, dropped, f"{where}[{k!r}]")
            for k, v in node.items()
        }
    translated = _translate_object(node)
    try:
        if isinstance(translated, str):
            if translated not in _SPECIAL_METRICS:
                module.get(translated)
        elif isinstance(module.deserialize(copy.deepcopy(translated)), str):
            # (Keras returns the class name it could not find.)
            raise ValueError(f"Keras 3 has no {translated.get('class_name')!r}")
    except (TypeError, ValueError) as error:
        dropped.append(f"{where} {node!r} ({error})")
        return None
    return translated


def _translate_object(node):
    """One loss or metric: a name as it is, a config with tf_keras's extras
    translated (see :func:`translate_training_config`)."""
    if not isinstance(node, dict):
        return node
    config = dict(node.get("config") or {})
    function = config.pop("fn", None)
    wrapper = node["class_name"] in ("LossFunctionWrapper", "MeanMetricWrapper")
    if wrapper and isinstance(function, str):
        name = config.get("name")
        return name if name in _SPECIAL_METRICS else function
    if config.get("reduction") == "auto":
        config["reduction"] = "sum_over_batch_size"
    return {**node, "config": config}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _dtype_name(dtype) -> str | None:
    """The policy name of a saved ``dtype`` (a string or a policy config)."""
    if isinstance(dtype, dict):
        return dtype.get("config", {}).get("name")
    return dtype


class _Factory:
    """Rewrites BN configs for kerasbn, then builds them (Keras calls
    :meth:`from_config`), and remembers which layers tf_keras fused."""

    def __init__(self, keras2: bool):
        self.keras2 = keras2
        self.weight_axes: dict[str, list[int]] = {}  # layer name -> saved axes
        self._fusable: list[str] = []  # names of layers that fused if 4-D/5-D
        self._layers: dict[str, BatchNorm] = {}

    def rewrite(self, node):
        """``node`` (a parsed config) with every BN config rewritten."""
        if isinstance(node, list):
            return [self.rewrite(item) for item in node]
        if not isinstance(node, dict):
            return node
        if node.get("class_name") in _BN_CLASSES and isinstance(
            node.get("config"), dict
        ):
            synchronized = _BN_CLASSES[node["class_name"]]
            node = {
                k: v for k, v in node.items() if k not in ("module", "registered_name")
            }
            return {
                **node,
                "class_name": _CLASS,
                "config": self._bn(node["config"], synchronized),
            }
        return {key: self.rewrite(value) for key, value in node.items()}

    def _bn(self, config: dict, synchronized: bool) -> dict:
        config = dict(config)
        name = config.get("name")
        adjustment = config.pop("adjustment", None)
        if adjustment is not None:
            raise ValueError(
                f"BN layer {name!r} has `adjustment`={adjustment!r}, which kerasbn "
                "cannot honour: kerasbn.BatchNorm has no adjustment of the batch "
                "statistics (allowed: adjustment=None)."
            )
        fused = config.pop("fused", None)  # one of IGNORED_HINTS
        saved_axes = config.pop("axis", -1)
        saved_axes = (
            list(saved_axes) if isinstance(saved_axes, (list, tuple)) else [saved_axes]
        )
        ghost = config.get("virtual_batch_size")
        # tf_keras shifts the axes of a ghost-batch layer by the dimension
        # that its internal (v, B / v, ...) view adds.
        axes = [a - 1 if ghost and a > 0 else a for a in saved_axes]
        if ghost or len(axes) > 1:
            self.weight_axes[name] = saved_axes
        config[_AXIS] = axes[0] if len(axes) == 1 else axes
        config["synchronized"] = bool(synchronized or config.get("synchronized", False))
        if (
            self.keras2
            and fused is not False
            and len(axes) == 1
            and not (ghost or config.get("renorm") or config["synchronized"])
            and _dtype_name(config.get("dtype")) in _FUSED_DTYPES
        ):
            self._fusable.append(name)
        return config

    def from_config(self, config: dict) -> BatchNorm:
        config = dict(config)
        layer = BatchNorm(axis=config.pop(_AXIS, -1), **config)
        self._layers[layer.name] = layer
        return layer

    def mark_fused_layers(self) -> None:
        """Sets ``unbiased_moving_variance`` where tf_keras used its fused kernel."""
        for name in self._fusable:
            layer = self._layers.get(name)
            if layer is None:
                continue
            if not layer.built:
                warnings.warn(
                    f"BN layer {name!r} loaded unbuilt, so its input rank is unknown: "
                    "if tf_keras ran it with its fused kernel (a 4-D or 5-D input "
                    "over axis 1 or the last one), set its "
                    "unbiased_moving_variance=True to train it as tf_keras does.",
                    stacklevel=3,
                )
                continue
            rank = len(layer.get_build_config()["input_shape"])
            axis = layer.axis % rank
            if rank in (4, 5) and axis in (1, rank - 1):
                layer.unbiased_moving_variance = True


def _reshape_weights(h5py, group, weight_axes: dict[str, list[int]]) -> None:
    """Gives the weights of the layers named in ``weight_axes`` kerasbn's shapes:
    the sizes of the saved axes only (tf_keras keeps 1s on the others)."""
    found = []
    group.visititems(
        lambda path, item: (
            found.append(path) if isinstance(item, h5py.Dataset) else None
        )
    )
    for path in found:
        owners = [part for part in path.split("/") if part in weight_axes]
        if not owners:
            continue
        dataset = group[path]
        axes = weight_axes[owners[-1]]
        if dataset.ndim <= max(axes):
            continue
        values = dataset[()]
        del group[path]
        group.create_dataset(path, data=values.reshape([values.shape[a] for a in axes]))
