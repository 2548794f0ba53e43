"""GPU-ready: no host read in a training step, CPU-measured rules only on the CPU.

No GPU is needed: the first half checks that a training step never waits on
the device, the second that each backend's choice of formulation, made for
the CPU's vector width or measured on a CPU only, is not made for another
device.

A value read on the host (``.item()``, ``bool(t)``, ``if t:``, ``.numpy()``)
stops the host until the device has computed it, which serializes a GPU
step. Keras's own BN reads none; neither may kerasbn, on any path:

* PyTorch: every host read of a tensor goes through ATen's
  ``_local_scalar_dense``; a dispatch mode that fails on it runs a
  training forward and backward of each fast-path layout (and checks
  itself on a host read first);
* JAX: the train step is traced by ``jax.jit``, where a host read of a
  traced value raises;
* TensorFlow: the train step is traced by ``tf.function``, where a Python
  test of a symbolic tensor raises, and its graph holds no Python callback.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kerasbn

BACKEND = keras.backend.backend()
# (shape, axis): channels last (4-D), rows (2-D), channels first (planes),
# and few channels of many samples (PyTorch's "matvec").
CASES = [
    ((8, 6, 6, 16), -1),
    ((32, 100), -1),
    ((8, 16, 6, 6), 1),
    ((64, 24, 24, 10), -1),
]


def _data(shape, dtype="float32"):
    rng = np.random.default_rng(0)
    return rng.normal(0.5, 2.0, shape).astype(dtype)


if BACKEND == "torch":
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        """Raises on any read of a tensor's value on the host."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                raise AssertionError(f"a host read of a tensor's value: {func}")
            return func(*args, **(kwargs or {}))


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's dispatcher")
def test_the_host_read_detector_catches_item_and_bool():
    with pytest.raises(AssertionError, match="host read"):
        with HostReads():
            bool(torch.ones(2).sum() > 0)


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's dispatcher")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape, axis", CASES)
def test_torch_train_step_reads_no_tensor_value_on_the_host(shape, axis, dtype):
    layer = kerasbn.BatchNorm(axis=axis)
    layer.build(shape)
    x = torch.tensor(_data(shape)).to(getattr(torch, dtype)).requires_grad_(True)
    layer(x, training=True)  # first call outside: Keras's own set-up
    with HostReads():
        y = layer(x, training=True)
        (y.float() * 1.5).sum().backward()
    assert x.grad is not None and layer.gamma.value.grad is not None


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit tracing")
@pytest.mark.parametrize("shape, axis", CASES)
def test_jax_train_step_traces_under_jit(shape, axis):
    import jax

    layer = kerasbn.BatchNorm(axis=axis)
    layer.build(shape)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def step(x, trainable, non_trainable):
        def loss(x, trainable):
            y, new = layer.stateless_call(trainable, non_trainable, x, training=True)
            return (y * 1.5).sum(), new

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, trainable)

    x = jax.numpy.asarray(_data(shape))
    (dx, _), new = step(x, trainable, non_trainable)
    # The moving mean moved towards the batch mean (an independent reference).
    reduce = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    expected = 0.01 * _data(shape).mean(axis=reduce)
    np.testing.assert_allclose(np.asarray(new[0]), expected, rtol=1e-4, atol=1e-6)
    assert dx.shape == shape


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function tracing")
@pytest.mark.parametrize("shape, axis", CASES)
def test_tensorflow_train_step_traces_without_python_callbacks(shape, axis):
    import tensorflow as tf

    layer = kerasbn.BatchNorm(axis=axis)
    layer.build(shape)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * 1.5)
        return tape.gradient(loss, [x, *layer.trainable_weights])

    x = tf.constant(_data(shape))
    graph = step.get_concrete_function(x).graph
    callbacks = {"PyFunc", "EagerPyFunc", "PyFuncStateless"}
    assert not [op.type for op in graph.get_operations() if op.type in callbacks]
    step(x)
    reduce = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    expected = 0.01 * _data(shape).mean(axis=reduce)
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), expected, rtol=1e-4, atol=1e-6
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the TensorFlow fast path")
def test_tensorflow_cpu_thresholds_and_widening_apply_only_on_the_cpu():
    import tensorflow as tf

    from kerasbn.backends import tensorflow as tf_backend

    axes = [0, 1, 2]

    def name(shape, axes, epsilon=1e-3, device="cpu"):
        return tf_backend.formulation(
            shape, axes, epsilon=epsilon, device=device
        ).formulation

    # On the CPU the fused kernel waits for its measured sizes, and few
    # channels are widened to the CPU's vector width.
    assert name((32, 24, 24, 10), axes) == "widened"
    assert name((32, 24, 24, 10), axes, device="gpu") == "fused"
    assert name((32, 8, 8, 20), axes, device="gpu") == "fused"
    # cuDNN's smallest epsilon and channels first hold on any device, and
    # nothing is widened off the CPU.
    assert name((32, 8, 8, 20), axes, 1e-6, "gpu") == "composite"
    assert name((8, 16, 6, 6), [0, 2, 3], device="gpu") == "composite"
    assert tf_backend.device(tf.zeros(2)) == tf_backend.CPU_DEVICE


@pytest.mark.skipif(BACKEND != "jax", reason="the JAX fast path")
def test_jax_rough_statistics_apply_only_on_the_cpu():
    from kerasbn.backends import jax as jax_backend

    shape, axes = (32, 56, 56, 64), [0, 1, 2]
    assert jax_backend.formulation(shape, axes, device="cpu").formulation == "rough"
    for device in ("gpu", "cuda", "tpu"):
        plan = jax_backend.formulation(shape, axes, device=device)
        assert plan.formulation == "shifted"


@pytest.mark.skipif(BACKEND != "torch", reason="the PyTorch fast path")
def test_torch_matvec_applies_only_on_the_cpu():
    from kerasbn.backends import torch as torch_backend

    shape, axes = (32, 24, 24, 10), [0, 1, 2]

    def name(shape, axes, device):
        return torch_backend.formulation(shape, axes, device=device).formulation

    assert name(shape, axes, "cpu") == "matvec"
    for device in ("cuda", "mps", "xpu", "meta"):
        assert name(shape, axes, device) == "channels_last"
    assert name((64, 10), [0], "cuda") == "rows"
