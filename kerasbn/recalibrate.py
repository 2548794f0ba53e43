"""Precise BN: moving statistics replaced by exact population statistics.

After training, a BN layer's moving mean and variance are exponential
averages over recent batches, taken while the weights upstream were still
changing. :func:`recalibrate` makes one pass over data instead and sets every
BN layer's moving mean and (biased) variance to the exact mean and variance of
all the inputs it saw in that pass ("Precise BN", Wu & Johnson, 2021).

How the pass runs:

* every BN layer normalizes with the statistics of its batch, as in training,
  so each BN sees its inputs as they were during training;
* every other layer runs as at inference: Dropout and noise layers are
  identities. A BN's population statistics are then those of the inputs it
  will see at inference, except that the BN layers upstream use batch
  statistics. (With Dropout active, a BN after it would get the inflated
  variance of dropped-out inputs, which inference never sees.)
* each BN's shifted moments ``(count, shift, offset, m2)`` of one batch are
  computed on the device (:func:`kerasbn.ops.sufficient_moments`; a BN called
  several times per batch merges its calls with
  :func:`kerasbn.ops.merge_moments`), then merged across batches exactly (Chan
  et al.) in NumPy float64 on the host: neither an average of per-batch EMAs
  nor ``E[x**2] - E[x]**2``, and float64 on every backend, JAX without x64
  included.

Every BN layer of the model's tree is reached (:func:`kerasbn._graph.walk`):
graph nodes, and BN layers held by custom layers and subclassed models. For
the pass, each BN layer's ``call`` is wrapped, on that object, by a recorder
that keeps the moments of its inputs and calls the layer with
``training=True``; the model itself is then called eagerly with
``training=False``, and the wrappers are removed afterwards.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator

import keras
import numpy as np
from keras import ops

from kerasbn import _graph
from kerasbn import ops as bn_ops


def recalibrate(
    model: keras.Model, data, steps: int | None = None, *, batch_size: int = 32
) -> keras.Model:
    """Sets every BN layer's moving statistics to its inputs' population ones.

    One pass over ``data``: every BN layer normalizes with batch statistics
    (as in training), every other layer runs as at inference (Dropout off).
    Afterwards each BN layer's ``moving_mean`` and ``moving_variance`` are
    the exact mean and biased variance of all the inputs it saw (the
    unbiased one, over the whole pass, for a layer with
    ``unbiased_moving_variance=True``). No other
    weight changes (a renorm ``kerasbn.BatchNorm`` also gets the matching
    ``moving_stddev = sqrt(variance + epsilon)``), and the ``trainable``
    flags are restored, so frozen BN layers are recalibrated too.

    Every BN layer of the model's layer tree is recalibrated, wherever the
    model holds it: graph nodes of functional and Sequential models (nested
    ones too), and BN layers inside custom layers and subclassed models
    (keras_hub backbones and tasks included). Like ``fit``, it changes the
    model's state in place.

    Args:
        model: a ``keras.Model`` of any kind with ``kerasbn.BatchNorm``
            and/or ``keras.layers.BatchNormalization`` layers. It is updated
            in place.
        data: a batched ``tf.data.Dataset``, a NumPy array of inputs, or an
            iterable (e.g. a generator or a ``torch`` DataLoader) of batches,
            on any backend. Elements may be ``x`` or ``(x, y[,
            sample_weight])``; only ``x`` is used. ``x`` may be a list or dict
            for a model with several inputs.
        steps: the number of batches to use; None for all of them.
        batch_size: the batch size for a NumPy array. The batch statistics of
            the upstream BN layers depend on it: use the training batch size.

    Returns:
        ``model``, with its BN layers' moving statistics replaced.

    Raises:
        TypeError: ``model`` is not a Keras layer or model, or ``steps`` or
            ``batch_size`` is not an int.
        ValueError: ``steps`` or ``batch_size`` is below 1, ``data`` gave no
            batch, or a BN layer saw no (unmasked) value (the message names
            its path).

    Warns:
        UserWarning: naming the BN layers that the model's call never reached
            (off its output path); they keep their statistics.

    Example:
        >>> import numpy as np, keras, kerasbn
        >>> model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm()])
        >>> x = np.random.default_rng(0).normal(5.0, 2.0, (100, 3))
        >>> model = kerasbn.recalibrate(model, x.astype("float32"), batch_size=10)
        >>> bool(np.allclose(model.layers[0].moving_variance, x.var(axis=0)))
        True
    """
    _check_positive_int("steps", steps, allow_none=True)
    _check_positive_int("batch_size", batch_size)
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"recalibrate needs a keras.Model; got {type(model).__name__}.")
    found = _graph.batch_norms(model)
    if not found:
        return model
    layers = [layer for _, layer in found]
    saved_weights = [layer.get_weights() if layer.built else [] for layer in layers]
    saved_flags = [_trainable_flags(layer) for layer in layers]
    recorders = [_Recorder(layer) for layer in layers]
    try:
        for layer in layers:
            layer.trainable = True  # a frozen BN would not use batch statistics
        pooled: list = [None] * len(layers)
        for x in _batches(data, steps, batch_size):
            model(x, training=False)
            for i, recorder in enumerate(recorders):
                batch = recorder.take()
                if batch is not None:
                    pooled[i] = batch if pooled[i] is None else _merge(pooled[i], batch)
        if not any(recorder.batches for recorder in recorders):
            raise ValueError("`data` gave no batch; recalibrate needs at least one.")
        uncalled = [path for (path, _), r in zip(found, recorders) if not r.batches]
        if uncalled:
            warnings.warn(
                f"recalibrate left the BN layers {uncalled} as they were: the "
                "model's call never reached them (they are off its output path).",
                stacklevel=2,
            )
        statistics = [
            None if not recorder.batches else _population(path, layer, moments)
            for (path, layer), recorder, moments in zip(found, recorders, pooled)
        ]
    finally:
        for recorder in recorders:
            recorder.remove()
        for layer, weights, flags in zip(layers, saved_weights, saved_flags):
            if weights:
                layer.set_weights(weights)
            _restore_trainable_flags(layer, flags)
    for layer, population in zip(layers, statistics):
        if population is not None:
            _set_moving_statistics(layer, *population)
    _graph.forget_compiled_functions(model)
    return model


class _Recorder:
    """Wraps one BN layer's ``call``, on the layer object, for the pass.

    The wrapped call computes the shifted moments of its input (masked by
    the layer's rule), keeps them as float64 NumPy arrays (a BN called several
    times per batch merges its calls), and calls the layer with
    ``training=True``.
    """

    def __init__(self, bn):
        self.bn = bn
        self.batches = 0
        self._moments = None
        self._call = bn.call
        object.__setattr__(bn, "call", self._recording_call)

    def _recording_call(self, inputs, training=None, mask=None):
        ndim = len(inputs.shape)
        axes = (
            self.bn.axis if isinstance(self.bn.axis, (list, tuple)) else [self.bn.axis]
        )
        channels = sorted(a % ndim for a in axes)
        reduction = [a for a in range(ndim) if a not in channels]
        moments = bn_ops.sufficient_moments(
            inputs, reduction, bn_ops.expand_mask(mask, inputs)
        )
        shape = tuple(inputs.shape[a] for a in channels)
        moments = bn_ops.Moments(
            *[ops.convert_to_numpy(m).astype("f8").reshape(shape) for m in moments]
        )
        self._moments = (
            moments if self._moments is None else _merge(self._moments, moments)
        )
        return self._call(inputs, training=True, mask=mask)

    def take(self) -> bn_ops.Moments | None:
        """The moments recorded since the last call (None if the layer was not
        called); the record starts afresh."""
        moments, self._moments = self._moments, None
        self.batches += moments is not None
        return moments

    def remove(self) -> None:
        object.__delattr__(self.bn, "call")


def _merge(a: bn_ops.Moments, b: bn_ops.Moments) -> bn_ops.Moments:
    """Chan et al.'s exact merge of two moments, in NumPy float64, kept around
    ``a``'s shift. Channels that ``b`` did not see (count 0) keep ``a``."""
    delta = (b.shift - a.shift) + (b.offset - a.offset)  # b's mean minus a's
    count = a.count + b.count
    weight = np.divide(b.count, count, out=np.zeros_like(count), where=count > 0)
    return bn_ops.Moments(
        count,
        a.shift,
        a.offset + delta * weight,
        a.m2 + b.m2 + a.count * weight * delta * delta,
    )


def _population(path: str, layer, moments) -> tuple[np.ndarray, np.ndarray]:
    """The pooled ``(mean, variance)`` of one BN layer's inputs: the biased
    variance, or the unbiased one (``m2 / (n - 1)``) for a layer with
    ``unbiased_moving_variance=True``."""
    unbiased = bool(getattr(layer, "unbiased_moving_variance", False))
    if moments is None or np.any(moments.count <= int(unbiased)):
        seen = "fewer than two unmasked values" if unbiased else "no unmasked value"
        raise ValueError(
            f"BN layer {path!r} saw {seen} in a channel during the recalibration "
            "pass, so it has no population statistics."
        )
    return moments.shift + moments.offset, moments.m2 / (moments.count - unbiased)


def _batches(data, steps: int | None, batch_size: int) -> Iterator:
    """The inputs ``x`` of the first ``steps`` batches of ``data``."""
    if isinstance(data, np.ndarray):
        batches = (data[i : i + batch_size] for i in range(0, len(data), batch_size))
    elif hasattr(data, "as_numpy_iterator"):
        # a tf.data.Dataset: NumPy batches serve every Keras backend, while
        # TensorFlow tensors reach only the TensorFlow backend's predict.
        batches = data.as_numpy_iterator()
    else:
        batches = iter(data)
    for element in itertools.islice(batches, steps):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(element)
        yield keras.tree.map_structure(_as_input, x)


def _as_input(value):
    """One input array as a tensor of the active backend.

    Its own tensors pass as they are; anything else (a ``tf.Tensor`` from a
    ``tf.data.Dataset`` on JAX or PyTorch, a list) goes through NumPy, as
    Keras's data adapters do for ``fit`` and ``predict``.
    """
    return value if ops.is_tensor(value) else ops.convert_to_tensor(np.asarray(value))


def _set_moving_statistics(layer, mean: np.ndarray, variance: np.ndarray) -> None:
    shape = tuple(layer.moving_mean.shape)
    layer.moving_mean.assign(np.reshape(mean, shape).astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(
        np.reshape(variance, shape).astype(layer.moving_variance.dtype)
    )
    if getattr(layer, "renorm", False) and hasattr(layer, "moving_stddev"):
        stddev = np.sqrt(np.reshape(variance, shape) + layer.epsilon)
        layer.moving_stddev.assign(stddev.astype(layer.moving_stddev.dtype))


def _trainable_flags(layer) -> tuple[bool, list[bool]]:
    return layer.trainable, [w.trainable for w in layer.weights]


def _restore_trainable_flags(layer, flags: tuple[bool, list[bool]]) -> None:
    layer_flag, weight_flags = flags
    layer.trainable = layer_flag  # this also sets its weights' flags...
    for weight, flag in zip(layer.weights, weight_flags):
        weight.trainable = flag  # ...which may have differed one by one


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    allowed = "a positive int or None" if allow_none else "a positive int"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be {allowed}; got {name}={value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be {allowed}; got {name}={value!r}.")
