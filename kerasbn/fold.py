"""``fold_batch_norms``: batch normalization folded away for inference.

In inference a BN layer is a fixed per-channel affine map
``x * scale + offset`` (:func:`kerasbn.ops.affine_from_statistics`). After a
convolution or dense layer without activation, that map is absorbed into the
layer's kernel (each output channel's filter times its ``scale``) and bias
(``bias * scale + offset``). Elsewhere it becomes a :class:`ChannelAffine`.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kerasbn import _graph
from kerasbn.layer import BatchNorm

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


def _channel_affine(bn) -> ChannelAffine:
    """``bn`` in inference as a :class:`ChannelAffine` with the same axes."""
    layer = ChannelAffine(axis=bn.axis, name=bn.name, dtype=bn.dtype_policy)
    layer.build_from_config(bn.get_build_config())
    layer.set_weights(_inference_affine(bn))
    return layer


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


def _folded(producer, bn):
    """A copy of ``producer`` (with a bias) whose output equals ``bn(producer(x))``."""
    scale, offset = (a.ravel() for a in _inference_affine(bn))
    kernel = ops.convert_to_numpy(producer.kernel)
    bias = (
        ops.convert_to_numpy(producer.bias).astype("f8")
        if producer.use_bias
        else np.zeros_like(scale)
    )
    per_output = kernel.shape[-2:] if isinstance(producer, _DEPTHWISE) else (-1,)
    new_kernel = kernel.astype("f8") * scale.reshape(per_output)
    layer = type(producer).from_config({**producer.get_config(), "use_bias": True})
    layer.build_from_config(producer.get_build_config())
    layer.set_weights(
        [new_kernel.astype(kernel.dtype), (bias * scale + offset).astype(kernel.dtype)]
    )
    return layer


def _find_layer(model, name: str):
    """The layer called ``name`` in ``model`` or a model nested in it."""
    for m in _graph.graph_models(model):
        for layer in m.layers:
            if layer.name == name:
                return layer
    return None


def fold_batch_norms(model: keras.Model) -> keras.Model:
    """A new inference model with every batch normalization folded away.

    Each ``kerasbn.BatchNorm`` or ``keras.layers.BatchNormalization`` whose
    input is the output of a ``Dense``, ``Conv1D/2D/3D`` or
    ``DepthwiseConv1D/2D`` layer with a linear activation, of which it is the
    only consumer, and which normalizes that layer's output-channel axis, is
    absorbed into that layer's kernel and bias (a bias is added where
    ``use_bias=False``). Every other BN layer (after an activation or a
    pooling layer, on a shared output, over several axes...) becomes a
    :class:`ChannelAffine`. Both use the moving statistics, as ``predict``
    does; renorm's extra state plays no part in inference. Nested Sequential
    and functional models are folded too; BN layers inside subclassed layers
    or models are copied as they are.

    Args:
        model: a built Sequential or functional model. It is not modified.

    Returns:
        A new model whose ``predict`` equals ``model.predict`` up to float
        rounding, with no batch-normalization layer or op.

    Raises:
        ValueError: if ``model`` is not a built Sequential or functional model.

    Example:
        >>> import keras, numpy as np, kerasbn
        >>> model = keras.Sequential([keras.Input((8, 8, 3)),
        ...     keras.layers.Conv2D(4, 3, use_bias=False), kerasbn.BatchNorm(),
        ...     keras.layers.ReLU()])
        >>> folded = kerasbn.fold_batch_norms(model)
        >>> [type(layer).__name__ for layer in folded.layers]
        ['Conv2D', 'ReLU']
        >>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 3))
        >>> bool(np.allclose(folded.predict(x, verbose=0),
        ...                  model.predict(x, verbose=0), atol=1e-5))
        True
    """
    _graph.check_model(model, "fold_batch_norms")
    always_training = [
        name
        for name in _graph.layers_called_with(model, "training", True)
        if isinstance(_find_layer(model, name), _BATCH_NORMS)
    ]
    if always_training:
        raise ValueError(
            "fold_batch_norms folds the moving statistics, but the BN layers "
            f"{always_training} are called with training=True in the model's graph "
            "and so use batch statistics even in predict(); folding would change "
            "their outputs. Call them without training=True to fold them."
        )
    uses = _graph.layer_uses(model)
    pairs = [
        (producer, bn)
        for m in _graph.graph_models(model)
        for producer, bn in _graph.sole_consumer_pairs(m)
        if isinstance(bn, _BATCH_NORMS)
        and uses[id(producer)] == uses[id(bn)] == 1
        and _can_fold(producer, bn)
    ]
    bn_of = {id(producer): bn for producer, bn in pairs}
    absorbed = {id(bn) for _, bn in pairs}

    def replace(layer):
        if id(layer) in bn_of:
            return _folded(layer, bn_of[id(layer)])
        if id(layer) in absorbed:
            return None
        if isinstance(layer, _BATCH_NORMS):
            return _channel_affine(layer)
        return layer

    return _graph.rewrite(model, replace)
