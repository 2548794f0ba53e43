"""Precise BN: moving statistics replaced by exact population statistics.

After training, a BN layer's moving mean and variance are exponential
averages over recent batches, taken while the weights upstream were still
changing. :func:`recalibrate` makes one pass over data instead and sets every
BN layer's moving mean and (biased) variance to the exact mean and variance of
all the inputs it saw in that pass ("Precise BN", Wu & Johnson, 2021).

How the pass runs (it is the one that ``kerasbn.diagnose`` makes too):

* every BN layer normalizes with the statistics of its batch, as in training,
  so each BN sees its inputs as they were during training;
* every other layer runs as at inference: Dropout and noise layers are
  identities. A BN's population statistics are then those of the inputs it
  will see at inference, except that the BN layers upstream use batch
  statistics. (With Dropout active, a BN after it would get the inflated
  variance of dropped-out inputs, which inference never sees.)
* each BN's shifted moments ``(count, shift, offset, m2)`` of one batch are
  computed on the device (:func:`kerasbn.formulas.sufficient_moments`), then
  merged across batches exactly (Chan et al.) in NumPy float64 on the host:
  neither an average of per-batch EMAs nor ``E[x**2] - E[x]**2``, and
  float64 on every backend, JAX without x64 included.
* across workers (``tf.distribute`` worker processes, ``jax.distributed``
  processes, a ``torch.distributed`` process group), each worker passes its
  own data; the per-worker moments are then all-gathered and merged in rank
  order, so every worker assigns the same statistics, bit for bit: those of
  one process that saw every worker's batches, to float32 rounding.

Every BN layer of the model's tree is reached (:func:`kerasbn._graph.walk`):
graph nodes, and BN layers held by custom layers and subclassed models. For
the pass, each BN layer's ``call`` is wrapped, on that object, by a recorder
that keeps the moments of its inputs and calls the layer with
``training=True``; the model itself runs with ``training=False``, by
``stateless_call`` (nothing is assigned during the pass), compiled on JAX
(``jax.jit``) and, past its first batches, on TensorFlow (``tf.function``). The wrappers are removed
afterwards and every BN layer gets back its ``trainable`` flags, also when the
pass raises; only then are the new statistics assigned, all at once.
"""

from __future__ import annotations

import warnings

import keras

from kerasbn import _graph, _statistics

__all__ = ["recalibrate"]


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

    Under a distribution engine, call it on every worker with that worker's
    own data: ``tf.distribute`` worker processes
    (``MultiWorkerMirroredStrategy``, in scope or holding the model's
    variables), ``jax.distributed`` processes (with or without a
    ``keras.distribution``), or a ``torch.distributed`` process group. Each
    worker's moments are all-gathered and merged in rank order, so every
    worker assigns the same statistics, bit for bit, equal to those of one
    process that saw all the workers' batches (to float32 rounding). Under a
    ``MirroredStrategy`` of local devices the one process sees all the data,
    and every replica's copy of the variables gets the statistics.

    Args:
        model: a ``keras.Model`` of any kind with ``kerasbn.BatchNorm``
            and/or ``keras.layers.BatchNormalization`` layers. It is updated
            in place.
        data: a batched ``tf.data.Dataset``, a NumPy array of inputs, a
            tuple ``(x, y[, sample_weight])`` of NumPy arrays (as Keras's
            ``validation_data``), or an iterable (e.g. a generator or a
            ``torch`` DataLoader) of batches, on any backend. Elements may be
            ``x`` or ``(x, y[, sample_weight])``; only ``x`` is used. ``x``
            may be a list or dict for a model with several inputs (a dict of
            NumPy arrays is taken as such an ``x``). Read once.
        steps: the number of batches to use; None for all of them.
        batch_size: the batch size for NumPy arrays. The batch statistics of
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
    _statistics.check_positive_int("steps", steps, allow_none=True)
    _statistics.check_positive_int("batch_size", batch_size)
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"recalibrate needs a keras.Model; got {type(model).__name__}.")
    found = _graph.batch_norms(model)
    if not found:
        return model
    result = _statistics.run(model, found, data, steps, batch_size)
    if not result.batches:
        raise ValueError("`data` gave no batch; recalibrate needs at least one.")
    uncalled = _statistics.unreached(result)
    if uncalled:
        warnings.warn(
            f"recalibrate left the BN layers {uncalled} as they were: the "
            "model's call never reached them (they are off its output path).",
            stacklevel=2,
        )
    statistics = [
        None if s is None else _statistics.population(path, layer, s.population)
        for (path, layer), s in zip(found, result.statistics)
    ]
    for (_, layer), population in zip(found, statistics):
        if population is not None:
            _statistics.set_moving_statistics(layer, *population)
    _graph.forget_compiled_functions(model)
    return model
