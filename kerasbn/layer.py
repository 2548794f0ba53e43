"""``kerasbn.BatchNorm``: a Keras-exact drop-in for ``keras.layers.BatchNormalization``."""

from __future__ import annotations

from typing import Any, Literal

import keras
from keras import constraints, initializers, ops, regularizers

from kerasbn import _checks, backends, formulas

__all__ = ["BatchNorm"]

__all__ = ["BatchNorm", "BatchNormalization"]


def _average_groups(group_axis, *statistics):
    """The statistics averaged over ``group_axis`` (dropped), or as they are."""
    if group_axis is None:
        return statistics
    return tuple(ops.mean(t, axis=group_axis) for t in statistics)


@keras.saving.register_keras_serializable(package="kerasbn")
class BatchNorm(keras.layers.Layer):
    """Batch normalization, a drop-in for ``keras.layers.BatchNormalization``.

    ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``. With
    ``training=True`` (``fit()``), ``mean`` and ``var`` are the batch's own
    (biased) statistics, and the moving statistics are updated as
    ``moving = moving * momentum + batch * (1 - momentum)``. Otherwise
    (``evaluate``/``predict``, ``training=False``/``None``) the moving
    statistics are used. ``trainable=False`` forces inference mode and freezes
    the statistics. A training batch whose mean or variance is not finite
    leaves the moving statistics unchanged.

    Args:
        axis: the channel axis, or a list/tuple of axes; one statistic is kept
            per element of their product.
        momentum: weight of the old value in the moving averages, in [0, 1].
        epsilon: added to the variance, > 0.
        center: whether to add the learned offset ``beta``.
        scale: whether to multiply by the learned scale ``gamma``.
        beta_initializer, gamma_initializer: initializers of beta and gamma.
        moving_mean_initializer, moving_variance_initializer: initializers of
            the moving statistics.
        beta_regularizer, gamma_regularizer: optional regularizers.
        beta_constraint, gamma_constraint: optional constraints.
        renorm: whether to use batch renormalization (Ioffe, 2017).
        renorm_clipping: dict with optional keys ``rmax``, ``rmin``, ``dmax``.
        renorm_momentum: momentum of the renorm statistics, in [0, 1].
        synchronized: whether training statistics are those of the global batch
            across all replicas and workers of a ``tf.distribute`` strategy
            (TensorFlow) or all processes of a ``torch.distributed`` process
            group (torch).
        virtual_batch_size: ghost batch normalization: in training the batch
            of size B is split into B / v groups of ``v`` samples, each
            normalized with its own statistics; the moving statistics move
            towards the groups' average mean and variance (as tf.keras does).
            As in tf.keras, group ``g`` holds samples ``g, g + B/v, g + 2B/v,
            ...``. Inference ignores it. None (the default) disables it.
        statistics: which statistics normalize. ``"auto"`` (the default) is
            Keras's rule above. ``"moving"`` always uses the moving statistics
            and never updates them (a frozen BN; gamma and beta still train
            unless ``trainable=False``). ``"batch"`` always uses the batch's
            own statistics, in inference too (as PyTorch's
            ``track_running_stats=False``, or test-time adaptation); the
            moving ones are updated only in training.
        unbiased_moving_variance: whether the moving variance moves towards
            the batch variance times ``n / (n - 1)``, as PyTorch and
            tf.keras's fused kernel do, instead of the biased batch variance
            (Keras 3, the default). ``n`` is the number of values per channel:
            unmasked ones with a mask, those of one group with ghost batches,
            those of the global batch with ``synchronized=True``. A channel
            with fewer than two unmasked values keeps its moving statistics.
            Normalization always uses the biased batch variance.
        **kwargs: base layer arguments (``name``, ``dtype``, ``trainable``...).

    Call arguments:
        inputs: a tensor of rank >= 2.
        training: whether to use batch statistics (and update the moving ones).
        mask: optional boolean tensor, by Keras's rule: of the input's rank
            minus one, expanded at the last axis and broadcast to the input
            (so a ``(B, T)`` mask from ``Masking`` or ``Embedding(mask_zero=
            True)`` serves a ``(B, T, C)`` input, whatever the axis). A mask of
            the input's own rank that broadcasts to it is also taken. False
            positions do not count towards the statistics.

    Raises:
        TypeError, ValueError: on an invalid argument or input, with a message
            that names the argument, the value and what is allowed.

    Example:
        >>> import keras, numpy as np, kerasbn
        >>> layer = kerasbn.BatchNorm(momentum=0.9)
        >>> x = np.random.default_rng(0).normal(3.0, 2.0, (64, 4)).astype("float32")
        >>> y = keras.ops.convert_to_numpy(layer(x, training=True))
        >>> bool(abs(float(y.mean())) < 1e-5)
        True
    """

    def __init__(
        self,
        axis: int | list[int] | tuple[int, ...] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: str | dict | initializers.Initializer = "zeros",
        gamma_initializer: str | dict | initializers.Initializer = "ones",
        moving_mean_initializer: str | dict | initializers.Initializer = "zeros",
        moving_variance_initializer: str | dict | initializers.Initializer = "ones",
        beta_regularizer: str | dict | regularizers.Regularizer | None = None,
        gamma_regularizer: str | dict | regularizers.Regularizer | None = None,
        beta_constraint: str | dict | constraints.Constraint | None = None,
        gamma_constraint: str | dict | constraints.Constraint | None = None,
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        virtual_batch_size: int | None = None,
        statistics: Literal["auto", "moving", "batch"] = "auto",
        unbiased_moving_variance: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.axis = _checks.axis(axis)
        self.momentum = _checks.fraction("momentum", momentum)
        self.epsilon = _checks.epsilon(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.renorm = bool(renorm)
        self.renorm_clipping = _checks.renorm_clipping(renorm_clipping)
        self.renorm_momentum = _checks.fraction("renorm_momentum", renorm_momentum)
        if synchronized and keras.backend.backend() not in (
            "tensorflow",
            "jax",
            "torch",
        ):
            raise ValueError(
                "`synchronized=True` needs the TensorFlow, JAX or torch backend; the "
                f"backend is {keras.backend.backend()!r}."
            )
        self.synchronized = bool(synchronized)
        self.virtual_batch_size = _checks.virtual_batch_size(
            virtual_batch_size, self.synchronized
        )
        self.statistics = _checks.statistics(statistics)
        self.unbiased_moving_variance = bool(unbiased_moving_variance)
        self.supports_masking = True
        self.gamma = self.beta = None
        self.moving_mean = self.moving_variance = None

    # ------------------------------------------------------------------ build
    def build(self, input_shape):
        ndim = len(input_shape)
        channel_axes = _checks.channel_axes(self.axis, input_shape)
        if self.virtual_batch_size and 0 in channel_axes:
            raise ValueError(
                "With `virtual_batch_size`, axis 0 is the batch axis and cannot be "
                f"normalized; got axis={self.axis!r}."
            )
        self._channel_axes = channel_axes
        self._reduction_axes = [a for a in range(ndim) if a not in channel_axes]
        self._broadcast_shape = tuple(
            input_shape[a] if a in channel_axes else 1 for a in range(ndim)
        )
        # Trailing channel axes: the weights broadcast against the input as
        # they are (NumPy's rule aligns shapes at the right), with no reshape.
        self._weights_broadcast = channel_axes == list(
            range(ndim - len(channel_axes), ndim)
        )
        shape = tuple(input_shape[a] for a in channel_axes)
        self._add_weights(shape)
        self.input_spec = keras.layers.InputSpec(
            ndim=ndim, axes={a: input_shape[a] for a in channel_axes}
        )

    def _add_weights(self, shape):
        def add(name, initializer, trainable=False, **kwargs):
            return self.add_weight(
                shape=shape,
                name=name,
                initializer=initializer,
                trainable=trainable,
                autocast=False,
                **kwargs,
            )

        if self.scale:
            self.gamma = add(
                "gamma",
                self.gamma_initializer,
                trainable=True,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
            )
        if self.center:
            self.beta = add(
                "beta",
                self.beta_initializer,
                trainable=True,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
            )
        self.moving_mean = add("moving_mean", self.moving_mean_initializer)
        self.moving_variance = add("moving_variance", self.moving_variance_initializer)
        if self.renorm:
            # As in Keras: renorm tracks the moving stddev, and its own
            # (training-time) mean and stddev, all starting from the initializers.
            def stddev_initializer(shape, dtype=None):
                config = self.moving_variance_initializer.get_config()
                fresh = self.moving_variance_initializer.__class__.from_config(config)
                return ops.sqrt(fresh(shape, dtype=dtype))

            mean_config = self.moving_mean_initializer.get_config()
            self.moving_stddev = add("moving_stddev", stddev_initializer)
            self.renorm_mean = add(
                "renorm_mean",
                self.moving_mean_initializer.__class__.from_config(mean_config),
            )
            self.renorm_stddev = add("renorm_stddev", stddev_initializer)

    def compute_output_shape(self, input_shape):
        return input_shape

    # ------------------------------------------------------------------- call
    def call(self, inputs, training=None, mask=None):
        mask = formulas.expand_mask(mask, inputs)
        if not self._uses_batch_statistics(training):
            outputs = self._normalize_with_moving_statistics(inputs)
        else:
            self._check_batch_has_spread(inputs)
            outputs, mean, variance = self._normalize_with_batch_statistics(
                inputs, mask
            )
            if self._updates_moving_statistics(training):
                self._update_moving_statistics(mean, variance, mask)
        return ops.cast(outputs, self.compute_dtype)

    def _uses_batch_statistics(self, training) -> bool:
        if self.statistics == "auto":
            return self._updates_moving_statistics(training)
        return self.statistics == "batch"

    def _updates_moving_statistics(self, training) -> bool:
        return bool(training) and self.trainable and self.statistics != "moving"

    def _normalize_with_moving_statistics(self, x):
        return backends.normalize(
            x,
            self._reduction_axes,
            self._broadcast(self.moving_mean),
            self._broadcast(self.moving_variance),
            self._broadcast(self.gamma),
            self._broadcast(self.beta),
            self.epsilon,
        )

    def _normalize_with_batch_statistics(self, x, mask):
        """Returns ``(outputs, batch_mean, batch_variance)``."""
        if self.virtual_batch_size:
            return self._normalize_ghost_batches(x, mask)
        return self._normalize_groups(x, mask, self._reduction_axes)

    def _normalize_ghost_batches(self, x, mask):
        """Splits the batch as tf.keras does: ``(B, ...) -> (v, B / v, ...)``."""
        x = backends.check_divisible(x, self.virtual_batch_size)
        shape = ops.shape(x)
        grouped = ops.reshape(x, (self.virtual_batch_size, -1, *shape[1:]))
        if mask is not None:
            mask = ops.reshape(mask, ops.shape(grouped))
        axes = [0] + [a + 1 for a in self._reduction_axes if a != 0]
        outputs, mean, variance = self._normalize_groups(grouped, mask, axes, 1)
        return ops.reshape(outputs, shape), mean, variance

    def _normalize_groups(self, x, mask, axes, group_axis=None):
        """Normalizes ``x`` with its own statistics over ``axes``.

        Returns the outputs and the statistics that drive the moving averages:
        those of the batch, or their average over ``group_axis`` (ghost
        batches), the variance unbiased with ``unbiased_moving_variance``.
        """
        gamma, beta = self._broadcast(self.gamma), self._broadcast(self.beta)
        if not (self.renorm or self.synchronized):
            outputs, mean, variance = backends.batch_normalize(
                x, axes, gamma, beta, self.epsilon, mask
            )
            variance = self._moving_target(
                variance, lambda: formulas.sample_count(x, axes, mask)
            )
            return outputs, *_average_groups(group_axis, mean, variance)
        local = formulas.sufficient_moments(x, axes, mask)
        if self.synchronized:
            local = backends.global_moments(local)
        pooled = _average_groups(group_axis, local.mean, local.variance)
        if self.renorm:
            gamma, beta = self._renorm_affine(*pooled, gamma, beta)
        outputs = formulas.normalize(
            x, local.mean, local.variance, gamma, beta, self.epsilon
        )
        if self.unbiased_moving_variance:
            variance = self._moving_target(local.variance, lambda: local.count)
            pooled = _average_groups(group_axis, local.mean, variance)
        return outputs, *pooled

    def _moving_target(self, variance, count):
        """The batch variance that the moving one moves towards: unbiased by
        the number of values per channel, ``count()``, if so configured."""
        if not self.unbiased_moving_variance:
            return variance
        return formulas.unbiased_variance(variance, count())

    def _renorm_affine(self, mean, variance, gamma, beta):
        """Folds the renorm correction into gamma and beta: (x̂·r + d)·γ + β."""
        r, d = formulas.renorm_correction(
            mean,
            variance,
            self._broadcast(self.renorm_mean),
            self._broadcast(self.renorm_stddev),
            self.epsilon,
            self.renorm_clipping or {},
        )
        if gamma is None:
            return r, d if beta is None else d + beta
        return r * gamma, d * gamma if beta is None else d * gamma + beta

    # --------------------------------------------------------- moving updates
    def _update_moving_statistics(self, mean, variance, mask):
        # A reshape, not a squeeze: compilers cancel it with the kernel's own.
        mean = ops.reshape(mean, self.moving_mean.shape)
        variance = ops.reshape(variance, self.moving_variance.shape)
        usable = backends.all_finite(mean, variance)
        if mask is not None:  # a channel that saw too few values keeps them
            seen = ops.sum(ops.cast(mask, "float32"), axis=self._reduction_axes)
            needed = 2.0 if self.unbiased_moving_variance else 1.0
            usable = ops.logical_and(usable, seen >= needed)
        backends.assign_where(usable, self._moving_updates(mean, variance))

    def _moving_updates(self, mean, variance):
        """Triples ``(variable, its value, its new value)`` of one training step."""
        if not self.renorm:
            return [
                self._ema(self.moving_mean, mean),
                self._ema(self.moving_variance, variance),
            ]
        stddev = ops.sqrt(variance + self.epsilon)
        moving_stddev = self._ema(self.moving_stddev, stddev)
        _, _, new_stddev = moving_stddev
        return [
            self._ema(self.renorm_mean, mean, self.renorm_momentum),
            self._ema(self.renorm_stddev, stddev, self.renorm_momentum),
            self._ema(self.moving_mean, mean),
            moving_stddev,
            (
                self.moving_variance,
                self.moving_variance.value,
                ops.relu(new_stddev * new_stddev - self.epsilon),
            ),
        ]

    def _ema(self, variable, value, momentum=None):
        """``(variable, its value, its moving average towards value)``, at the
        layer's momentum unless another is given."""
        momentum = self.momentum if momentum is None else momentum
        current = variable.value
        return variable, current, backends.moving_average(current, value, momentum)

    # ---------------------------------------------------------------- helpers
    def _broadcast(self, weight):
        """``weight``'s value, broadcastable against the input (None stays None)."""
        if weight is None:
            return None
        if self._weights_broadcast:
            return weight.value
        return ops.reshape(weight.value, self._broadcast_shape)

    def _check_batch_has_spread(self, inputs):
        sizes = [inputs.shape[a] for a in self._reduction_axes]
        if self.virtual_batch_size:
            sizes = [self.virtual_batch_size] + sizes[1:]
        _checks.batch_has_spread(sizes, inputs.shape, self._channel_axes)

    # ----------------------------------------------------------------- config
    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(
                self.moving_mean_initializer
            ),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "virtual_batch_size": self.virtual_batch_size,
            "statistics": self.statistics,
            "unbiased_moving_variance": self.unbiased_moving_variance,
        }
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="kerasbn")
class BatchNormalization(BatchNorm):
    """:class:`BatchNorm` under Keras's class name; what ``kerasbn.from_keras`` makes.

    It is ``BatchNorm`` in every way but its name, which is that of
    ``keras.layers.BatchNormalization``: unnamed layers are named
    ``batch_normalization``, ``batch_normalization_1``..., as Keras's are, and
    Keras's saving, which files a layer held in a list, dict or
    ``Sequential`` under its class name, files this one where a Keras BN
    layer's statistics go. So the ``.keras`` file of a model whose Keras BN
    layers became this class loads with plain ``keras.models.load_model``
    wherever the original's did, even where the model's own code creates
    ``keras.layers.BatchNormalization`` on loading. Write
    ``from kerasbn import BatchNormalization`` for a drop-in with Keras's
    names and weight paths.

    Example:
        >>> import kerasbn
        >>> layer = kerasbn.BatchNormalization(momentum=0.9)
        >>> isinstance(layer, kerasbn.BatchNorm), layer.name.startswith("batch_normalization")
        (True, True)
    """
