"""Synchronized batch statistics across tf.distribute replicas and workers.

Each replica computes its shifted sufficient moments ``(count, shift, offset,
m2)`` locally. One ``all_gather`` brings every replica's moments to every
replica (under ``MultiWorkerMirroredStrategy`` and ``MirroredStrategy`` it is a
single ``CollectiveGatherV2``), and :func:`kerasbn.ops.combine_moments` merges
them exactly (Chan et al.), weighted by the counts, so uneven or empty replicas
give the statistics of the global batch; ``E[x**2] - E[x]**2`` is never
formed. Every replica merges the same gathered tensor with the same ops, so all
replicas and workers get bit-identical statistics. Gradients flow through
``all_gather`` to every replica's inputs. Outside a strategy, or with one
replica, the local moments are used. Only training calls this module: the
layer's inference path uses the moving statistics and communicates nothing.
"""

from __future__ import annotations

import tensorflow as tf

from kerasbn import ops as bn_ops


def global_moments(local: bn_ops.Moments) -> bn_ops.Moments:
    """Merges the local moments of every replica in sync.

    Args:
        local: this replica's :class:`kerasbn.ops.Moments`; all fields have the
            same shape on every replica.

    Returns:
        The moments of the global batch (the local ones where there is no
        cross-replica context to merge over).

    Example:
        >>> m = bn_ops.sufficient_moments(tf.ones((2, 3)), [0])
        >>> global_moments(m).count.shape  # no strategy: the local moments
        TensorShape([1, 3])
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return local
    packed = tf.stack(list(local))[tf.newaxis]
    gathered = context.all_gather(packed, axis=0)
    # MirroredStrategy's all_gather returns a fully unknown shape, which
    # tf.unstack cannot split; only the number of replicas is really unknown.
    gathered = tf.ensure_shape(gathered, [None, *packed.shape[1:]])
    return bn_ops.combine_moments(bn_ops.Moments(*tf.unstack(gathered, axis=1)))
