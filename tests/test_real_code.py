"""The copying tools on real Keras code that nobody here wrote.

Three of keras-io's examples, shrunk to synthetic data, broke the copies that
``from_keras``, ``to_keras`` and ``fold_batch_norms`` make: a plain function as
the loss (the CTC speech example), ``fit()`` with an activity regularizer
(PointNet), and Keras's feature-extraction idiom on a folded model. Each runs
here as a copy and in place, on every backend, with the original model (or
Keras's own layers) as the reference. So do models compiled with losses,
metrics and schedules of every kind, registered or not, and a zoo of the
layers that ``keras.models.clone_model`` copies.
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import kerasbn

L = keras.layers
KERAS_BN = L.BatchNormalization
# XLA compiles these small models slower than TensorFlow runs them; JAX runs
# eagerly far slower than jitted.
JIT = keras.backend.backend() == "jax"


def ctc_loss(y_true, y_pred):
    """keras-io's CTCLoss: a plain, unregistered function (shrunk)."""
    batch = keras.ops.shape(y_pred)[0]
    steps = keras.ops.shape(y_pred)[1]
    labels = keras.ops.cast(y_true, "int32")
    label_length = keras.ops.full((batch,), keras.ops.shape(labels)[1], "int32")
    logit_length = keras.ops.full((batch,), steps, "int32")
    return keras.ops.ctc_loss(labels, y_pred, label_length, logit_length)


class OrthogonalRegularizer(keras.regularizers.Regularizer):
    """keras-io PointNet's activity regularizer (unregistered)."""

    def __init__(self, num_features, l2reg=0.001):
        self.num_features = num_features
        self.l2reg = l2reg
        self.identity = keras.ops.eye(num_features)

    def __call__(self, x):
        x = keras.ops.reshape(x, (-1, self.num_features, self.num_features))
        xxt = keras.ops.tensordot(x, x, axes=(2, 2))
        xxt = keras.ops.reshape(xxt, (-1, self.num_features, self.num_features))
        return keras.ops.sum(self.l2reg * keras.ops.square(xxt - self.identity))


class Smoothness(L.Layer):
    """A layer that adds a loss in ``call``, as many keras-io layers do."""

    def call(self, x):
        self.add_loss(1e-3 * keras.ops.mean(keras.ops.square(x)))
        return x


class Total(keras.metrics.Metric):
    """An unregistered metric object."""

    def __init__(self, name="total", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.total.assign_add(keras.ops.sum(keras.ops.cast(y_pred, "float32")))

    def result(self):
        return keras.ops.convert_to_tensor(self.total)


class ScaledMSE(keras.losses.Loss):
    """An unregistered loss object."""

    def __init__(self, scale=2.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, y_true, y_pred):
        return self.scale * keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)


class HalvingSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """An unregistered learning-rate schedule."""

    def __init__(self, rate):
        self.rate = rate

    def __call__(self, step):
        return self.rate / (1.0 + keras.ops.cast(step, "float32"))

    def get_config(self):
        return {"rate": self.rate}


def speech_model(bn):
    """keras-io's CTC ASR model, shrunk: conv, BN, ReLU, a dense layer where
    the example has its recurrent ones (the zoo test copies those)."""
    inputs = keras.Input((12, 6), name="spectrogram")
    x = L.Conv1D(8, 3, padding="same", use_bias=False, name="conv_1")(inputs)
    x = bn(name="conv_1_bn")(x)
    x = L.ReLU(name="conv_1_relu")(x)
    x = L.Dense(8, activation="relu", name="dense_1")(x)  # keras-io: GRU layers
    outputs = L.Dense(5, activation="softmax", name="dense")(x)
    return keras.Model(inputs, outputs, name="speech")


def point_net(bn):
    """keras-io's PointNet, shrunk: conv/BN blocks and a T-net with an
    orthogonal activity regularizer."""
    points, features = 16, 3

    def conv_bn(x, filters, name):
        x = L.Conv1D(filters, 1, padding="valid", name=f"{name}_conv")(x)
        return L.ReLU(name=f"{name}_relu")(bn(momentum=0.0, name=f"{name}_bn")(x))

    def tnet(inputs, num_features):
        x = conv_bn(inputs, 8, "tnet")
        x = L.GlobalMaxPooling1D(name="tnet_pool")(x)
        x = L.Dense(
            num_features * num_features,
            kernel_initializer="zeros",
            bias_initializer=keras.initializers.Constant(np.eye(num_features).ravel()),
            activity_regularizer=OrthogonalRegularizer(num_features),
            name="tnet_matrix",
        )(x)
        matrix = L.Reshape((num_features, num_features), name="tnet_reshape")(x)
        return L.Dot(axes=(2, 1), name="tnet_dot")([inputs, matrix])

    inputs = keras.Input((points, features), name="points")
    x = tnet(inputs, features)
    x = conv_bn(x, 8, "block_1")
    x = Smoothness(name="smooth")(x)
    x = L.GlobalMaxPooling1D(name="pool")(x)
    outputs = L.Dense(4, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name="pointnet")


TOOLS = ["from_keras", "to_keras", "fold_batch_norms"]


def bn_for(tool):
    """The BN class a tool converts: to_keras works on kerasbn's."""
    return kerasbn.BatchNorm if tool == "to_keras" else KERAS_BN


def twin_of(build, bn, model):
    """A model built as ``model`` was, with its weights and loss: the
    reference for a tool applied to ``model`` in place."""
    twin = build(bn)
    if getattr(model, "compiled", False):
        twin.compile(optimizer="sgd", loss=model.loss)
    twin.set_weights(model.get_weights())
    return twin


def tool_on(tool, model, in_place):
    """The tool's result on ``model``: a copy, or ``model`` changed in place."""
    apply = getattr(kerasbn, tool)
    return apply(model, in_place=True) if in_place else apply(model)


def assert_predicts_like(result, original, x, tool):
    expected = original.predict(x, verbose=0)
    actual = result.predict(x, verbose=0)
    scale = max(1.0, float(np.max(np.abs(expected))))
    tolerance = 1e-5 if tool == "fold_batch_norms" else 1e-6
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale)


# ------------------------------------------------------------------ the cases
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("tool", TOOLS)
def test_model_compiled_with_a_plain_function_loss(rng, tool, in_place):
    """keras-io's CTC example compiles with ``loss=CTCLoss``, a plain function
    that no registry knows."""
    bn = bn_for(tool)
    model = speech_model(bn)
    model.compile(keras.optimizers.Adam(1e-3), loss=ctc_loss, jit_compile=JIT)
    x = rng.normal(size=(8, 12, 6)).astype("float32")
    y = rng.integers(1, 5, (8, 3)).astype("int32")
    model.fit(x, y, batch_size=4, verbose=0)
    reference = twin_of(speech_model, bn, model) if in_place else model
    result = tool_on(tool, model, in_place)
    assert result.compiled and result.loss is ctc_loss
    assert result.optimizer is not model.optimizer or in_place
    assert_predicts_like(result, reference, x, tool)
    expected = reference.evaluate(x, y, verbose=0)
    np.testing.assert_allclose(result.evaluate(x, y, verbose=0), expected, rtol=1e-4)
    history = result.fit(x, y, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("tool", TOOLS)
def test_model_after_fit_with_an_activity_regularizer_and_added_losses(
    rng, tool, in_place
):
    """keras-io's PointNet after ``fit()``: its layers hold the losses of the
    last traced call (symbolic tensors on TensorFlow, non-leaf tensors on
    PyTorch), which a copy must not take along."""
    bn = bn_for(tool)
    model = point_net(bn)
    model.compile(
        "adam",
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=JIT,
    )
    x = rng.normal(size=(8, 16, 3)).astype("float32")
    y = rng.integers(0, 4, 8)
    model.fit(x, y, batch_size=4, verbose=0)
    reference = twin_of(point_net, bn, model) if in_place else model
    result = tool_on(tool, model, in_place)
    assert_predicts_like(result, reference, x, tool)
    # The regularizer and the added loss work on the result as on the model.
    result(x[:4]), reference(x[:4])
    assert len(result.losses) == len(reference.losses) == 2
    for actual, expected in zip(result.losses, reference.losses):
        np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), rtol=1e-4)
    history = result.fit(x, y, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("tool", TOOLS)
def test_feature_extraction_from_the_result_works_for_every_layer(rng, tool, in_place):
    """Keras's idiom ``keras.Model(m.inputs, m.get_layer(name).output)``
    needs one graph node per call: after a fold the rebuilt graph's layers
    kept their old node beside the new one."""
    bn = bn_for(tool)
    model = point_net(bn)
    x = rng.normal(size=(4, 16, 3)).astype("float32")
    reference = twin_of(point_net, bn, model)
    fresh = point_net(bn)  # a freshly built model: one node per call
    result = tool_on(tool, model, in_place)
    names = [layer.name for layer in result.layers]
    assert "block_1_relu" in names
    for layer in result.layers:
        assert len(layer._inbound_nodes) == len(
            fresh.get_layer(layer.name)._inbound_nodes
        )
        assert len(layer._inbound_nodes) == 1, layer.name
        if isinstance(layer, L.InputLayer):
            continue
        extractor = keras.Model(result.inputs, layer.output)
        expected = keras.Model(reference.inputs, reference.get_layer(layer.name).output)
        actual = extractor.predict(x, verbose=0)
        if tool == "fold_batch_norms" and "_conv" in layer.name:
            continue  # the conv absorbed its BN: its own output differs
        scale = max(1.0, float(np.max(np.abs(expected.predict(x, verbose=0)))))
        np.testing.assert_allclose(
            actual, expected.predict(x, verbose=0), rtol=0, atol=1e-5 * scale
        )


# ------------------------------------------------ compile arguments of any kind
COMPILES = {
    "unregistered loss object, metric object and schedule": lambda: dict(
        optimizer=keras.optimizers.SGD(HalvingSchedule(0.1)),
        loss=ScaledMSE(3.0),
        metrics=[Total(), "mae"],
    ),
    "functions as loss and metric": lambda: dict(
        optimizer="adam",
        loss=lambda y_true, y_pred: keras.ops.mean(keras.ops.abs(y_true - y_pred)),
        metrics=[lambda y_true, y_pred: keras.ops.max(y_pred)],
    ),
    "loss-scale optimizer and weighted metrics": lambda: dict(
        optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01)),
        loss=keras.losses.Huber(delta=0.5),
        weighted_metrics=[keras.metrics.MeanSquaredError(name="wmse")],
    ),
}


def small_model(bn):
    inputs = keras.Input((5,), name="x")
    x = bn(name="bn")(L.Dense(4, name="dense")(inputs))
    return keras.Model(inputs, L.Dense(2, name="out")(x), name="small")


@pytest.mark.parametrize("compiled", COMPILES)
@pytest.mark.parametrize("tool", TOOLS)
def test_copy_of_a_model_compiled_with_anything(rng, tool, compiled):
    """A copy is compiled with copies of the compile arguments (objects, not
    their config) and a new optimizer of the same class and config."""
    model = small_model(bn_for(tool))
    model.compile(**COMPILES[compiled](), jit_compile=JIT)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    model.fit(x, y, batch_size=8, verbose=0)
    steps = int(to_numpy(model.optimizer.iterations))
    result = tool_on(tool, model, False)
    assert result.compiled and type(result.optimizer) is type(model.optimizer)
    assert result.optimizer is not model.optimizer
    assert int(to_numpy(result.optimizer.iterations)) == 0
    assert result.optimizer.get_config() == model.optimizer.get_config()
    expected = model.evaluate(x, y, verbose=0, return_dict=True)
    actual = result.evaluate(x, y, verbose=0, return_dict=True)
    assert actual.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-4, atol=1e-6)
    result.fit(x, y, batch_size=8, verbose=0)
    assert int(to_numpy(model.optimizer.iterations)) == steps  # the original's


# ------------------------------------------------------------------ layer zoo
def zoo_model(bn):
    """Layers of many kinds that keras.models.clone_model copies: masking,
    recurrent and bidirectional, attention, adapted normalization, noise,
    TimeDistributed, a Lambda, rescaling."""
    rng = np.random.default_rng(0)
    norm = L.Normalization(name="norm")
    norm.adapt(rng.normal(2, 3, (32, 6, 4)).astype("float32"))
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    sequence = keras.Input((6, 4), name="sequence")
    e = L.Embedding(20, 4, mask_zero=True, name="embedding")(tokens)
    h = L.Concatenate(name="concat")([e, norm(sequence)])
    h = L.LSTM(8, return_sequences=True, name="lstm")(h)
    h = L.Bidirectional(L.GRU(4, return_sequences=True), name="bigru")(h)
    h = bn(name="bn_1")(h)
    h = L.MultiHeadAttention(2, 4, name="attention")(h, h)
    h = L.LayerNormalization(name="layer_norm")(h)
    h = L.GaussianNoise(0.1, name="noise")(L.Dropout(0.3, name="dropout")(h))
    h = L.TimeDistributed(L.Dense(4), name="time_distributed")(h)
    h = bn(name="bn_2")(L.Conv1D(4, 3, padding="same", name="conv")(h))
    h = L.Lambda(lambda t: keras.ops.relu(t) * 2.0, name="lambda")(h)
    h = L.Rescaling(0.5, name="rescaling")(L.GlobalAveragePooling1D(name="gap")(h))
    return keras.Model([tokens, sequence], L.Dense(2, name="out")(h), name="zoo")


@pytest.mark.parametrize("tool", ["from_keras"])  # fold copies the same way
def test_layers_of_every_kind_are_copied(rng, tool):
    model = zoo_model(bn_for(tool))
    x = [
        rng.integers(0, 20, (8, 6)).astype("int32"),
        rng.normal(size=(8, 6, 4)).astype("float32"),
    ]
    model(x, training=True)  # moves the BN statistics, draws noise and dropout
    before = [w.copy() for w in model.get_weights()]
    result = tool_on(tool, model, False)
    assert_predicts_like(result, model, x, tool)
    result(x, training=True)
    for w, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)  # the original is untouched
