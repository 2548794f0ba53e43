"""Backend fast paths, chosen in one place.

Each backend module exposes the same ``batch_normalize`` and ``normalize`` as
:mod:`kerasbn.ops` (which is the fallback everywhere) plus ``applies(x, axes,
mask)``, which says whether it computes that call exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from kerasbn import ops


def implementation(x, axes: Sequence[int], mask=None):
    """The module whose ``batch_normalize``/``normalize`` serve this call.

    Args:
        x: the layer's input.
        axes: the reduction axes.
        mask: the broadcastable mask, or None.

    Returns:
        A backend module when its ``applies`` accepts the call, else
        :mod:`kerasbn.ops`.
    """
    if keras.backend.backend() == "tensorflow":
        from kerasbn.backends import tensorflow as tf_backend

        if tf_backend.applies(x, axes, mask):
            return tf_backend
    return ops


def check_divisible(x, group_size: int):
    """Returns ``x`` once its batch size is known to be a multiple of ``group_size``.

    A static batch size is checked at once (ValueError); a dynamic one on the
    TensorFlow backend by an in-graph assertion that ``x`` depends on
    (InvalidArgumentError).
    """
    message = (
        f"`virtual_batch_size`={group_size} must divide the batch size in training"
    )
    batch = x.shape[0]
    if batch is not None:
        if batch % group_size:
            raise ValueError(
                f"{message}; got a batch of {batch} (shape {tuple(x.shape)})."
            )
        return x
    if keras.backend.backend() != "tensorflow":
        return x
    import tensorflow as tf

    check = tf.debugging.assert_equal(tf.shape(x)[0] % group_size, 0, message=message)
    with tf.control_dependencies([check]):
        return tf.identity(x)
