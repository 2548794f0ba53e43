"""``freeze_batch_norms``: every BN of a model frozen for fine-tuning.

Detection and segmentation recipes fine-tune with frozen BN statistics
(torchvision's ``FrozenBatchNorm2d``, detectron2), either training gamma and
beta or freezing them too. Keras ties both to ``trainable``: a BN with
``trainable=False`` runs in inference mode and keeps its statistics and its
gamma and beta. kerasbn's ``statistics="moving"`` separates the two: the
layer always normalizes with its moving statistics and never updates them,
while gamma and beta train as long as the layer is trainable.
"""

from __future__ import annotations

import keras

from kerasbn import _graph
from kerasbn.convert import from_keras
from kerasbn.layer import BatchNorm

__all__ = ["freeze_batch_norms"]


def freeze_batch_norms(model: keras.Model, train_affine: bool = False) -> keras.Model:
    """Freezes the statistics of every BN layer of ``model``, at any depth, in place.

    Every ``kerasbn.BatchNorm`` in the model's layer tree (graph nodes,
    nested models, layers held by custom layers and subclassed models) gets
    ``statistics="moving"``: it normalizes with its moving statistics, in
    training too, and never updates them. Its gamma and beta are frozen too
    (``trainable=False``) unless ``train_affine=True``, in which case they
    train (``trainable=True``).

    A ``keras.layers.BatchNormalization`` has no such mode. With
    ``train_affine=False`` it gets ``trainable=False``, which by Keras's rule
    freezes it exactly (inference mode, statistics, gamma and beta). With
    ``train_affine=True`` it is first turned into a ``kerasbn.BatchNorm`` in
    place, keeping its name, config and variables (``kerasbn.from_keras``
    with ``in_place=True``).

    Compile the model after freezing it, as after any change of ``trainable``
    (its compiled train/test/predict functions are dropped here, so a model
    that is not compiled again still traces the frozen layers).

    Args:
        model: a ``keras.Model`` of any kind.
        train_affine: whether gamma and beta keep training.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``model`` is not a ``keras.Model``, or, with
            ``train_affine=True``, a BN layer is a subclass of
            ``keras.layers.BatchNormalization``, which cannot be converted
            (its path is in the message).

    Example:
        >>> import keras, numpy as np, kerasbn
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                           kerasbn.BatchNorm()])
        >>> model = kerasbn.freeze_batch_norms(model, train_affine=True)
        >>> bn = model.layers[1]
        >>> bn.statistics, [w.name for w in bn.trainable_weights]
        ('moving', ['gamma', 'beta'])
        >>> model.compile("sgd", "mse")
        >>> _ = model.fit(np.ones((8, 3)), np.zeros((8, 4)), verbose=0)
        >>> keras.ops.convert_to_numpy(bn.moving_variance).tolist()  # unchanged
        [1.0, 1.0, 1.0, 1.0]
    """
    _graph.check_model(
        model, "freeze_batch_norms", *(("transplant",) if train_affine else ())
    )
    found = _graph.batch_norms(model)
    keras_bn = keras.layers.BatchNormalization
    if train_affine:
        subclasses = [
            path
            for path, bn in found
            if not isinstance(bn, BatchNorm) and type(bn) is not keras_bn
        ]
        if subclasses:
            raise ValueError(
                "freeze_batch_norms(train_affine=True) cannot freeze the BN layers "
                f"{subclasses}: they are subclasses of "
                "keras.layers.BatchNormalization, which has no mode that keeps its "
                "statistics while gamma and beta train, and kerasbn converts only "
                "that class itself. Use train_affine=False (trainable=False), or "
                "replace them with kerasbn.BatchNorm."
            )
        if any(type(bn) is keras_bn for _, bn in found):
            from_keras(model, in_place=True)
            found = _graph.batch_norms(model)
    for _, bn in found:
        if isinstance(bn, BatchNorm):
            bn.statistics = "moving"
        bn.trainable = bool(train_affine)
    _graph.forget_compiled_functions(model)
    return model
