"""The operations of a Keras layer's compiled XLA programs on JAX.

``bench_layer.py --backend jax --kernels`` counts the kernels of a train
step with :func:`train_step_ops`, and ``tests/test_backends_jax.py`` compares
kerasbn's programs with Keras's BN's through the same functions. An
operation is an instruction of the optimized program's entry computation,
parameters, constants, tuples and bitcasts aside (a fusion is one kernel).
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
    trainable, non_trainable = _variables(layer)

    def step(x, dy, trainable, non_trainable):
        def forward(x, trainable):
            return layer.stateless_call(trainable, non_trainable, x, training=True)

        y, vjp, new_non_trainable = jax.vjp(forward, x, trainable, has_aux=True)
        return y, vjp(dy), new_non_trainable

    x = jnp.ones(shape, jnp.float32)
    compiled = jax.jit(step).lower(x, x, trainable, non_trainable).compile()
    return entry_ops(compiled.as_text())


def inference_ops(layer, shape: Sequence[int]) -> list[str]:
    """The operations of a built layer's jitted inference call."""
    trainable, non_trainable = _variables(layer)

    def infer(x, trainable, non_trainable):
        return layer.stateless_call(trainable, non_trainable, x, training=False)[0]

    x = jnp.zeros(shape, jnp.float32)
    compiled = jax.jit(infer).lower(x, trainable, non_trainable).compile()
    return entry_ops(compiled.as_text())
