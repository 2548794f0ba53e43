"""The statistics pass that ``recalibrate`` and ``diagnose`` share.

One pass over the data, with every BN layer of the model normalizing with the
statistics of its batch (as in training) and every other layer running as at
inference (Dropout off). For each BN layer and each batch, the shifted moments
``(count, shift, offset, m2)`` of the layer's input are computed on the device
(:func:`kerasbn.formulas.sufficient_moments`) and read once to the host as float64;
a layer called several times per batch merges its calls. On the host they are
merged across batches exactly (Chan et al.) in NumPy float64, JAX without x64
included: never ``E[x**2] - E[x]**2``, never an average of EMAs.

Besides the pooled moments, each layer keeps what ``diagnose`` measures the
batch-to-batch spread with, in the same mergeable form: the moments of the
batch means and of the batch variances, each batch weighted by its count, the
number of batches and the largest batch. All of it merges exactly, so
:func:`run` ends with the same numbers on every worker of a distributed run:
each worker passes its own data, then the per-worker records are all-gathered
(:func:`kerasbn.backends.gather_workers`) and merged in rank order.

The model runs by ``stateless_call``, so the BN layers' training-mode calls
assign nothing, compiled where the backend compiles (:class:`Compiled`). It is
left as it was, bit for bit, also when the pass raises: the recording is a
per-object wrapper of each BN layer's ``call`` (no class or module is
patched), installed by :func:`recording`, a context manager that removes it
and restores every BN layer's ``trainable`` flags in its ``finally``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
from collections.abc import Iterator

import keras
import numpy as np
from keras import ops

from kerasbn import backends, formulas

__all__ = [
    "Batch",
    "Compiled",
    "LayerStatistics",
    "PassResult",
    "batches",
    "check_positive_int",
    "inference_arguments",
    "merge",
    "moving_values",
    "population",
    "recording",
    "run",
    "set_moving_statistics",
    "unreached",
]


# ------------------------------------------------------------ the Chan merge
def merge(a: formulas.Moments, b: formulas.Moments) -> formulas.Moments:
    """Chan et al.'s exact merge of two float64 NumPy moments of one shape:
    :func:`kerasbn.formulas.combine_moments` on the host
    (:data:`kerasbn.formulas.HOST`), around the shift of the group with the
    larger count (``a``'s on a tie); a group with count 0 contributes nothing.
    """
    stacked = formulas.Moments(*(np.stack(pair) for pair in zip(a, b)))
    return formulas.combine_moments(stacked, xp=formulas.HOST)


def _empty(shape: tuple[int, ...]) -> formulas.Moments:
    return formulas.Moments(*(np.zeros(shape) for _ in range(4)))


def _points(count: np.ndarray, value: np.ndarray) -> formulas.Moments:
    """The moments of one value per channel, of weight ``count``."""
    return formulas.Moments(count, value, np.zeros_like(value), np.zeros_like(value))


@dataclasses.dataclass(frozen=True)
class LayerStatistics:
    """What one BN layer's inputs gave over the pass, per channel, in float64.

    Attributes:
        population: the pooled moments of every input value.
        batch_means: the moments of the batch means, each batch weighted by
            its count: their ``m2`` is ``sum_b n_b (mean_b - mean)**2``.
        batch_variances: the same for the (biased) batch variances.
        batches: the number of batches that held the channel.
        largest_batch: the largest count of one batch.
        samples: the largest number of samples (axis 0) of one call.
    """

    population: formulas.Moments
    batch_means: formulas.Moments
    batch_variances: formulas.Moments
    batches: np.ndarray
    largest_batch: np.ndarray
    samples: np.ndarray

    FIELDS = 15  # rows of :meth:`pack`

    @classmethod
    def of_batch(cls, moments: formulas.Moments, samples: int) -> LayerStatistics:
        count = moments.count
        seen = count > 0
        variance = np.divide(moments.m2, count, out=np.zeros_like(count), where=seen)
        return cls(
            moments,
            _points(count, moments.mean),
            _points(count, variance),
            seen.astype("f8"),
            count.copy(),
            np.full(count.shape, float(samples)),
        )

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> LayerStatistics:
        zeros = np.zeros(shape)
        return cls(_empty(shape), _empty(shape), _empty(shape), zeros, zeros, zeros)

    def merge(self, other: LayerStatistics) -> LayerStatistics:
        return LayerStatistics(
            merge(self.population, other.population),
            merge(self.batch_means, other.batch_means),
            merge(self.batch_variances, other.batch_variances),
            self.batches + other.batches,
            np.maximum(self.largest_batch, other.largest_batch),
            np.maximum(self.samples, other.samples),
        )

    def pack(self) -> np.ndarray:
        """Every field stacked: ``(FIELDS, *channels)`` float64."""
        return np.stack(
            [
                *self.population,
                *self.batch_means,
                *self.batch_variances,
                self.batches,
                self.largest_batch,
                self.samples,
            ]
        )

    @classmethod
    def unpack(cls, rows: np.ndarray) -> LayerStatistics:
        rows = list(rows)
        return cls(
            formulas.Moments(*rows[0:4]),
            formulas.Moments(*rows[4:8]),
            formulas.Moments(*rows[8:12]),
            *rows[12:15],
        )


# ------------------------------------------------------------------- the data
@dataclasses.dataclass(frozen=True)
class Batch:
    """One element of the data: inputs as backend tensors, labels as given."""

    x: object
    y: object = None
    sample_weight: object = None

    @property
    def size(self) -> int:
        return int(keras.tree.flatten(self.x)[0].shape[0])


def batches(data, steps: int | None, batch_size: int) -> Iterator[Batch]:
    """The first ``steps`` elements of ``data`` as :class:`Batch` es.

    ``data`` is a batched ``tf.data.Dataset`` (read as NumPy, which serves
    every backend), a NumPy array of inputs, a dict of NumPy arrays (the
    inputs of a model with named inputs), a tuple ``(x, y[, sample_weight])``
    of NumPy arrays (Keras's ``validation_data`` form; ``x`` may be a list or
    dict of arrays), or any other iterable of batches ``x`` or ``(x, y[,
    sample_weight])``. Arrays are cut into batches of ``batch_size``.
    """
    if _arrays(data):
        elements = _sliced(data, batch_size)
    elif hasattr(data, "as_numpy_iterator"):
        elements = data.as_numpy_iterator()
    else:
        elements = iter(data)
    for element in itertools.islice(elements, steps):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(element)
        yield Batch(keras.tree.map_structure(_as_input, x), y, sample_weight)


def _arrays(data) -> bool:
    """Whether ``data`` is arrays to cut into batches (not an iterable of batches)."""
    if isinstance(data, np.ndarray):
        return True
    if isinstance(data, dict) or (isinstance(data, tuple) and 1 < len(data) <= 3):
        leaves = keras.tree.flatten(data)
        return bool(leaves) and all(isinstance(a, np.ndarray) for a in leaves)
    return False


def _sliced(data, batch_size: int) -> Iterator:
    size = len(keras.tree.flatten(data)[0])
    for start in range(0, size, batch_size):
        rows = slice(start, start + batch_size)
        yield keras.tree.map_structure(lambda a, rows=rows: a[rows], data)


def _as_input(value):
    """One input array as a tensor of the active backend.

    Its own tensors pass as they are; anything else (a ``tf.Tensor`` from a
    ``tf.data.Dataset`` on JAX or PyTorch, a list) goes through NumPy, as
    Keras's data adapters do for ``fit`` and ``predict``.
    """
    return value if ops.is_tensor(value) else ops.convert_to_tensor(np.asarray(value))


# ------------------------------------------------------------------ recording
class _Recorder:
    """Wraps one BN layer's ``call``, on the layer object, for the pass.

    The wrapped call computes the shifted moments of its input (masked by the
    layer's rule) as one stacked tensor, ``(count, shift, offset, m2,
    samples)``, keeps it, and calls the layer with ``training=True``. It runs
    inside the pass's step, eager or compiled: the tensors kept are the
    step's outputs (:meth:`pop`), read to the host after it.
    """

    def __init__(self, bn):
        self.bn = bn
        self._calls: list = []
        self._call = bn.call
        object.__setattr__(bn, "call", self._recording_call)

    def _recording_call(self, inputs, training=None, mask=None):
        ndim = len(inputs.shape)
        axes = (
            self.bn.axis if isinstance(self.bn.axis, (list, tuple)) else [self.bn.axis]
        )
        channels = sorted(a % ndim for a in axes)
        reduction = [a for a in range(ndim) if a not in channels]
        moments = formulas.sufficient_moments(
            inputs, reduction, formulas.expand_mask(mask, inputs)
        )
        samples = ops.zeros_like(moments.count) + ops.cast(
            ops.shape(inputs)[0], moments.count.dtype
        )
        self._calls.append(ops.stack([*moments, samples]))
        return self._call(inputs, training=True, mask=mask)

    def pop(self) -> list:
        """The tensors that the calls since the last ``pop`` kept."""
        calls, self._calls = self._calls, []
        return calls

    def statistics(self, calls: list) -> LayerStatistics | None:
        """One batch's statistics from the tensors of its calls (None if the
        layer was not called); several calls are merged."""
        shape = tuple(self.bn.moving_mean.shape)
        pooled, samples = None, 0
        for tensor in calls:
            fields = ops.convert_to_numpy(tensor).astype("f8").reshape(5, *shape)
            moments = formulas.Moments(*fields[:4])
            pooled = moments if pooled is None else merge(pooled, moments)
            samples = max(samples, int(fields[4].flat[0]))
        return None if pooled is None else LayerStatistics.of_batch(pooled, samples)

    def remove(self) -> None:
        object.__delattr__(self.bn, "call")


@contextlib.contextmanager
def recording(layers: list):
    """Every BN layer of ``layers`` in recording mode, for the ``with`` block.

    Inside, each layer is trainable (a frozen BN would not use batch
    statistics) and its ``call`` is wrapped by a :class:`_Recorder`, on the
    object itself. On leaving, also by an exception, the wrappers are removed
    and every layer gets back its ``trainable`` flags (the layer's and each
    weight's). The weights are not touched: the pass runs the model by
    ``stateless_call``.

    Yields:
        The recorders, one per layer, in order.
    """
    saved_flags = [_trainable_flags(layer) for layer in layers]
    recorders = []
    try:
        for layer in layers:
            recorders.append(_Recorder(layer))
            layer.trainable = True
        yield recorders
    finally:
        for recorder in recorders:
            recorder.remove()
        for layer, flags in zip(layers, saved_flags):
            _restore_trainable_flags(layer, flags)


def _trainable_flags(layer) -> tuple[bool, list[bool]]:
    return layer.trainable, [w.trainable for w in layer.weights]


def _restore_trainable_flags(layer, flags: tuple[bool, list[bool]]) -> None:
    layer_flag, weight_flags = flags
    layer.trainable = layer_flag  # this also sets its weights' flags...
    for weight, flag in zip(layer.weights, weight_flags):
        weight.trainable = flag  # ...which may have differed one by one


# ------------------------------------------------------------------- the pass
@dataclasses.dataclass(frozen=True)
class PassResult:
    """What :func:`run` gives.

    Attributes:
        found: ``(path, layer)`` of every BN layer of the model.
        statistics: per layer, its :class:`LayerStatistics` merged over every
            batch of every worker, or None where no worker's pass reached it.
        batches: the number of batches, over every worker.
        kept: the batches this worker read, when asked to keep them.
    """

    found: list
    statistics: list
    batches: int
    kept: list


class Compiled:
    """The functions that one model's passes run, compiled where the backend
    compiles (:func:`kerasbn.backends.jit`: ``jax.jit`` on JAX,
    ``tf.function`` on TensorFlow, eager on PyTorch), kept for later passes
    over the same model.

    A compiled function is traced from the model as it is at its first call
    (as Keras's own ``predict_function`` is): keep one only while the model's
    layers and configuration stay as they are (``BNMonitor`` keeps one for a
    ``fit``).
    """

    def __init__(self, model):
        self.model = model
        self.recorders: list = []
        self._functions: dict = {}

    def function(self, name: str, make):
        """The compiled ``make()``, made at the first request of ``name``."""
        if name not in self._functions:
            self._functions[name] = backends.jit(make())
        return self._functions[name]

    def recording_step(self):
        """``(trainable, non_trainable, x) -> [each recorder's tensors]``: one
        call of the model in recording mode, a ``stateless_call`` (the BN
        layers' training-mode calls assign nothing)."""
        model, inference = self.model, inference_arguments(self.model)

        def make():
            def step(trainable, non_trainable, x):
                model.stateless_call(trainable, non_trainable, x, **inference)
                return [recorder.pop() for recorder in self.recorders]

            return step

        return self.function("record", make)


def run(
    model: keras.Model,
    found: list,
    data,
    steps: int | None,
    batch_size: int,
    keep: bool = False,
    compiled: Compiled | None = None,
) -> PassResult:
    """One pass over ``data``: each BN layer's statistics, merged over workers.

    Args:
        model: the model; run once per batch at inference, its BN layers
            recording and using batch statistics.
        found: ``(path, layer)`` of its BN layers (:func:`_graph.batch_norms`).
        data: see :func:`batches`; read once.
        steps: the number of batches to read; None for all.
        batch_size: the batch size for arrays.
        keep: whether to keep the batches read (in :attr:`PassResult.kept`).
        compiled: the model's :class:`Compiled` functions, if kept from an
            earlier pass.

    Returns:
        The :class:`PassResult`. The model is as it was before.
    """
    compiled = compiled or Compiled(model)
    layers = [layer for _, layer in found]
    merged: list = [None] * len(layers)
    kept, count = [], 0
    with recording(layers) as recorders:
        compiled.recorders = recorders
        step = compiled.recording_step()
        # (taken in recording mode: every BN layer is trainable)
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        try:
            for batch in batches(data, steps, batch_size):
                outputs = step(trainable, non_trainable, batch.x)
                count += 1
                if keep:
                    kept.append(batch)
                for i, (recorder, calls) in enumerate(zip(recorders, outputs)):
                    taken = recorder.statistics(calls)
                    if taken is not None:
                        merged[i] = (
                            taken if merged[i] is None else merged[i].merge(taken)
                        )
        finally:
            compiled.recorders = []
    shapes = [_channel_shape(layer) for layer in layers]
    merged, count = _across_workers(merged, shapes, count, layers[0].moving_mean)
    return PassResult(found, merged, count, kept)


def inference_arguments(model) -> dict:
    """``{"training": False}`` where ``model.call`` takes ``training``, else
    ``{}``: what ``model(x, training=False)`` passes on (``stateless_call``
    passes its keywords to ``call`` as they are)."""
    parameters = inspect.signature(model.call).parameters.values()
    takes = any(
        p.name == "training" or p.kind is inspect.Parameter.VAR_KEYWORD
        for p in parameters
    )
    return {"training": False} if takes else {}


def _channel_shape(layer) -> tuple[int, ...]:
    return tuple(layer.moving_mean.shape)


def _across_workers(
    merged: list, shapes: list, count: int, variable
) -> tuple[list, int]:
    """Every worker's records all-gathered and merged in rank order.

    Where nothing is distributed, the records as they are. A layer that no
    worker's pass reached is None.
    """
    records = [
        (m if m is not None else LayerStatistics.empty(s)).pack().ravel()
        for m, s in zip(merged, shapes)
    ]
    local = np.concatenate([np.array([float(count)]), *records])
    gathered = backends.gather_workers(local, variable)
    if len(gathered) == 1:
        return merged, count
    total = int(gathered[:, 0].sum())
    result = []
    start = 1
    for shape in shapes:
        size = LayerStatistics.FIELDS * int(np.prod(shape, dtype=int))
        ranks = [
            LayerStatistics.unpack(g[start : start + size].reshape(-1, *shape))
            for g in gathered
        ]
        start += size
        pooled = ranks[0]
        for other in ranks[1:]:
            pooled = pooled.merge(other)
        result.append(pooled if pooled.batches.any() else None)
    return result, total


# -------------------------------------------------------- moving statistics
def population(path: str, layer, moments: formulas.Moments):
    """The pooled ``(mean, variance)`` of one BN layer's inputs.

    The biased variance, or the unbiased one (``m2 / (n - 1)``) for a layer
    with ``unbiased_moving_variance=True``.

    Raises:
        ValueError: a channel saw no value (fewer than two for an unbiased
            layer); the message names the layer's path.
    """
    unbiased = bool(getattr(layer, "unbiased_moving_variance", False))
    if moments is None or np.any(moments.count <= int(unbiased)):
        seen = "fewer than two unmasked values" if unbiased else "no unmasked value"
        raise ValueError(
            f"BN layer {path!r} saw {seen} in a channel during the statistics "
            "pass, so it has no population statistics."
        )
    return moments.shift + moments.offset, moments.m2 / (moments.count - unbiased)


def set_moving_statistics(layer, mean: np.ndarray, variance: np.ndarray) -> None:
    """Assigns ``mean`` and ``variance`` to a BN layer's moving statistics.

    A renorm ``kerasbn.BatchNorm`` also gets the matching ``moving_stddev =
    sqrt(variance + epsilon)``. The values are cast to the variables' dtype;
    under a ``tf.distribute`` strategy every replica's copy gets them.
    """
    for variable, value in moving_values(layer, mean, variance):
        variable.assign(value)


def moving_values(layer, mean: np.ndarray, variance: np.ndarray) -> list:
    """``(variable, value)`` of each moving statistic that ``mean`` and
    ``variance`` set (see :func:`set_moving_statistics`)."""
    shape = tuple(layer.moving_mean.shape)
    mean, variance = np.reshape(mean, shape), np.reshape(variance, shape)
    pairs = [(layer.moving_mean, mean), (layer.moving_variance, variance)]
    if getattr(layer, "renorm", False) and hasattr(layer, "moving_stddev"):
        pairs.append((layer.moving_stddev, np.sqrt(variance + layer.epsilon)))
    return [(v, value.astype(v.dtype)) for v, value in pairs]


def unreached(result: PassResult) -> list[str]:
    """The paths of the BN layers that the pass never reached."""
    return [path for (path, _), s in zip(result.found, result.statistics) if s is None]


def check_positive_int(name: str, value, allow_none: bool = False) -> None:
    """Raises unless ``value`` is a positive int (or None, if allowed)."""
    if value is None and allow_none:
        return
    allowed = "a positive int or None" if allow_none else "a positive int"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be {allowed}; got {name}={value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be {allowed}; got {name}={value!r}.")
