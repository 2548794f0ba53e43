"""The JAX steps of ``bench_layer.py --backend jax``: what is timed, per contender.

Contenders (``CONTENDERS``, name -> factory(axis)):

* ``kerasbn``: ``kerasbn.BatchNorm``;
* ``keras``: ``keras.layers.BatchNormalization``;
* ``flax``: ``flax.linen.BatchNorm`` (momentum 0.99, epsilon 1e-3, as the
  Keras layers), behind :class:`FlaxBatchNorm`, which gives it the Keras
  layer methods the driver calls (``build``, ``get_weights``,
  ``set_weights``, Keras's weight order).

What is timed, identically for all three, with every array already on the
device and every step compiled by ``jax.jit`` once before timing:

* **train** (:func:`train_step`): one jitted function of ``(x, dy)`` and the
  layer's state that runs the forward pass in training mode and its
  vector-Jacobian product with the fixed upstream gradient ``dy``, with
  respect to ``x`` and the trainable weights (gamma, beta). It returns ``y``,
  the three gradients and the new moving statistics; the Keras layers run
  through ``stateless_call`` (as Keras's own JAX trainer does), Flax through
  ``Module.apply(..., mutable=["batch_stats"])``. The new statistics are
  returned, not written back, so every call does the same work.
* **infer** (:func:`inference_step`): one jitted forward pass in inference
  mode (moving statistics), returning ``y``.

Each call ends with ``jax.block_until_ready`` on all results. The module
exposes the names every ``steps_<backend>.py`` does: ``CONTENDERS``,
``PEERS``, ``to_tensor``, ``train_step``, ``inference_step``, ``copy_step``
and ``formulation``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import xla_programs

import kerasbn
from kerasbn import backends


class FlaxBatchNorm:
    """``flax.linen.BatchNorm`` with the Keras layer methods the driver uses.

    Args:
        axis: the channel axis.
        momentum, epsilon: as the Keras layers (Flax uses the same momentum
            convention: the weight of the old value).
        dtype: the output dtype (Flax's ``dtype``); None keeps the input's.
            The statistics and the weights are float32 either way.
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        dtype=None,
    ):
        self.axis = axis
        options = dict(axis=axis, momentum=momentum, epsilon=epsilon, dtype=dtype)
        self.train_module = nn.BatchNorm(use_running_average=False, **options)
        self.infer_module = nn.BatchNorm(use_running_average=True, **options)
        self.variables = None

    def build(self, shape: Sequence[int]) -> None:
        self.variables = self.train_module.init(
            jax.random.PRNGKey(0), jnp.zeros(shape, jnp.float32)
        )

    def get_weights(self) -> list[np.ndarray]:
        """gamma, beta, moving mean, moving variance (Keras's order)."""
        params, stats = self.variables["params"], self.variables["batch_stats"]
        return [
            np.asarray(a)
            for a in (params["scale"], params["bias"], stats["mean"], stats["var"])
        ]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        gamma, beta, mean, var = (jnp.asarray(w) for w in weights)
        self.variables = {
            "params": {"scale": gamma, "bias": beta},
            "batch_stats": {"mean": mean, "var": var},
        }


CONTENDERS: dict[str, Callable[[int], object]] = {
    "kerasbn": lambda axis: kerasbn.BatchNorm(axis=axis),
    "keras": lambda axis: keras.layers.BatchNormalization(axis=axis),
    "flax": FlaxBatchNorm,
}
# The contenders kerasbn is compared with, as printed in the table.
PEERS = {"keras": "Keras 3", "flax": "flax.linen"}


def to_tensor(array: np.ndarray):
    """``array`` as a JAX array on the default device."""
    return jax.device_put(jnp.asarray(array))


def copy_step(x):
    """A jitted pass that reads ``x`` and writes a new array (``-x``), for the
    memory-bandwidth floor (XLA elides a plain copy or ``x * 1``)."""
    negate = jax.jit(lambda t: -t)
    return lambda: jax.block_until_ready(negate(x))


def _keras_train(layer: keras.layers.Layer):
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def step(x, dy, trainable, non_trainable):
        def forward(x, trainable):
            return layer.stateless_call(trainable, non_trainable, x, training=True)

        y, vjp, new_non_trainable = jax.vjp(forward, x, trainable, has_aux=True)
        dx, d_trainable = vjp(dy)
        return y, dx, d_trainable, new_non_trainable

    return lambda x, dy: jax.block_until_ready(step(x, dy, trainable, non_trainable))


def _flax_train(layer: FlaxBatchNorm):
    module, variables = layer.train_module, layer.variables

    @jax.jit
    def step(x, dy, params, batch_stats):
        def forward(x, params):
            y, updates = module.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                mutable=["batch_stats"],
            )
            return y, updates["batch_stats"]

        y, vjp, new_stats = jax.vjp(forward, x, params, has_aux=True)
        dx, d_params = vjp(dy)
        return y, dx, d_params, new_stats

    return lambda x, dy: jax.block_until_ready(
        step(x, dy, variables["params"], variables["batch_stats"])
    )


def train_kernels(layer, shape: Sequence[int]) -> tuple[int, float]:
    """The kernels of the compiled train step of a built Keras layer
    (:func:`xla_programs.train_step_ops`) and its bytes accessed."""
    program = xla_programs.train_step_program(layer, shape)
    kernels = len(xla_programs.entry_ops(program.as_text()))
    return kernels, xla_programs.bytes_accessed(program)


def block_kernels(model, in_shape, out_shape) -> tuple[int, float]:
    """The kernels and bytes accessed of a block's compiled train step."""
    program = xla_programs.block_step_program(model, in_shape, out_shape)
    kernels = len(xla_programs.entry_ops(program.as_text()))
    return kernels, xla_programs.bytes_accessed(program)


def train_step(layer, shape: Sequence[int]) -> Callable[[object, object], object]:
    """The jitted train step of a built contender (see the module docstring)."""
    del shape  # JAX compiles for the shapes of the first call
    if isinstance(layer, FlaxBatchNorm):
        return _flax_train(layer)
    return _keras_train(layer)


def inference_step(layer, shape: Sequence[int]) -> Callable[[object], object]:
    """The jitted inference call of a built contender."""
    del shape
    if isinstance(layer, FlaxBatchNorm):
        module, variables = layer.infer_module, layer.variables
        step = jax.jit(lambda x, variables: module.apply(variables, x))
        return lambda x: jax.block_until_ready(step(x, variables))
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def infer(x, trainable, non_trainable):
        y, _ = layer.stateless_call(trainable, non_trainable, x, training=False)
        return y

    return lambda x: jax.block_until_ready(infer(x, trainable, non_trainable))


def formulation(shape, axis: int) -> str:
    """How kerasbn computes a float32 train step of this shape: its backend
    module's formulation, or ``"generic"`` (:mod:`kerasbn.formulas`)."""
    axes = [a for a in range(len(shape)) if a != axis % len(shape)]
    plan = backends.formulation(shape, axes)
    return "generic" if plan is None else plan.formulation


# ---------------------------------------------------------------------- blocks
def block_step(model: keras.Model) -> Callable[[object, object], object]:
    """The jitted train step of a built Keras block (``bench_layer.py --block``).

    ``jax.value_and_grad`` of ``vdot(block(x), dy)`` with respect to the
    trainable weights, through ``stateless_call`` as Keras's JAX trainer
    runs a model: the block's output is consumed, not returned, so XLA may
    fuse the normalization into the loss and the ReLU. Returns the loss, the
    gradients and the new moving statistics.
    """
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def step(x, dy, trainable, non_trainable):
        def loss(trainable):
            y, new = model.stateless_call(trainable, non_trainable, x, training=True)
            return jnp.vdot(y, dy), new

        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
        return value, grads, new

    return lambda x, dy: jax.block_until_ready(step(x, dy, trainable, non_trainable))


class _FlaxBlock(nn.Module):
    """A 1x1 convolution (or a dense layer), ``flax.linen.BatchNorm``, ReLU."""

    features: int
    rank: int

    @nn.compact
    def __call__(self, x, train: bool):
        if self.rank == 2:
            x = nn.Dense(self.features, use_bias=False)(x)
        else:
            x = nn.Conv(self.features, (1,) * (self.rank - 2), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3)(x)
        return nn.relu(x)


def native_block(shape, axis: int, in_shape, weights):
    """The flax block of ``bench_layer.py --block``, or None (channels first:
    ``flax.linen.Conv`` takes channels-last inputs only).

    Args:
        shape: the BN input's shape; ``axis`` its channel axis.
        in_shape: the block's input shape.
        weights: the Keras block's weights: kernel, gamma, beta, moving
            mean and variance.
    """
    if axis % len(shape) != len(shape) - 1:
        return None
    module = _FlaxBlock(shape[-1], len(shape))
    kernel, gamma, beta, mean, var = (jnp.asarray(w) for w in weights)
    layer = "Dense_0" if len(shape) == 2 else "Conv_0"
    params = {layer: {"kernel": kernel}, "BatchNorm_0": {"scale": gamma, "bias": beta}}
    batch_stats = {"BatchNorm_0": {"mean": mean, "var": var}}

    @jax.jit
    def step(x, dy, params, batch_stats):
        def loss(params):
            y, updates = module.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.vdot(y, dy), updates["batch_stats"]

        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, grads, new

    return lambda x, dy: jax.block_until_ready(step(x, dy, params, batch_stats))
