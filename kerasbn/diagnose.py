"""``diagnose``: which BN layer of a model is off, by how much, why, and the fix.

A model that does well in training and badly in ``predict`` or ``evaluate``
usually has a BN layer whose inference statistics do not fit the data. The
causes are few, and each leaves its own mark, which :func:`diagnose` measures
per layer over one pass of the data:

* **stale statistics**: the moving mean and variance are far from the exact
  population statistics of the data (momentum 0.99 after a short training,
  EMA or SWA weights, a domain shift). Fixed by ``kerasbn.recalibrate``.
* **frozen on other data**: the same gap in a layer that does not update its
  statistics (``trainable=False`` or ``statistics="moving"``), e.g. a
  backbone frozen with the statistics of its pre-training data.
* **small effective batch**: the statistics that training normalizes with
  wander from batch to batch, because a batch holds few independent values
  per channel (small batches, or feature maps that are nearly constant over
  space).
* **dead channels**: a channel whose input barely varies (variance far below
  epsilon), or whose ``gamma`` is about 0.
* **non-finite**: a NaN or infinity in a weight, a moving statistic or the
  layer's inputs.

The pass is the one ``kerasbn.recalibrate`` makes (:mod:`kerasbn._statistics`):
every BN layer normalizes with its batch's statistics, every other layer runs
as at inference, and each BN's input moments are merged exactly in float64,
also across the workers of a distributed run. Population statistics here are
thus exactly what ``recalibrate`` would set.

Thresholds, and why (every one is a module constant):

* ``STALE_MEAN_SHIFT = 0.5``: a moving mean half a population standard
  deviation off moves the layer's output by half of ``gamma`` for every
  input, enough to move decisions; sampling noise of the population mean
  itself is far smaller for any data of a few batches.
* ``STALE_LOG_VARIANCE_RATIO = log(2)``: a moving variance off by a factor 2
  scales the layer's output by ``1/sqrt(2)`` or ``sqrt(2)``, an output error
  of 30-40% of a standard deviation, comparable to the mean threshold.
* ``SMALL_EFFECTIVE_BATCH = 8``: below 8 independent values per channel the
  batch mean wanders by more than 0.35 population standard deviations from
  batch to batch and the batch variance by +-50% (it is also biased low by
  ``1/n``), so the normalization seen in training is largely noise and
  differs from inference ("Rethinking Batch in BatchNorm", Wu & Johnson).
* ``DEAD_VARIANCE_FRACTION = 0.01``: an input variance below 1% of epsilon
  leaves the channel's normalized output within 0.1 of constant.
* ``DEAD_GAMMA_FRACTION = 1e-3``: ``|gamma|`` below 0.1% of the layer's median
  ``|gamma|`` switches the channel off.

Gaps are measured against ``sqrt(variance + epsilon)``, the scale the layer
divides by, so that a dead channel gives finite numbers.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import keras
import numpy as np
from keras import ops

from kerasbn import _graph, _statistics
from kerasbn._comparison import ModelComparison, compare, json_ready
from kerasbn.layer import BatchNorm

__all__ = [
    "BNMonitor",
    "Diagnosis",
    "LayerDiagnosis",
    "ModelComparison",
    "diagnose",
    "DEAD_GAMMA_FRACTION",
    "DEAD_VARIANCE_FRACTION",
    "SMALL_EFFECTIVE_BATCH",
    "STALE_LOG_VARIANCE_RATIO",
    "STALE_MEAN_SHIFT",
    "VERDICTS",
]

STALE_MEAN_SHIFT = 0.5
STALE_LOG_VARIANCE_RATIO = math.log(2.0)
SMALL_EFFECTIVE_BATCH = 8.0
DEAD_VARIANCE_FRACTION = 0.01
DEAD_GAMMA_FRACTION = 1e-3

OK = "ok"
STALE = "stale statistics"
FROZEN = "frozen on other data"
SMALL_BATCH = "small effective batch"
DEAD = "dead channels"
NON_FINITE = "non-finite"
VERDICTS = (NON_FINITE, FROZEN, STALE, SMALL_BATCH, DEAD, OK)  # most severe first

ACTIONS = {
    OK: "none",
    STALE: (
        "kerasbn.recalibrate(model, training_data): exact population statistics "
        "in one pass (on this data's domain if it is the one served); or, where "
        'inference batches are large, kerasbn.BatchNorm(statistics="batch") '
        "normalizes each batch with its own statistics"
    ),
    FROZEN: (
        "kerasbn.recalibrate(model, data): it recalibrates frozen layers too, "
        "and they stay frozen; or let the layer's statistics follow the new "
        'data while fine-tuning (trainable=True, statistics="auto")'
    ),
    SMALL_BATCH: (
        "enlarge the batch, or merge it across replicas with "
        "kerasbn.BatchNorm(synchronized=True); batch renormalization "
        "(kerasbn.BatchNorm(renorm=True)) tolerates small batches; when "
        "fine-tuning, kerasbn.freeze_batch_norms(model) stops normalizing "
        "with batch statistics"
    ),
    DEAD: (
        "harmless for the outputs (such a channel passes a constant), but lost "
        "capacity: for dead inputs lower the learning rate or use a leaky "
        "activation upstream, for gamma near 0 exclude gamma from weight decay; "
        "kerasbn.fold_batch_norms(model) folds them away for inference"
    ),
}
_NON_FINITE_ACTIONS = {
    "statistics": (
        "kerasbn.recalibrate(model, training_data) recomputes the moving "
        "statistics; kerasbn.BatchNorm keeps them when a training batch is "
        "non-finite (pair it with a LossScaleOptimizer that skips such steps)"
    ),
    "weights": (
        "gamma or beta diverged: restore a checkpoint and lower the learning "
        "rate or clip the gradients"
    ),
    "inputs": (
        "the layers upstream give non-finite values on this data: find the "
        "first of them (e.g. with keras.ops.isfinite on their outputs)"
    ),
}


# ---------------------------------------------------------------- the layers
@dataclasses.dataclass(frozen=True, eq=False)
class LayerDiagnosis:
    """What :func:`diagnose` found for one BN layer.

    Per-channel arrays are float64, one value per channel (flattened for
    several channel axes).

    Attributes:
        path: the layer's path in the model (``"model/block/bn"``).
        layer_class: ``"kerasbn.BatchNorm"`` or ``"keras.layers.BatchNormalization"``
            (or the name of a subclass).
        mode: the statistics that the layer normalizes with: ``"auto"``
            (batch in training, moving in inference, Keras's rule),
            ``"moving"`` (always moving, never updated), ``"batch"`` (always
            the batch's) or ``"trainable=False"`` (frozen: moving, never
            updated).
        momentum: the weight of the old value in its moving averages.
        epsilon: added to the variance.
        training_steps: the optimizer's iterations, where the model has one.
        initializer_share: ``momentum ** training_steps``, the weight the
            initial values still carry in the moving statistics, for a layer
            that updates them in training and where the steps are known;
            else None.
        count: the values per channel the pass saw (population count).
        population_mean, population_variance: the exact (biased) statistics
            of the layer's inputs over the data.
        moving_mean, moving_variance: the layer's moving statistics.
        gamma, beta: its scale and offset (None where it has none).
        mean_shift: ``(moving_mean - population_mean) / sqrt(population_variance
            + epsilon)``: the gap of the mean in population standard
            deviations.
        log_variance_ratio: ``log((moving_variance + epsilon) /
            (population_variance + epsilon))``.
        batches: the batches that held each channel.
        nominal_batch: the values per channel of a full batch (of a ghost
            group, for ``virtual_batch_size``): what training normalizes over.
        effective_batch: ``population_variance / Var(batch means)`` scaled to
            a nominal batch: the number of independent values that batch is
            worth. About ``nominal_batch`` for independent values, about the
            number of samples for feature maps constant over space.
        batch_mean_spread: the standard deviation of a nominal batch's mean
            around the population mean, in ``sqrt(variance + epsilon)``.
        batch_variance_spread: the standard deviation of a nominal batch's
            variance, relative to ``variance + epsilon``.
        dead_channels: channels whose input variance is below
            ``DEAD_VARIANCE_FRACTION * epsilon``.
        zero_gamma_channels: channels whose ``|gamma|`` is below
            ``DEAD_GAMMA_FRACTION`` times the layer's median ``|gamma|``.
        nonfinite: the names of what holds NaN or infinity among
            ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``,
            ``inputs``.
        findings: every verdict that applies, most severe first.
        verdict: the most severe finding, or ``"ok"``.
        reason: the numbers behind the verdict, in words.
        action: what fixes it, naming the kerasbn call.

    Example:
        >>> import keras, numpy as np, kerasbn
        >>> model = keras.Sequential(
        ...     [keras.Input((2,)), kerasbn.BatchNorm(name="bn")], name="net"
        ... )
        >>> x = np.resize(np.float32([[3.0, 3.0], [-3.0, -3.0]]), (64, 2))
        >>> layer = kerasbn.diagnose(model, x)["net/bn"]  # mean 0, variance 9
        >>> layer.verdict, float(layer.max_mean_shift), float(layer.log_variance_ratio[0])
        ('stale statistics', 0.0, -2.196...)
    """

    path: str
    layer_class: str
    mode: str
    momentum: float
    epsilon: float
    training_steps: int | None
    initializer_share: float | None
    count: np.ndarray
    population_mean: np.ndarray
    population_variance: np.ndarray
    moving_mean: np.ndarray
    moving_variance: np.ndarray
    gamma: np.ndarray | None
    beta: np.ndarray | None
    mean_shift: np.ndarray
    log_variance_ratio: np.ndarray
    batches: np.ndarray
    nominal_batch: np.ndarray
    effective_batch: np.ndarray
    batch_mean_spread: np.ndarray
    batch_variance_spread: np.ndarray
    dead_channels: tuple[int, ...]
    zero_gamma_channels: tuple[int, ...]
    nonfinite: tuple[str, ...]
    findings: tuple[str, ...]
    verdict: str
    reason: str
    action: str

    @property
    def channels(self) -> int:
        return int(self.population_mean.size)

    @property
    def max_mean_shift(self) -> float:
        """The largest ``|mean_shift|`` over the channels."""
        return _largest(self.mean_shift)

    @property
    def median_mean_shift(self) -> float:
        return _median(np.abs(self.mean_shift))

    @property
    def max_log_variance_ratio(self) -> float:
        """The largest ``|log_variance_ratio|`` over the channels."""
        return _largest(self.log_variance_ratio)

    @property
    def median_log_variance_ratio(self) -> float:
        return _median(np.abs(self.log_variance_ratio))

    @property
    def median_effective_batch(self) -> float:
        return _median(self.effective_batch)

    @property
    def min_effective_batch(self) -> float:
        finite = self.effective_batch[np.isfinite(self.effective_batch)]
        return float(finite.min()) if finite.size else math.nan

    @property
    def gap(self) -> float:
        """The larger of the two gaps, in units of their thresholds (>= 1 is off)."""
        return max(
            self.max_mean_shift / STALE_MEAN_SHIFT,
            self.max_log_variance_ratio / STALE_LOG_VARIANCE_RATIO,
        )

    def to_dict(self) -> dict:
        """The diagnosis as JSON-ready Python values (NaN and inf become None)."""
        scalars = {
            "path": self.path,
            "layer_class": self.layer_class,
            "mode": self.mode,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "training_steps": self.training_steps,
            "initializer_share": self.initializer_share,
            "channels": self.channels,
            "max_mean_shift": self.max_mean_shift,
            "median_mean_shift": self.median_mean_shift,
            "max_log_variance_ratio": self.max_log_variance_ratio,
            "median_log_variance_ratio": self.median_log_variance_ratio,
            "median_effective_batch": self.median_effective_batch,
            "min_effective_batch": self.min_effective_batch,
            "dead_channels": list(self.dead_channels),
            "zero_gamma_channels": list(self.zero_gamma_channels),
            "nonfinite": list(self.nonfinite),
            "findings": list(self.findings),
            "verdict": self.verdict,
            "reason": self.reason,
            "action": self.action,
        }
        arrays = {
            name: getattr(self, name)
            for name in (
                "count",
                "population_mean",
                "population_variance",
                "moving_mean",
                "moving_variance",
                "gamma",
                "beta",
                "mean_shift",
                "log_variance_ratio",
                "batches",
                "nominal_batch",
                "effective_batch",
                "batch_mean_spread",
                "batch_variance_spread",
            )
        }
        return json_ready({**scalars, "per_channel": arrays})


def _largest(values: np.ndarray) -> float:
    """The largest magnitude, over the channels that have one (NaN if none:
    a channel the data never reached, or a NaN statistic, is left out)."""
    magnitude = np.abs(values)
    magnitude = magnitude[~np.isnan(magnitude)]
    return float(magnitude.max()) if magnitude.size else math.nan


def _median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else math.nan


def _float64(weight) -> np.ndarray | None:
    if weight is None:
        return None
    return np.asarray(ops.convert_to_numpy(weight), np.float64).ravel()


def _mode(layer) -> str:
    statistics = getattr(layer, "statistics", "auto")
    if statistics == "batch":
        return "batch"  # batch statistics in inference too, even when frozen
    return statistics if layer.trainable else "trainable=False"


def _class_name(layer) -> str:
    for name, cls in (
        ("kerasbn.BatchNorm", BatchNorm),
        ("keras.layers.BatchNormalization", keras.layers.BatchNormalization),
    ):
        if type(layer) is cls:
            return name
    return type(layer).__name__


def _diagnose_layer(
    path: str, layer, record: _statistics.LayerStatistics, steps: int | None
) -> LayerDiagnosis:
    """The per-channel numbers and the verdict of one BN layer."""
    epsilon = float(layer.epsilon)
    population = record.population
    count = population.count.ravel()
    seen = count > 0
    mean = (population.shift + population.offset).ravel()
    variance = np.divide(
        population.m2.ravel(), count, out=np.full_like(count, np.nan), where=seen
    )
    mean = np.where(seen, mean, np.nan)
    moving_mean = _float64(layer.moving_mean)
    moving_variance = _float64(layer.moving_variance)
    gamma = _float64(getattr(layer, "gamma", None))
    beta = _float64(getattr(layer, "beta", None))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.sqrt(variance + epsilon)
        mean_shift = (moving_mean - mean) / scale
        log_ratio = np.log((moving_variance + epsilon) / (variance + epsilon))
        spread = _spread(layer, record, variance, epsilon)
    mode = _mode(layer)
    updates = layer.trainable and getattr(layer, "statistics", "auto") != "moving"
    share = float(layer.momentum) ** steps if updates and steps is not None else None
    dead = np.flatnonzero(variance < DEAD_VARIANCE_FRACTION * epsilon)
    zero_gamma = ()
    if gamma is not None and np.isfinite(gamma).all():
        floor = DEAD_GAMMA_FRACTION * np.median(np.abs(gamma))
        zero_gamma = tuple(int(c) for c in np.flatnonzero(np.abs(gamma) <= floor))
    nonfinite = tuple(
        name
        for name, values in (
            ("gamma", gamma),
            ("beta", beta),
            ("moving_mean", moving_mean),
            ("moving_variance", moving_variance),
            ("inputs", np.concatenate([mean[seen], variance[seen]])),
        )
        if values is not None and not np.isfinite(values).all()
    )
    fields = dict(
        path=path,
        layer_class=_class_name(layer),
        mode=mode,
        momentum=float(layer.momentum),
        epsilon=epsilon,
        training_steps=steps,
        initializer_share=share,
        count=count,
        population_mean=mean,
        population_variance=variance,
        moving_mean=moving_mean,
        moving_variance=moving_variance,
        gamma=gamma,
        beta=beta,
        mean_shift=mean_shift,
        log_variance_ratio=log_ratio,
        batches=record.batches.ravel(),
        **spread,
        dead_channels=tuple(int(c) for c in dead),
        zero_gamma_channels=zero_gamma,
        nonfinite=nonfinite,
    )
    findings = _findings(fields)
    verdict = findings[0] if findings else OK
    return LayerDiagnosis(
        **fields,
        findings=findings,
        verdict=verdict,
        reason=_reason(verdict, fields),
        action=_action(verdict, nonfinite),
    )


def _spread(layer, record, variance: np.ndarray, epsilon: float) -> dict:
    """The batch-to-batch spread and the effective batch size, per channel.

    With ``B`` batches of counts ``n_b`` and ``n`` the largest (a full
    batch), ``Var(batch means) = sum_b (n_b / n) (mean_b - mean)**2 / (B - 1)``:
    the unbiased variance of a full batch's mean, a short last batch
    counting for the noisier batch it is. For independent values it is
    ``variance / n``, so ``variance / Var(batch means)`` estimates the number
    of independent values in a full batch. The batch variances are measured
    the same way.
    """
    nominal = record.largest_batch.ravel()
    dof = record.batches.ravel() - 1.0
    scale = np.where(dof > 0, nominal * dof, np.nan)
    var_means = record.batch_means.m2.ravel() / scale
    var_variances = record.batch_variances.m2.ravel() / scale
    effective = variance / var_means
    virtual = getattr(layer, "virtual_batch_size", None)
    if virtual:  # training normalizes groups of `virtual` samples of each batch
        group = virtual / record.samples.ravel()
        nominal, effective = nominal * group, effective * group
    return dict(
        nominal_batch=nominal,
        effective_batch=effective,
        batch_mean_spread=np.sqrt(var_means / (variance + epsilon)),
        batch_variance_spread=np.sqrt(var_variances) / (variance + epsilon),
    )


def _findings(fields: dict) -> tuple[str, ...]:
    """Every verdict that the numbers support, most severe first."""
    mode = fields["mode"]
    found = set()
    if fields["nonfinite"]:
        found.add(NON_FINITE)
    else:
        off = (
            _largest(fields["mean_shift"]) > STALE_MEAN_SHIFT
            or _largest(fields["log_variance_ratio"]) > STALE_LOG_VARIANCE_RATIO
        )
        if off and mode != "batch":  # "batch" never normalizes with them
            found.add(FROZEN if mode in ("moving", "trainable=False") else STALE)
    if mode in ("auto", "batch") and (
        _median(fields["effective_batch"]) < SMALL_EFFECTIVE_BATCH
    ):
        found.add(SMALL_BATCH)
    if fields["dead_channels"] or fields["zero_gamma_channels"]:
        found.add(DEAD)
    return tuple(v for v in VERDICTS if v in found)


def _reason(verdict: str, f: dict) -> str:
    shift, ratio = _largest(f["mean_shift"]), _largest(f["log_variance_ratio"])
    gap = (
        f"mean off by up to {shift:.3g} population std (median "
        f"{_median(np.abs(f['mean_shift'])):.3g}), variance by up to a factor "
        f"{math.exp(ratio):.3g} (|log ratio| {ratio:.3g}, median "
        f"{_median(np.abs(f['log_variance_ratio'])):.3g})"
    )
    if verdict == NON_FINITE:
        return "NaN or infinity in " + ", ".join(f["nonfinite"])
    if verdict == STALE:
        share = f["initializer_share"]
        if share is not None and share > 0.01:
            gap += (
                f"; the initializer still weighs {share:.0%} in them (momentum "
                f"{f['momentum']:g} after {f['training_steps']} steps)"
            )
        return "moving statistics far from the data's: " + gap
    if verdict == FROZEN:
        return f"statistics frozen ({f['mode']}) far from the data's: " + gap
    if verdict == SMALL_BATCH:
        effective = _median(f["effective_batch"])
        return (
            f"a batch is worth {effective:.3g} independent values per channel "
            f"(median; nominal {_median(f['nominal_batch']):.4g}): its mean "
            f"wanders by {_median(f['batch_mean_spread']):.3g} population std"
        )
    if verdict == DEAD:
        channels = len(f["population_mean"])
        parts = []
        if f["dead_channels"]:
            parts.append(
                f"{len(f['dead_channels'])} of {channels} channels with input "
                f"variance below {DEAD_VARIANCE_FRACTION:g} x epsilon"
            )
        if f["zero_gamma_channels"]:
            parts.append(f"{len(f['zero_gamma_channels'])} with gamma near 0")
        return "; ".join(parts)
    return "moving statistics within the thresholds of the data's: " + gap


def _action(verdict: str, nonfinite: tuple[str, ...]) -> str:
    if verdict != NON_FINITE:
        return ACTIONS[verdict]
    if "inputs" in nonfinite:
        return _NON_FINITE_ACTIONS["inputs"]
    if {"gamma", "beta"} & set(nonfinite):
        return _NON_FINITE_ACTIONS["weights"]
    return _NON_FINITE_ACTIONS["statistics"]


# --------------------------------------------------------------- the report
@dataclasses.dataclass(frozen=True, eq=False)
class Diagnosis:
    """Every BN layer's diagnosis, and the model's outputs both ways.

    ``print(diagnosis)`` shows a table, worst layers first;
    :meth:`to_dict` is JSON-ready; :meth:`plot` draws the gaps.

    Attributes:
        layers: one :class:`LayerDiagnosis` per BN layer that the pass
            reached, in the model's order.
        model: the :class:`ModelComparison` of the outputs.
        samples: the samples of the data (over every worker).
        batches: its batches (over every worker).
        training_steps: the optimizer's iterations, or None.
        unreached: the paths of BN layers the model's call never reached.

    Example:
        >>> import json, keras, numpy as np, kerasbn
        >>> model = keras.Sequential(
        ...     [keras.Input((2,)), kerasbn.BatchNorm(name="bn")], name="net"
        ... )
        >>> x = np.random.default_rng(0).normal(5.0, 1.0, (64, 2)).astype("float32")
        >>> diagnosis = kerasbn.diagnose(model, x)
        >>> [layer.path for layer in diagnosis.flagged]
        ['net/bn']
        >>> json.loads(json.dumps(diagnosis.to_dict()))["samples"]
        64
    """

    layers: tuple[LayerDiagnosis, ...]
    model: ModelComparison
    samples: int
    batches: int
    training_steps: int | None
    unreached: tuple[str, ...] = ()

    def __getitem__(self, path: str) -> LayerDiagnosis:
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(
            f"no BN layer at {path!r}; paths: {[x.path for x in self.layers]}"
        )

    @property
    def ranked(self) -> list[LayerDiagnosis]:
        """The layers, worst first: by verdict severity, then by gap."""

        def key(layer: LayerDiagnosis):
            gap = layer.gap
            return (VERDICTS.index(layer.verdict), -(gap if gap == gap else math.inf))

        return sorted(self.layers, key=key)

    @property
    def flagged(self) -> list[LayerDiagnosis]:
        """The layers whose verdict is not ``"ok"``, worst first."""
        return [layer for layer in self.ranked if layer.verdict != OK]

    def summary(self, prefix: str = "bn_") -> dict[str, float]:
        """A few figures for training logs (``History``, ``CSVLogger``, TensorBoard).

        Keys: ``layers_flagged``, ``max_mean_shift``,
        ``max_log_variance_ratio``, ``min_effective_batch`` (the smallest
        per-layer median), ``dead_channels``, ``nonfinite_layers``,
        ``output_shift``, ``changed_predictions``, and for each compiled
        metric ``moving_<name>`` and ``population_<name>``; each with
        ``prefix``. NaN where not measured.
        """
        layers = self.layers

        def largest(values):
            values = list(values)
            return max(values) if values else math.nan

        figures = {
            "layers_flagged": float(len(self.flagged)),
            "max_mean_shift": largest(x.max_mean_shift for x in layers),
            "max_log_variance_ratio": largest(x.max_log_variance_ratio for x in layers),
            "min_effective_batch": -largest(-x.median_effective_batch for x in layers),
            "dead_channels": float(
                sum(
                    len(set(x.dead_channels) | set(x.zero_gamma_channels))
                    for x in layers
                )
            ),
            "nonfinite_layers": float(sum(bool(x.nonfinite) for x in layers)),
            "output_shift": self.model.output_shift_max,
            "changed_predictions": _nan_if_none(self.model.changed_predictions),
        }
        for way in ("moving", "population"):
            for name, value in (getattr(self.model, f"metrics_{way}") or {}).items():
                figures[f"{way}_{name}"] = value
        return {prefix + name: float(value) for name, value in figures.items()}

    def to_dict(self) -> dict:
        """JSON-ready (``json.dumps`` takes it; NaN and inf become None)."""
        return json_ready(
            {
                "samples": self.samples,
                "batches": self.batches,
                "training_steps": self.training_steps,
                "thresholds": {
                    "STALE_MEAN_SHIFT": STALE_MEAN_SHIFT,
                    "STALE_LOG_VARIANCE_RATIO": STALE_LOG_VARIANCE_RATIO,
                    "SMALL_EFFECTIVE_BATCH": SMALL_EFFECTIVE_BATCH,
                    "DEAD_VARIANCE_FRACTION": DEAD_VARIANCE_FRACTION,
                    "DEAD_GAMMA_FRACTION": DEAD_GAMMA_FRACTION,
                },
                "layers": [layer.to_dict() for layer in self.layers],
                "unreached": list(self.unreached),
                "model": self.model.to_dict(),
            }
        )

    def __str__(self) -> str:
        return _table(self)

    def plot(self, path: str) -> str:
        """Writes a figure to ``path`` (any format matplotlib writes, by suffix).

        Left: the largest mean shift and ``|log variance ratio|`` of every
        layer, in the model's order, with the thresholds. Right: the worst
        layer's channels. matplotlib is imported here (``pip install
        matplotlib``); no global plotting state is touched.

        Returns:
            ``path``.
        """
        from matplotlib.figure import Figure

        figure = Figure(figsize=(12, 4.5), layout="constrained")
        left, right = figure.subplots(1, 2, width_ratios=(3, 2))
        names = [_short(layer.path, 28) for layer in self.layers]
        where = np.arange(len(self.layers))
        shifts = [_finite_or(layer.max_mean_shift) for layer in self.layers]
        ratios = [_finite_or(layer.max_log_variance_ratio) for layer in self.layers]
        left.bar(where - 0.2, shifts, 0.4, label="largest |mean shift| (std)")
        left.bar(where + 0.2, ratios, 0.4, label="largest |log variance ratio|")
        left.axhline(STALE_MEAN_SHIFT, color="C0", linestyle="--", linewidth=1)
        left.axhline(STALE_LOG_VARIANCE_RATIO, color="C1", linestyle="--", linewidth=1)
        left.set_xticks(where, names, rotation=60, ha="right", fontsize=7)
        left.set_title(
            "gap of the moving statistics, per BN layer (dashed: thresholds)"
        )
        left.legend(fontsize=8)
        if self.layers:
            worst = self.ranked[0]
            channels = np.arange(worst.channels)
            right.plot(channels, worst.mean_shift, ".", label="mean shift (std)")
            right.plot(
                channels, worst.log_variance_ratio, ".", label="log variance ratio"
            )
            right.axhline(0.0, color="gray", linewidth=0.5)
            right.set_xlabel("channel")
            right.set_title(
                f"worst: {_short(worst.path, 40)} ({worst.verdict})", fontsize=9
            )
            right.legend(fontsize=8)
        figure.savefig(path, dpi=110)
        return path


def _finite_or(value: float, default: float = 0.0) -> float:
    return value if math.isfinite(value) else default


def _nan_if_none(value) -> float:
    return math.nan if value is None else value


def _short(path: str, width: int) -> str:
    return path if len(path) <= width else "..." + path[-(width - 3) :]


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def _table(diagnosis: Diagnosis) -> str:
    """The compact terminal table of :meth:`Diagnosis.__str__`."""
    header = (
        "layer", "mode", "mom.", "init", "shift max/med", "logvar max/med",
        "eff/nominal batch", "dead", "verdict",
    )  # fmt: skip
    rows = []
    for layer in diagnosis.ranked:
        dead = len(set(layer.dead_channels) | set(layer.zero_gamma_channels))
        rows.append(
            (
                _short(layer.path, 40),
                layer.mode,
                f"{layer.momentum:g}",
                _number(layer.initializer_share, 2),
                f"{_number(layer.max_mean_shift)} / {_number(layer.median_mean_shift)}",
                f"{_number(layer.max_log_variance_ratio)} / "
                f"{_number(layer.median_log_variance_ratio)}",
                f"{_number(layer.median_effective_batch)} / "
                f"{_number(_median(layer.nominal_batch), 5)}",
                f"{dead}/{layer.channels}",
                layer.verdict,
            )
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join
    lines = [
        f"kerasbn.diagnose: {len(diagnosis.layers)} BN layers, {diagnosis.samples} "
        f"samples in {diagnosis.batches} batches"
        + (
            f", {diagnosis.training_steps} training steps"
            if diagnosis.training_steps is not None
            else ""
        ),
        line(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
    ]
    lines += [line(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    fixes: dict[str, list[str]] = {}
    for layer in diagnosis.flagged:
        lines.append(f"  {layer.path}: {layer.verdict}: {layer.reason}")
        fixes.setdefault(layer.action, []).append(layer.path)
    for action, paths in fixes.items():
        lines.append(f"  fix ({', '.join(paths)}): {action}")
    if diagnosis.unreached:
        lines.append(f"  not reached by the model's call: {list(diagnosis.unreached)}")
    lines += _model_lines(diagnosis.model)
    return "\n".join(lines)


def _model_lines(model: ModelComparison) -> list[str]:
    line = (
        f"model, population vs moving statistics: outputs move by up to "
        f"{_number(model.output_shift_max)} (rms {_number(model.output_shift_rms)}; "
        f"outputs rms {_number(model.output_rms)})"
    )
    if model.changed_predictions is not None:
        line += f"; {model.changed_predictions:.1%} of predicted classes change"
    lines = [line]
    if model.nonfinite_moving or model.nonfinite_population:
        lines.append(
            f"  non-finite outputs: {model.nonfinite_moving} with the moving "
            f"statistics, {model.nonfinite_population} with the population's"
        )
    if model.metrics_moving and model.metrics_population:
        pairs = ", ".join(
            f"{name} {_number(model.metrics_moving[name], 4)} -> {_number(value, 4)}"
            for name, value in model.metrics_population.items()
            if name in model.metrics_moving
        )
        lines.append(f"  recalibrate would take {pairs}")
    return lines


# ------------------------------------------------------------------ diagnose
def diagnose(
    model: keras.Model, data, *, steps: int | None = None, batch_size: int = 32
) -> Diagnosis:
    """Diagnoses every BN layer of ``model`` on ``data``: the gap, why, the fix.

    One pass over ``data`` (read once: a generator may be single-use)
    measures, for every ``kerasbn.BatchNorm`` and
    ``keras.layers.BatchNormalization`` at any depth (graph nodes, nested
    models, layers inside custom layers and subclassed models, keras_hub
    backbones and tasks):

    * its configuration: the statistics it normalizes with (``mode``) and its
      momentum, and the initializer's share ``momentum ** steps`` where the
      model's optimizer gives the steps;
    * the gap between its moving statistics and the exact population
      statistics of its inputs over ``data`` (those ``kerasbn.recalibrate``
      would set): the mean's shift in population standard deviations and the
      log ratio of the variances, per channel, largest and median;
    * the spread of the batch statistics from batch to batch, and the
      effective batch size ``variance / Var(batch means)`` beside the nominal
      one;
    * dead channels (input variance far below epsilon, or gamma about 0) and
      non-finite weights, statistics or inputs;
    * a verdict and the action that fixes it (see the module's thresholds).

    Then the model's outputs are compared with its moving statistics and with
    the population statistics, and, where ``data`` has labels and the model
    is compiled, its loss and compiled metrics both ways ("recalibrate would
    take accuracy from 0.62 to 0.97"). This needs the inputs again: the
    batches read in the one pass are kept for it (memory: the data, and the
    outputs of one way, as much as ``predict`` keeps), rather than reading
    ``data`` twice. The population statistics are never assigned: the second
    way is a ``model.stateless_call``.

    The model is left as it was, bit for bit: weights, statistics, trainable
    flags and layers (the pass wraps each BN layer's ``call`` on the object
    and removes the wrapper, also after an exception), and the states of its
    compiled metrics.

    Pass ``data`` batched as in training: the spread of the batch statistics
    and the effective batch size are those of its batches. Across workers
    (``tf.distribute`` worker processes, ``jax.distributed``,
    ``torch.distributed``), call it on every worker with its own data: every
    number is merged exactly over the workers, and every worker gets the same
    diagnosis.

    Args:
        model: a ``keras.Model`` of any kind.
        data: a batched ``tf.data.Dataset``, a NumPy array of inputs, a tuple
            ``(x, y[, sample_weight])`` of NumPy arrays, or an iterable of
            batches ``x`` or ``(x, y[, sample_weight])``, as for
            ``kerasbn.recalibrate``.
        steps: the number of batches to read; None for all of them.
        batch_size: the batch size for NumPy arrays.

    Returns:
        The :class:`Diagnosis`.

    Raises:
        TypeError: ``model`` is not a Keras model, or ``steps`` or
            ``batch_size`` is not an int.
        ValueError: ``steps`` or ``batch_size`` is below 1, or ``data`` gave
            no batch.

    Example:
        >>> import keras, numpy as np, kerasbn
        >>> model = keras.Sequential([keras.Input((4,)), kerasbn.BatchNorm()])
        >>> x = np.random.default_rng(0).normal(3.0, 2.0, (256, 4)).astype("float32")
        >>> diagnosis = kerasbn.diagnose(model, x)
        >>> layer = diagnosis.layers[0]
        >>> layer.verdict, round(layer.max_mean_shift)  # moving mean 0, data mean 3
        ('stale statistics', 2)
        >>> kerasbn.diagnose(kerasbn.recalibrate(model, x), x).layers[0].verdict
        'ok'
    """
    return _diagnose(model, data, steps, batch_size, None)


def _diagnose(model, data, steps, batch_size, compiled) -> Diagnosis:
    """:func:`diagnose`, with the model's compiled functions where kept."""
    _statistics.check_positive_int("steps", steps, allow_none=True)
    _statistics.check_positive_int("batch_size", batch_size)
    if not isinstance(model, keras.Model):
        raise TypeError(f"diagnose needs a keras.Model; got {type(model).__name__}.")
    if compiled is None or compiled.model is not model:
        compiled = _statistics.Compiled(model)
    found = _graph.batch_norms(model)
    if not found:
        raise ValueError(
            f"diagnose found no BN layer (kerasbn.BatchNorm or "
            f"keras.layers.BatchNormalization) in model {model.name!r}."
        )
    result = _statistics.run(model, found, data, steps, batch_size, True, compiled)
    if not result.batches:
        raise ValueError("`data` gave no batch; diagnose needs at least one.")
    training_steps = _optimizer_steps(model)
    layers = tuple(
        _diagnose_layer(path, layer, record, training_steps)
        for (path, layer), record in zip(found, result.statistics)
        if record is not None
    )
    comparison = compare(model, result, compiled)
    return Diagnosis(
        layers=layers,
        model=comparison,
        samples=comparison.samples,
        batches=result.batches,
        training_steps=training_steps,
        unreached=tuple(_statistics.unreached(result)),
    )


def _optimizer_steps(model) -> int | None:
    """The optimizer's iterations, where the model has an optimizer."""
    iterations = getattr(getattr(model, "optimizer", None), "iterations", None)
    return None if iterations is None else int(ops.convert_to_numpy(iterations))


# ---------------------------------------------------------------- BNMonitor
class BNMonitor(keras.callbacks.Callback):
    """Diagnoses the model's BN layers at the end of training epochs.

    At the end of the first epoch and of every ``every``-th epoch after it,
    :func:`diagnose` runs on ``validation_data`` and its
    :meth:`Diagnosis.summary` figures (``bn_max_mean_shift``,
    ``bn_layers_flagged``, ``bn_population_accuracy``, ...) go into the
    epoch's ``logs``, so ``History``, ``CSVLogger`` and ``TensorBoard`` record
    them (list ``BNMonitor`` before those callbacks: Keras calls callbacks in
    order). Epochs without a diagnosis get NaN under the same keys. The first
    time a layer's verdict is not ``"ok"``, a ``UserWarning`` names its path,
    the verdict, the reason and the fix; each path warns once.

    Args:
        validation_data: what :func:`diagnose` takes as ``data``; it is read
            once per diagnosis, so pass data that can be read again (arrays,
            a ``tf.data.Dataset``, a list of batches), not a generator.
        every: diagnose every ``every`` epochs.
        steps: batches per diagnosis; None for all.
        batch_size: the batch size for NumPy arrays.
        prefix: the prefix of the log keys.

    Attributes:
        diagnosis: the latest :class:`Diagnosis` (None before the first).

    Example:
        >>> import keras, numpy as np, kerasbn
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
        ...                           kerasbn.BatchNorm(), keras.layers.Dense(1)])
        >>> model.compile("sgd", "mse")
        >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
        >>> monitor = kerasbn.BNMonitor((x, x[:, :1]))
        >>> history = model.fit(x, x[:, :1], epochs=2, callbacks=[monitor], verbose=0)
        >>> "bn_max_mean_shift" in history.history
        True
    """

    def __init__(
        self,
        validation_data,
        every: int = 1,
        *,
        steps: int | None = None,
        batch_size: int = 32,
        prefix: str = "bn_",
    ):
        super().__init__()
        _statistics.check_positive_int("every", every)
        _statistics.check_positive_int("steps", steps, allow_none=True)
        _statistics.check_positive_int("batch_size", batch_size)
        self.validation_data = validation_data
        self.every = every
        self.steps = steps
        self.batch_size = batch_size
        self.prefix = prefix
        self.diagnosis: Diagnosis | None = None
        self._keys: list[str] = []
        self._warned: set[str] = set()
        self._compiled = None  # the model's compiled functions, for this fit

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._compiled = None  # a new fit: the model may have changed

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            logs = {}
        if epoch % self.every:
            logs.update(dict.fromkeys(self._keys, math.nan))
            return
        self.diagnosis = diagnose(
            self.model,
            self.validation_data,
            steps=self.steps,
            batch_size=self.batch_size,
        )
        figures = self.diagnosis.summary(self.prefix)
        self._keys = list(dict.fromkeys([*self._keys, *figures]))
        logs.update(dict.fromkeys(self._keys, math.nan))
        logs.update(figures)
        for layer in self.diagnosis.flagged:
            if layer.path not in self._warned:
                self._warned.add(layer.path)
                warnings.warn(
                    f"BNMonitor, epoch {epoch + 1}: BN layer {layer.path!r}: "
                    f"{layer.verdict}: {layer.reason}. Fix: {layer.action}.",
                    stacklevel=2,
                )
