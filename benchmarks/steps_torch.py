"""PyTorch contenders and steps for ``bench_layer.py --backend torch``.

Every steps module (``steps_<backend>.py``) exposes the same names:
``CONTENDERS``, ``PEERS``, ``to_tensor``, ``train_step``, ``inference_step``,
``copy_step`` and ``formulation``. Contenders:

* ``kerasbn``: ``kerasbn.BatchNorm``;
* ``keras``: ``keras.layers.BatchNormalization``;
* ``torch_nn``: ``torch.nn.BatchNorm1d``/``2d``/``3d`` on the same data
  without copying it: a channels-last 4-D or 5-D input is permuted to
  ``(N, C, H, W[, D])``, PyTorch's ``channels_last`` memory format (what a
  PyTorch CNN gets from ``model.to(memory_format=torch.channels_last)``);
  channels-first inputs and ``(N, C)`` are passed as they are; other
  channels-last inputs (``(N, L, C)``) are transposed to ``(N, C, L)``. Its
  momentum and epsilon are set to Keras's (``momentum=0.01`` in PyTorch's
  convention, ``eps=1e-3``). PyTorch keeps the unbiased variance; nothing
  else differs.

Steps (eager PyTorch, as Keras runs torch models unless ``jit_compile=True``):

* **train**: forward in training mode, then ``torch.autograd.grad`` of ``y``
  with a fixed upstream gradient with respect to ``x`` and the trainable
  weights; the moving statistics are updated; returns ``y`` and the
  gradients;
* **infer**: ``layer(x, training=False)`` under ``torch.no_grad()``, as
  Keras's ``predict`` runs it;
* **eager train** (``bench_layer.py --harness eager``,
  :func:`eager_train_step`): ``layer(x, training=True)``, then ``backward()``
  of ``(y * dy).sum()``, as a hand-written PyTorch loop runs it.

On a GPU every step ends with ``torch.cuda.synchronize()``, so a step's time
is its device time too.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import torch

import kerasbn
from kerasbn import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TorchNNBatchNorm:
    """``torch.nn.BatchNorm{1,2,3}d`` behind the few layer methods the benchmarks use.

    Args:
        axis: the channel axis of the inputs (an int).
    """

    def __init__(self, axis: int = -1):
        self.axis = axis
        self.module = None

    def build(self, shape) -> None:
        rank = len(shape)
        self.axis %= rank
        module_class = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d}.get(
            rank, {4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}.get(rank)
        )
        self.module = module_class(shape[self.axis], eps=1e-3, momentum=0.01)
        self.module.to(DEVICE)

    @property
    def built(self) -> bool:
        return self.module is not None

    @property
    def trainable_weights(self) -> list:
        return [self.module.weight, self.module.bias]

    def get_weights(self) -> list[np.ndarray]:
        m = self.module
        tensors = (m.weight, m.bias, m.running_mean, m.running_var)
        return [t.detach().cpu().numpy() for t in tensors]

    def set_weights(self, weights) -> None:
        m = self.module
        with torch.no_grad():
            for t, w in zip((m.weight, m.bias, m.running_mean, m.running_var), weights):
                t.copy_(torch.as_tensor(np.asarray(w), device=t.device))

    def __call__(self, x, training: bool = False):
        self.module.train(bool(training))
        rank = x.dim()
        if self.axis == 1 or rank == 2:
            return self.module(x)
        if self.axis != rank - 1:
            raise ValueError(f"torch_nn takes axis 1 or -1; got axis={self.axis}.")
        return self.module(x.movedim(-1, 1)).movedim(1, -1)


CONTENDERS: dict[str, Callable[..., object]] = {
    "kerasbn": kerasbn.BatchNorm,
    "keras": keras.layers.BatchNormalization,
    "torch_nn": TorchNNBatchNorm,
}
# The contenders kerasbn is compared with, as printed in the table.
PEERS = {"keras": "Keras 3", "torch_nn": "torch.nn"}


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """A NumPy array as a torch tensor on the benchmark's device."""
    return torch.as_tensor(np.ascontiguousarray(array), device=DEVICE)


def _built(layer, shape):
    if not layer.built:
        layer.build(shape)
    return layer


def _trainable(layer) -> list[torch.Tensor]:
    return [getattr(w, "value", w) for w in layer.trainable_weights]


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def train_step(layer, shape) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """Forward and backward with the fixed upstream gradient ``dy``.

    Returns:
        ``step(x, dy) -> (y, [dx, *dweights])``, the moving statistics
        updated.
    """
    weights = _trainable(_built(layer, shape))

    def step(x, dy):
        x = x.detach().requires_grad_(True)
        y = layer(x, training=True)
        grads = torch.autograd.grad(y, [x, *weights], dy)
        _synchronize()
        return y, grads

    return step


def eager_train_step(layer, shape) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A plain eager training step: ``layer(x, training=True)``, then
    ``backward()`` of the scalar ``(y * dy).sum()``.

    This is what a hand-written PyTorch loop does (``zero_grad(set_to_none=
    True)``, forward, loss, ``backward``): the gradients land in ``.grad``,
    and the loss's own multiply and sum (and their backward) are timed too,
    for every contender alike.
    """
    weights = _trainable(_built(layer, shape))

    def step(x, dy):
        for w in weights:
            w.grad = None
        x = x.detach().requires_grad_(True)
        (layer(x, training=True) * dy).sum().backward()
        _synchronize()

    return step


def inference_step(layer, shape) -> Callable[[torch.Tensor], object]:
    """``step(x) -> y``: inference mode under ``torch.no_grad()``."""
    _built(layer, shape)

    def step(x):
        with torch.no_grad():
            y = layer(x, training=False)
        _synchronize()
        return y

    return step


def copy_step(x: torch.Tensor) -> Callable[[], object]:
    """A PyTorch copy of ``x`` into a ready buffer, for the bandwidth floor."""
    target = torch.empty_like(x)

    def copy():
        target.copy_(x)
        _synchronize()

    return copy


def formulation(shape, axis: int) -> str:
    """How kerasbn computes a float32 train step of this shape: its backend
    module's formulation, or ``"generic"`` (:mod:`kerasbn.formulas`)."""
    axes = [a for a in range(len(shape)) if a != axis % len(shape)]
    device = backends.current().device(torch.empty(0, device=DEVICE))
    plan = backends.formulation(shape, axes, device=device)
    return "generic" if plan is None else plan.formulation


# ---------------------------------------------------------------------- blocks
def block_step(model) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """The train step of a built Keras block (``bench_layer.py --block``).

    ``torch.autograd.grad`` of ``(block(x) * dy).sum()`` with respect to the
    trainable weights: the block's output is consumed, not returned.
    Returns the loss and the gradients.
    """
    weights = _trainable(model)

    def step(x, dy):
        loss = (model(x, training=True) * dy).sum()
        grads = torch.autograd.grad(loss, weights)
        _synchronize()
        return loss.detach(), grads

    return step


def native_block(shape, axis: int, in_shape, weights):
    """The ``torch.nn`` block of ``bench_layer.py --block``: a 1x1
    ``Conv{1,2,3}d`` (``Linear`` for 2-D inputs), ``BatchNorm{1,2,3}d`` and
    ``ReLU``, with the Keras block's ``weights`` (kernel, gamma, beta,
    moving mean and variance). Channels-last inputs are permuted to
    ``(N, C, ...)`` without a copy, PyTorch's ``channels_last`` memory format,
    as :class:`TorchNNBatchNorm` sees them."""
    rank = len(shape)
    channels, cin = shape[axis], in_shape[axis]
    kernel, gamma, beta, mean, var = (np.asarray(w) for w in weights)
    if rank == 2:
        producer = torch.nn.Linear(cin, channels, bias=False)
        kernel = kernel.T
    else:
        conv = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}[rank]
        producer = conv(cin, channels, 1, bias=False)
        kernel = kernel.reshape(cin, channels).T.reshape(producer.weight.shape)
    norm = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d}.get(
        rank, {4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}.get(rank)
    )(channels, eps=1e-3, momentum=0.01)
    module = torch.nn.Sequential(producer, norm, torch.nn.ReLU()).to(DEVICE)
    with torch.no_grad():
        for t, w in zip(
            (
                producer.weight,
                norm.weight,
                norm.bias,
                norm.running_mean,
                norm.running_var,
            ),
            (kernel, gamma, beta, mean, var),
        ):
            t.copy_(torch.as_tensor(np.ascontiguousarray(w), device=DEVICE))
    module.train()
    channels_last = rank > 2 and axis % rank == rank - 1
    if channels_last and rank in (4, 5):
        memory = torch.channels_last if rank == 4 else torch.channels_last_3d
        module = module.to(memory_format=memory)
    weights = [producer.weight, norm.weight, norm.bias]

    def step(x, dy):
        if channels_last:
            x, dy = (t.permute(0, rank - 1, *range(1, rank - 1)) for t in (x, dy))
        loss = (module(x) * dy).sum()
        grads = torch.autograd.grad(loss, weights)
        _synchronize()
        return loss.detach(), grads

    return step
