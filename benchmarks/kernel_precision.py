"""Why kerasbn shifts its inputs: a vendor kernel against kerasbn on far means.

Not a timing. For inputs whose mean is far from zero next to their spread,
prints the largest error of the backend's own batch-norm kernel on the raw
input (TensorFlow's ``FusedBatchNormV3``, ``torch.batch_norm``, or on JAX the
plain float32 sums of ``x`` and ``x * x``) and of a ``kerasbn.BatchNorm``
training call, against NumPy float64:

* constant channels, which must normalize to exactly 0 (``max abs(y)``);
* a mean of 1e4 with a spread of 1e-2 (the relative error of the biased
  batch variance).

Run:
    python benchmarks/kernel_precision.py --backend tensorflow
    python benchmarks/kernel_precision.py --backend torch
    python benchmarks/kernel_precision.py --backend jax
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from harness import markdown_table, select_backend  # noqa: E402

BACKEND = select_backend()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerasbn  # noqa: E402

SHAPE = (32, 56, 56, 64)
EPSILON = 1e-5
CONSTANTS = (9984.0, 1e6 + 0.5)


def vendor(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(y, biased variance)`` of the backend's own kernel on channels-last ``x``."""
    n = x.size // x.shape[-1]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        empty = tf.constant((), tf.float32)
        channels = x.shape[-1]
        y, _, var, *_ = tf.raw_ops.FusedBatchNormV3(
            **dict(
                x=tf.constant(x), scale=tf.ones(channels), offset=tf.zeros(channels)
            ),
            **dict(mean=empty, variance=empty, epsilon=EPSILON),
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=True,
        )
        return y.numpy(), var.numpy() * (n - 1) / n
    if BACKEND == "torch":
        import torch

        t = torch.as_tensor(x).permute(0, 3, 1, 2)
        var = torch.zeros(x.shape[-1])
        y = torch.batch_norm(
            t, None, None, torch.zeros_like(var), var, True, 1.0, EPSILON, False
        )
        return y.permute(0, 2, 3, 1).numpy(), var.numpy() * (n - 1) / n
    import jax.numpy as jnp

    rows = jnp.reshape(jnp.asarray(x), (-1, x.shape[-1]))
    mean = jnp.sum(rows, 0) / n
    var = jnp.maximum(jnp.sum(rows * rows, 0) / n - mean * mean, 0.0)
    return np.asarray((rows - mean) / jnp.sqrt(var + EPSILON)).reshape(
        x.shape
    ), np.asarray(var)


def ours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(y, moving variance after one step of momentum 0)`` of kerasbn."""
    layer = kerasbn.BatchNorm(momentum=0.0, epsilon=EPSILON, center=False, scale=False)
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    return y, keras.ops.convert_to_numpy(layer.moving_variance)


def main() -> None:
    rng = np.random.default_rng(0)
    constants = [np.full(SHAPE, c, np.float32) for c in CONSTANTS]
    far = (1e4 + 1e-2 * rng.standard_normal(SHAPE)).astype(np.float32)
    exact = far.astype(np.float64).reshape(-1, SHAPE[-1]).var(0)
    rows = []
    label = {
        "tensorflow": "FusedBatchNormV3 of x",
        "torch": "torch.batch_norm of x",
        "jax": "float32 sums of x and x * x",
    }[BACKEND]
    for name, compute in ((label, vendor), ("kerasbn.BatchNorm", ours)):
        worst = [np.max(np.abs(compute(c)[0])) for c in constants]
        _, var = compute(far)
        error = np.max(np.abs(var - exact) / exact)
        rows.append([name, *(f"{w:.3g}" for w in worst), f"{error:.2g}"])
    print(f"input {SHAPE}, epsilon {EPSILON}\n")
    header = ["", *(f"constant {c}: max abs(y)" for c in CONSTANTS)]
    header.append("mean 1e4, std 1e-2: variance rel. error")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    sys.exit(main())
