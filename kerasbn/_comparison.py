"""The model's outputs with its moving statistics and with the population's.

The second half of ``kerasbn.diagnose``: the batches kept from the statistics
pass run through the model at inference twice, with its own non-trainable
values and with every BN layer's population statistics in place of its moving
ones (what ``kerasbn.recalibrate`` would set; nothing is assigned). The
outputs are compared, and for a compiled model with labels the loss and the
compiled metrics are computed both ways, on metric states held outside the
model. Every sum and metric state is merged over the workers of a
distributed run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import keras
import numpy as np
from keras import ops

from kerasbn import _statistics, backends

__all__ = ["ModelComparison", "compare", "json_ready"]


@dataclasses.dataclass(frozen=True)
class ModelComparison:
    """The model's outputs with its moving statistics and with the population's.

    The population statistics are those ``kerasbn.recalibrate`` would set;
    they are computed, never assigned (the second pass is a
    ``model.stateless_call``).

    Attributes:
        samples: the samples compared.
        output_shift_max: the largest ``|output change|`` over every output
            value (finite ones).
        output_shift_rms: the root mean square of the change.
        output_rms: the root mean square of the outputs with population
            statistics, for scale.
        changed_predictions: the fraction of predictions (argmax over the
            last axis, for outputs of 2 or more classes) that change; None
            where no output has classes.
        nonfinite_moving, nonfinite_population: the output values that are
            NaN or infinite, each way.
        metrics_moving, metrics_population: the compiled loss and metrics
            each way, where the data has labels and the model is compiled;
            else None.

    Example:
        >>> import keras, numpy as np, kerasbn
        >>> model = keras.Sequential([keras.Input((2,)), kerasbn.BatchNorm()])
        >>> model.compile(loss="mse")
        >>> x = np.full((8, 2), 3.0, "float32") + np.arange(8.0)[:, None]
        >>> comparison = kerasbn.diagnose(model, (x, x)).model
        >>> comparison.samples, sorted(comparison.metrics_population)
        (8, ['loss'])
    """

    samples: int
    output_shift_max: float
    output_shift_rms: float
    output_rms: float
    changed_predictions: float | None
    nonfinite_moving: int
    nonfinite_population: int
    metrics_moving: dict | None
    metrics_population: dict | None

    def to_dict(self) -> dict:
        return json_ready(dataclasses.asdict(self))


# Per-worker sums of the comparison, added over the workers ("max" is the
# largest over them).
_SUMS = ("samples", "values", "finite", "squares", "population_squares", "max")
_SUMS += ("rows", "changed", "nonfinite_moving", "nonfinite_population")
_SUMS += ("loss_moving", "loss_population")


def compare(
    model, result: _statistics.PassResult, compiled: _statistics.Compiled
) -> ModelComparison:
    """Both inference passes over the kept batches, merged over workers.

    Both run one function (:func:`_scoring`), compiled where the backend
    compiles, with the model's own non-trainable values and with the
    population statistics in place of the moving ones.
    """
    kept = result.kept
    labeled = bool(getattr(model, "compiled", False)) and all(
        b.y is not None for b in kept
    )
    with_loss = labeled and getattr(model, "loss", None) is not None
    metrics = _Metrics(model, kept[0], with_loss) if labeled else None
    score = compiled.function("score", lambda: _scoring(model, metrics))
    trainable = [v.value for v in model.trainable_variables]
    ways = {  # (tensors both ways: one trace serves both)
        "moving": [ops.copy(v.value) for v in model.non_trainable_variables],
        "population": _population_values(model, result),
    }
    sums = dict.fromkeys(_SUMS, 0.0)
    states, moving = {}, []
    for way, non_trainable in ways.items():
        state = metrics.initial() if metrics else None
        for i, batch in enumerate(kept):
            y_pred, state, loss = score(
                trainable, non_trainable, batch.x, batch.y, batch.sample_weight, state
            )
            outputs = [_numpy(t) for t in keras.tree.flatten(y_pred)]
            if way == "moving":
                moving.append(outputs)
            else:
                _accumulate(sums, moving[i], outputs, batch.size)
            if metrics and with_loss:
                # (in a tf.distribute scope Keras divides the loss by the replicas)
                replicas = backends.replicas_in_sync()
                sums[f"loss_{way}"] += batch.size * replicas * float(_numpy(loss))
        states[way] = state
    variable = result.found[0][1].moving_mean  # locates a tf.distribute strategy
    return _merge_comparison(sums, states, metrics, variable)


def _scoring(model, metrics):
    """``(trainable, non_trainable, x, y, sample_weight, metric_state) ->
    (outputs, new metric_state, loss)``: the model at inference, a
    ``stateless_call``, and, for a compiled model with labels, its loss and
    compiled metrics (None without).

    The loss and metrics run in a ``keras.StatelessScope`` on states held
    outside the model: its metric variables are neither read nor written
    (under ``tf.distribute`` each access of one is a collective, which workers
    with different numbers of batches could not pair).
    """
    inference = _statistics.inference_arguments(model)

    def score(trainable, non_trainable, x, y, sample_weight, state):
        y_pred, _ = model.stateless_call(trainable, non_trainable, x, **inference)
        if metrics is None:
            return y_pred, None, None
        mapping = list(zip(metrics.variables, state))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            loss = metrics.score(x, y, y_pred, sample_weight)
        new = [scope.get_current_value(v) for v in metrics.variables]
        state = [old if value is None else value for old, value in zip(state, new)]
        return y_pred, state, loss

    return score


class _Metrics:
    """The model's compiled loss and metrics, on states held outside the model.

    Args:
        model: a compiled model.
        first: the first batch; where the metrics are not built yet, one real
            update on it builds them (on every worker), and they are reset.
        with_loss: whether the model has a compiled loss.
    """

    def __init__(self, model, first, with_loss: bool):
        self.model = model
        self.with_loss = with_loss
        if not all(getattr(m, "built", True) for m in model.metrics):
            y_pred = model(first.x, training=False)
            self.score(first.x, first.y, y_pred, first.sample_weight)
            model.reset_metrics()
        self.variables = [v for m in model.metrics for v in m.variables]

    def initial(self) -> list:
        """The metrics' reset states (nothing read or written)."""
        return [
            value for m in self.model.metrics for value in m.stateless_reset_state()
        ]

    def score(self, x, y, y_pred, sample_weight):
        """Updates the metrics with one batch; returns its loss (0 without)."""
        model = self.model
        loss = ops.zeros(())
        if self.with_loss:
            loss = model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight
            )
        model.compute_metrics(x, y, y_pred, sample_weight)
        return loss

    def results(self, state: list, loss: float | None) -> dict:
        """The metrics' results for ``state`` (Keras's loss tracker, which is
        not updated here, replaced by ``loss``)."""
        with keras.StatelessScope(state_mapping=list(zip(self.variables, state))):
            values = self.model.get_metrics_result()
        results = {}
        for name, value in values.items():
            array = _numpy(value)
            if array.size == 1:
                results[name] = float(array)
        results.pop("loss", None)
        return results if loss is None else {"loss": float(loss), **results}


def _numpy(value) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(value))


def _population_values(model, result: _statistics.PassResult) -> list:
    """The model's non-trainable values, with every reached BN layer's moving
    statistics replaced by the population's (nothing is assigned)."""
    replacement = {}
    for (_, layer), record in zip(result.found, result.statistics):
        if record is None:
            continue
        mean, variance = _population_or_moving(layer, record.population)
        for variable, value in _statistics.moving_values(layer, mean, variance):
            replacement[id(variable)] = ops.convert_to_tensor(value)
    return [
        replacement.get(id(v), ops.copy(v.value)) for v in model.non_trainable_variables
    ]


def _population_or_moving(layer, moments) -> tuple[np.ndarray, np.ndarray]:
    """The population statistics, and the moving ones in channels never seen."""
    unbiased = bool(getattr(layer, "unbiased_moving_variance", False))
    seen = moments.count > int(unbiased)
    mean = np.where(seen, moments.shift + moments.offset, 0.0)
    variance = np.divide(
        moments.m2, moments.count - unbiased, out=np.zeros_like(moments.m2), where=seen
    )
    shape = moments.count.shape
    moving_mean = np.reshape(_numpy(layer.moving_mean), shape)
    moving_variance = np.reshape(_numpy(layer.moving_variance), shape)
    return np.where(seen, mean, moving_mean), np.where(seen, variance, moving_variance)


def _accumulate(sums: dict, before: list, after: list, size: int) -> None:
    """Adds one batch's output changes to the running sums."""
    sums["samples"] += size
    for old, new in zip(before, after):
        old, new = old.astype("f8"), new.astype("f8")
        finite = np.isfinite(old) & np.isfinite(new)
        change = np.where(finite, new - old, 0.0)
        sums["values"] += old.size
        sums["finite"] += float(finite.sum())
        sums["squares"] += float(np.sum(change * change))
        sums["population_squares"] += float(np.sum(np.where(finite, new, 0.0) ** 2))
        sums["max"] = max(sums["max"], float(np.abs(change).max(initial=0.0)))
        sums["nonfinite_moving"] += float((~np.isfinite(old)).sum())
        sums["nonfinite_population"] += float((~np.isfinite(new)).sum())
        if old.ndim >= 2 and old.shape[-1] >= 2:
            sums["rows"] += old.size / old.shape[-1]
            changed = np.argmax(old, axis=-1) != np.argmax(new, axis=-1)
            sums["changed"] += float(changed.sum())


def _merge_comparison(sums: dict, states: dict, metrics, variable) -> ModelComparison:
    """The comparison over every worker: sums added, metric states merged by
    their variables' aggregation (Keras sums metric states across replicas)."""
    names = list(_SUMS)
    flat = [np.array([sums[n] for n in names], np.float64)]
    shapes = []
    if metrics:
        for way in ("moving", "population"):
            values = [_numpy(v) for v in states[way]]
            shapes.append([v.shape for v in values])
            flat += [np.asarray(v, np.float64).ravel() for v in values]
    gathered = backends.gather_workers(np.concatenate(flat), variable)
    totals = dict(zip(names, gathered[:, : len(names)].sum(axis=0)))
    totals["max"] = float(gathered[:, names.index("max")].max())
    results = {"moving": None, "population": None}
    start = len(names)
    for way, way_shapes in zip(("moving", "population"), shapes):
        merged = []
        for v, shape in zip(metrics.variables, way_shapes):
            size = int(np.prod(shape, dtype=int))
            parts = gathered[:, start : start + size]
            start += size
            value = _aggregate(v, parts).reshape(shape)
            merged.append(value.astype(keras.backend.standardize_dtype(v.dtype)))
        loss = totals[f"loss_{way}"] / totals["samples"] if metrics.with_loss else None
        results[way] = metrics.results(merged, loss)
    finite = max(totals["finite"], 1.0)
    rows = totals["rows"]
    return ModelComparison(
        samples=int(totals["samples"]),
        output_shift_max=totals["max"],
        output_shift_rms=math.sqrt(totals["squares"] / finite),
        output_rms=math.sqrt(totals["population_squares"] / finite),
        changed_predictions=totals["changed"] / rows if rows else None,
        nonfinite_moving=int(totals["nonfinite_moving"]),
        nonfinite_population=int(totals["nonfinite_population"]),
        metrics_moving=results["moving"],
        metrics_population=results["population"],
    )


def _aggregate(variable, parts: np.ndarray) -> np.ndarray:
    """One metric variable's value over the workers, by its aggregation."""
    aggregation = getattr(variable, "aggregation", "sum")
    if aggregation == "sum":
        return parts.sum(axis=0)
    if aggregation == "mean":
        return parts.mean(axis=0)
    return parts[0]


def json_ready(value):
    """NumPy values as Python ones, NaN and inf as None, recursively."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
