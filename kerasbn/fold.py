"""``fold_batch_norms``: batch normalization folded away for inference.

In inference a BN layer is a fixed per-channel affine map
``x * scale + offset`` (:func:`kerasbn.ops.affine_from_statistics`). After a
convolution or dense layer without activation, that map is absorbed into the
layer's kernel (each output channel's filter times its ``scale``) and bias
(``bias * scale + offset``). Elsewhere it becomes a :class:`ChannelAffine`.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from kerasbn import _graph
from kerasbn.layer import BatchNorm

__all__ = ["Absorbed", "ChannelAffine", "FoldReport", "fold_batch_norms"]

_BATCH_NORMS = (BatchNorm, keras.layers.BatchNormalization)
# Layers whose kernel ends with the output channels; depthwise kernels end with
# (input channels, depth multiplier), whose product is the output channels.
_DENSE_OR_CONV = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)


def _axes(axis, rank: int) -> list[int]:
    """``axis`` (an int or a list of ints) as sorted non-negative axes."""
    return sorted(a % rank for a in (axis if isinstance(axis, list) else [axis]))


@keras.saving.register_keras_serializable(package="kerasbn")
class ChannelAffine(keras.layers.Layer):
    """A fixed per-channel ``y = x * scale + offset``: a BN layer in inference.

    :func:`fold_batch_norms` puts it where a BN layer cannot be folded into
    the layer before it. ``scale`` and ``offset`` are non-trainable float32
    weights shaped like a BN layer's statistics, and the product is formed in
    their dtype, as BN does.

    Args:
        axis: the channel axis, or a list of axes, as in ``kerasbn.BatchNorm``.
        **kwargs: base layer arguments (``name``, ``dtype``...).

    Example:
        >>> import numpy as np
        >>> layer = ChannelAffine(axis=1)
        >>> layer.build((None, 2, 3))
        >>> layer.set_weights([np.array([2.0, 3.0]), np.array([1.0, 0.0])])
        >>> keras.ops.convert_to_numpy(layer(np.ones((1, 2, 3), "float32"))).tolist()
        [[[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]]]
    """

    def __init__(self, axis: int | list[int] = -1, **kwargs):
        super().__init__(**kwargs)
        self.axis = list(axis) if isinstance(axis, (list, tuple)) else int(axis)
        self.supports_masking = True

    def build(self, input_shape):
        rank = len(input_shape)
        axes = _axes(self.axis, rank)
        self._broadcast_shape = [
            input_shape[a] if a in axes else 1 for a in range(rank)
        ]
        shape = tuple(input_shape[a] for a in axes)
        for name, initializer in (("scale", "ones"), ("offset", "zeros")):
            weight = self.add_weight(
                shape=shape,
                name=name,
                initializer=initializer,
                trainable=False,
                autocast=False,
            )
            setattr(self, name, weight)

    def call(self, inputs, mask=None):
        # A BN layer's mask only selects the samples of its training
        # statistics; in inference it plays no part, and Keras passes it on.
        scale = ops.reshape(self.scale, self._broadcast_shape)
        offset = ops.reshape(self.offset, self._broadcast_shape)
        outputs = ops.cast(inputs, self.scale.dtype) * scale + offset
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


@keras.saving.register_keras_serializable(package="kerasbn")
class Absorbed(keras.layers.Layer):
    """A BN layer folded into the layer before it: it passes its input through.

    :func:`fold_batch_norms` leaves it where a graph cannot be rebuilt
    without the BN (a model class of its own, such as a keras_hub backbone),
    so that the model keeps its structure. It takes the BN's call arguments
    (``mask`` too) and computes nothing.

    Example:
        >>> keras.ops.convert_to_numpy(Absorbed()(np.ones((1, 2)))).tolist()
        [[1.0, 1.0]]
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return super().get_config()  # the base layer's config (dtype policy too)


def _inference_affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """The float64 ``(scale, offset)`` of ``bn`` in inference, statistics-shaped.

    The formula of :func:`kerasbn.ops.affine_from_statistics`, evaluated in
    NumPy on the weights' values: folded weights are then rounded once, from
    float64, on every backend (JAX without x64 has no float64 tensors).
    """

    def value(weight, default: float) -> np.ndarray:
        if weight is None:
            return np.full(bn.moving_mean.shape, default)
        return ops.convert_to_numpy(weight).astype("f8")

    scale = value(bn.gamma, 1.0) / np.sqrt(value(bn.moving_variance, 1.0) + bn.epsilon)
    return scale, value(bn.beta, 0.0) - value(bn.moving_mean, 0.0) * scale


def _into_affine(bn) -> None:
    """Turns ``bn``, in place, into a :class:`ChannelAffine` of its inference map."""
    affine = ChannelAffine(axis=bn.axis, name=bn.name, dtype=bn.dtype_policy)
    _graph.build_like(affine, bn)
    affine.set_weights(_inference_affine(bn))
    _graph.transplant(bn, affine, keep_variables=False)


def _can_fold(producer, bn) -> bool:
    """Whether ``bn`` can be absorbed into the kernel and bias of ``producer``."""
    if type(producer) not in (*_DENSE_OR_CONV, *_DEPTHWISE):
        return False
    config = producer.get_config()
    if config.get("activation") != "linear" or config.get("quantization_config"):
        return False
    if getattr(producer, "lora_enabled", False):
        return False
    rank = len(bn.get_build_config()["input_shape"])
    channels_first = config.get("data_format") == "channels_first"
    return _axes(bn.axis, rank) == [1 if channels_first else rank - 1]


def _absorb(producer, bn) -> None:
    """Folds ``bn``'s inference map into ``producer``'s kernel and bias, in place
    (a bias is added where it had none), and turns ``bn`` into an :class:`Absorbed` pass-through."""
    scale, offset = (a.ravel() for a in _inference_affine(bn))
    kernel = ops.convert_to_numpy(producer.kernel)
    per_output = kernel.shape[-2:] if isinstance(producer, _DEPTHWISE) else (-1,)
    producer.kernel.assign(
        (kernel.astype("f8") * scale.reshape(per_output)).astype(kernel.dtype)
    )
    if producer.use_bias:
        bias = ops.convert_to_numpy(producer.bias).astype("f8")
    else:
        bias = np.zeros_like(scale)
        producer.bias = _graph.add_weight_in_place(
            producer,
            name="bias",
            shape=scale.shape,
            initializer="zeros",
            dtype=producer.kernel.dtype,
        )
        producer.use_bias = True
    producer.bias.assign((bias * scale + offset).astype(kernel.dtype))
    _graph.transplant(
        bn, Absorbed(name=bn.name, dtype=bn.dtype_policy), keep_variables=False
    )


class FoldReport(NamedTuple):
    """What :func:`fold_batch_norms` did with each BN layer, by path.

    Attributes:
        absorbed: the BN layers folded into the kernel and bias of the layer
            before them.
        affine: the BN layers turned into a :class:`ChannelAffine`.
    """

    absorbed: list[str]
    affine: list[str]


def fold_batch_norms(
    model: keras.Model, *, in_place: bool = False, return_report: bool = False
) -> keras.Model | tuple[keras.Model, FoldReport]:
    """``model`` for inference, with every batch normalization at any depth folded away.

    Every BN layer (``kerasbn.BatchNorm`` or ``keras.layers.BatchNormalization``)
    in the model's layer tree is reached: graph nodes of functional and
    Sequential models (nested ones too) and BN layers held by custom layers
    and subclassed models (keras_hub backbones and tasks included).

    * A BN that is a graph node whose input is the output of a ``Dense``,
      ``Conv1D/2D/3D`` or ``DepthwiseConv1D/2D`` layer with a linear
      activation, of which it is the only consumer, and which normalizes that
      layer's output-channel axis, is absorbed into that layer's kernel and
      bias (a bias is added where ``use_bias=False``).
    * Every other BN (after an activation or a pooling layer, on a shared
      output, over several axes, or inside a custom layer's ``call``, whose
      data flow a graph does not record) becomes a :class:`ChannelAffine`,
      the fixed per-channel map of its inference.

    Both use the moving statistics, as ``predict`` does; renorm's extra state
    plays no part in inference. Each BN is changed where it is held: an
    absorbed BN of a plain Sequential or functional model is removed from the
    graph, and one inside any other model (a subclass, a keras_hub backbone)
    becomes an :class:`Absorbed` pass-through of the same name, so that the model
    keeps its class and structure. By default a true copy of the model is
    folded (the original is unchanged); ``in_place=True`` folds ``model``'s
    own layers (a plain Sequential or functional model is then rebuilt
    around them: use the returned model). With ``return_report=True`` a
    :class:`FoldReport` comes with the model: the paths of the BN layers
    absorbed into their producer and of those turned into an affine.

    The folded model is a model like any other: each layer has one graph node
    per call, so ``keras.Model(folded.inputs, folded.get_layer(name).output)``
    extracts features from it as from a freshly built model.

    Args:
        model: a ``keras.Model`` of any kind, built.
        in_place: fold ``model``'s own layers instead of a copy's.
        return_report: also return a :class:`FoldReport`.

    Returns:
        A model whose ``predict`` equals ``model.predict`` up to float
        rounding, with no batch-normalization layer or op; with
        ``return_report=True``, the tuple ``(model, report)``.

    Raises:
        ValueError: if ``model`` is not a ``keras.Model``, a BN layer is not
            built, or is called with ``training=True`` in the model's graph
            (it would use batch statistics even in ``predict``). Each message
            names the layers' paths. Or (without ``in_place``) an object of
            the model cannot be copied (its path is in the message).
        kerasbn._keras_internals.KerasInternalsError: the installed Keras
            lacks an internal this tool relies on (nothing is changed).

    Example:
        >>> import keras, numpy as np, kerasbn
        >>> model = keras.Sequential([keras.Input((8, 8, 3)),
        ...     keras.layers.Conv2D(4, 3, use_bias=False), kerasbn.BatchNorm(name="bn"),
        ...     keras.layers.ReLU()], name="net")
        >>> folded, report = kerasbn.fold_batch_norms(model, return_report=True)
        >>> [type(layer).__name__ for layer in folded.layers]
        ['Conv2D', 'ReLU']
        >>> report
        FoldReport(absorbed=['net/bn'], affine=[])
        >>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 3))
        >>> bool(np.allclose(folded.predict(x, verbose=0),
        ...                  model.predict(x, verbose=0), atol=1e-5))
        True
    """
    needs = ("transplant", "graph") if in_place else ("transplant", "graph", "copy")
    _graph.check_model(model, "fold_batch_norms", *needs)
    _check_foldable(_graph.batch_norms(model), _graph.Graphs(model))
    target = model if in_place else _graph.copy_model(model, "fold_batch_norms")
    found, graphs = _graph.batch_norms(target), _graph.Graphs(target)
    pairs = []
    for path, bn in found:
        producer = graphs.sole_producer(bn)
        if producer is not None and _can_fold(producer, bn):
            pairs.append((path, producer, bn))
    absorbed = {id(bn) for _, _, bn in pairs}
    for _, producer, bn in pairs:
        _absorb(producer, bn)
    affine = [(path, bn) for path, bn in found if id(bn) not in absorbed]
    for _, bn in affine:
        _into_affine(bn)
    _graph.forget_compiled_functions(target)
    folded = _graph.without(target, absorbed)
    _graph.keep_one_node_per_call(folded)
    if not return_report:
        return folded
    report = FoldReport([path for path, _, _ in pairs], [path for path, _ in affine])
    return folded, report


def _check_foldable(found, graphs) -> None:
    """Raises, naming the paths, for BN layers that cannot be folded."""
    unbuilt = [path for path, bn in found if not bn.built]
    if unbuilt:
        raise ValueError(
            f"fold_batch_norms needs built BN layers; {unbuilt} are not built (they "
            "have no statistics yet). Call the model once before folding it."
        )
    always_training = [
        path for path, bn in found if graphs.called_with(bn, "training", True)
    ]
    if always_training:
        raise ValueError(
            "fold_batch_norms folds the moving statistics, but the BN layers "
            f"{always_training} are called with training=True in the model's graph "
            "and so use batch statistics even in predict(); folding would change "
            "their outputs. Call them without training=True to fold them."
        )
    batch_mode = [
        path for path, bn in found if getattr(bn, "statistics", "auto") == "batch"
    ]
    if batch_mode:
        raise ValueError(
            "fold_batch_norms folds the moving statistics, but the BN layers "
            f"{batch_mode} have statistics='batch' and normalize with batch "
            "statistics in predict() too; folding would change their outputs. Set "
            "their statistics to 'auto' or 'moving' to fold them."
        )
