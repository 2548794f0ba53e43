"""The operations of a Keras layer's compiled XLA programs on JAX.

``bench_layer.py --backend jax --kernels`` counts the kernels of a train
step with :func:`train_step_ops` (of a block with :func:`block_step_program`),
and ``tests/test_backends_jax.py`` compares kerasbn's programs with Keras's
BN's through the same functions. An operation is an instruction of the
optimized program's entry computation, parameters, constants, tuples and
bitcasts aside (a fusion is one kernel). :func:`bytes_accessed` is XLA's own
estimate of a program's memory traffic (its cost analysis), which for a
memory-bound step predicts the time without the noise of a timing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp

_FREE = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")


def entry_ops(text: str) -> list[str]:
    """The sorted operations of the entry computation of an optimized XLA
    program's text (``compiled.as_text()``)."""
    entry = text[text.index("ENTRY") :].split("\n}")[0]
    return sorted(
        op for op in re.findall(r" = \S+ ([a-z-]+)\(", entry) if op not in _FREE
    )


def _variables(layer):
    return (
        [v.value for v in layer.trainable_variables],
        [v.value for v in layer.non_trainable_variables],
    )


def train_step_ops(layer, shape: Sequence[int]) -> list[str]:
    """The operations of a built layer's jitted train step: forward, VJP and
    the new moving statistics, as Keras's JAX trainer runs a layer
    (``stateless_call``)."""
    return entry_ops(train_step_program(layer, shape).as_text())


def bytes_accessed(compiled) -> float:
    """XLA's estimate of the bytes a compiled program reads and writes."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["bytes accessed"])


def block_step_program(model, in_shape: Sequence[int], out_shape: Sequence[int]):
    """The compiled train step of a built block (``bench_layer.py --block``):
    ``value_and_grad`` of ``vdot(block(x), dy)`` w.r.t. the trainable weights."""
    trainable, non_trainable = _variables(model)

    def step(x, dy, trainable, non_trainable):
        def loss(trainable):
            y, new = model.stateless_call(trainable, non_trainable, x, training=True)
            return jnp.vdot(y, dy), new

        return jax.value_and_grad(loss, has_aux=True)(trainable)

    x, dy = jnp.ones(in_shape, jnp.float32), jnp.ones(out_shape, jnp.float32)
    return jax.jit(step).lower(x, dy, trainable, non_trainable).compile()


def train_step_program(layer, shape: Sequence[int]):
    """The compiled train step of :func:`train_step_ops`."""
    trainable, non_trainable = _variables(layer)

    def step(x, dy, trainable, non_trainable):
        def forward(x, trainable):
            return layer.stateless_call(trainable, non_trainable, x, training=True)

        y, vjp, new_non_trainable = jax.vjp(forward, x, trainable, has_aux=True)
        return y, vjp(dy), new_non_trainable

    x = jnp.ones(shape, jnp.float32)
    return jax.jit(step).lower(x, x, trainable, non_trainable).compile()


def inference_ops(layer, shape: Sequence[int]) -> list[str]:
    """The operations of a built layer's jitted inference call."""
    trainable, non_trainable = _variables(layer)

    def infer(x, trainable, non_trainable):
        return layer.stateless_call(trainable, non_trainable, x, training=False)[0]

    x = jnp.zeros(shape, jnp.float32)
    compiled = jax.jit(infer).lower(x, trainable, non_trainable).compile()
    return entry_ops(compiled.as_text())
