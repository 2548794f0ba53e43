"""TensorFlow contenders and steps for ``bench_layer.py --backend tensorflow``.

Contenders: kerasbn, Keras 3's BN and tf.keras's BN (fused where it can be).
A train step is one ``tf.function``: forward and backward with a fixed
upstream gradient (``output_gradients``), returning ``y`` and the gradients
with respect to ``x``, gamma and beta, and updating the moving statistics. An
inference step is ``layer(x, training=False)`` under ``tf.function``.

Every steps module (``steps_<backend>.py``) exposes the same names:
``CONTENDERS``, ``PEERS``, ``to_tensor``, ``train_step``, ``inference_step``,
``copy_step`` and ``formulation``.
"""

from __future__ import annotations

import keras
import tensorflow as tf
import tf_keras  # the pip package itself: Keras 3 stays the default

import kerasbn
from kerasbn import backends

CONTENDERS = {
    "kerasbn": kerasbn.BatchNorm,
    "keras": keras.layers.BatchNormalization,
    "tf_keras": tf_keras.layers.BatchNormalization,
}
# The contenders kerasbn is compared with, as printed in the table.
PEERS = {"keras": "Keras 3", "tf_keras": "tf.keras"}


def to_tensor(array):
    return tf.constant(array)


def train_step(layer, shape):
    """A ``tf.function``: forward + backward with a fixed upstream gradient."""

    @tf.function
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        grads = tape.gradient(y, [x, *layer.trainable_weights], output_gradients=dy)
        return y, grads

    return step


def inference_step(layer, shape):
    return tf.function(lambda x: layer(x, training=False))


def copy_step(x):
    """A TensorFlow copy of ``x``, for the memory-bandwidth floor."""
    copy = tf.function(lambda t: tf.raw_ops.DeepCopy(x=t))
    return lambda: copy(x)


# Ops that cost no kernel launch: left out of the op counts.
FREE_OPS = {"Const", "Placeholder", "Identity", "NoOp", "_Arg", "_Retval"}


def graph_ops(function, *args) -> dict[str, int]:
    """Op counts of ``function`` (a ``tf.function``) traced for ``args``.

    Returns:
        ``{"traced": n, "optimized": m}``: the ops of the traced graph and of
        that graph after TensorFlow's graph optimizer (Grappler, as
        ``tf.function`` runs it on the CPU), both without :data:`FREE_OPS`.
    """
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.grappler import tf_optimizer

    concrete = function.get_concrete_function(*args)
    graph = concrete.graph
    traced = [op.type for op in graph.get_operations()]
    meta = tf.compat.v1.train.export_meta_graph(
        graph_def=graph.as_graph_def(add_shapes=True), graph=graph
    )
    fetches = meta.collection_def["train_op"].node_list.value
    fetches.extend(t.name for t in concrete.outputs)
    fetches.extend(op.name for op in graph.get_operations() if "Assign" in op.type)
    optimized = tf_optimizer.OptimizeGraph(config_pb2.ConfigProto(), meta)
    return {
        "traced": sum(t not in FREE_OPS for t in traced),
        "optimized": sum(n.op not in FREE_OPS for n in optimized.node),
    }


def formulation(shape, axis: int) -> str:
    """How kerasbn computes a float32 train step of this shape: its backend
    module's formulation, or ``"generic"`` (:mod:`kerasbn.formulas`)."""
    axes = [a for a in range(len(shape)) if a != axis % len(shape)]
    plan = backends.formulation(shape, axes)
    return "generic" if plan is None else plan.formulation


# ---------------------------------------------------------------------- blocks
def block_step(model):
    """A ``tf.function`` train step of a built block (``bench_layer.py --block``).

    The gradients of ``sum(block(x) * dy)`` with respect to the trainable
    weights: the block's output is consumed, not returned. Works for Keras 3
    and tf.keras models alike. Returns the loss and the gradients.
    """

    @tf.function
    def step(x, dy):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) * dy)
        return loss, tape.gradient(loss, model.trainable_weights)

    return step


def native_block(shape, axis: int, in_shape, weights):
    """The tf.keras block (1x1 convolution or dense layer, tf.keras's BN, ReLU)
    of ``bench_layer.py --block``, with ``weights`` (kernel, gamma, beta,
    moving mean and variance)."""
    layers = tf_keras.layers
    rank = len(shape)
    if rank == 2:
        producer = layers.Dense(shape[-1], use_bias=False)
    else:
        conv = {3: layers.Conv1D, 4: layers.Conv2D, 5: layers.Conv3D}[rank]
        data_format = "channels_last" if axis % rank == rank - 1 else "channels_first"
        producer = conv(shape[axis], 1, use_bias=False, data_format=data_format)
    model = tf_keras.Sequential(
        [
            tf_keras.Input(in_shape[1:], batch_size=in_shape[0]),
            producer,
            layers.BatchNormalization(axis=axis),
            layers.ReLU(),
        ]
    )
    model.set_weights(weights)
    return block_step(model)
