"""fold_batch_norms against the original model's predict, NumPy and the TF/TFLite graphs.

The SavedModel/TFLite checks need the TensorFlow backend; the rest runs on every
backend.
"""

import contextlib
import functools
import importlib.util
import io
import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import record, run_tflite, tensorflow_only, to_numpy
from functional_graphs import every_node_model, flat_numpy
from functional_graphs import inputs as graph_inputs
from functional_graphs import randomize_batch_norms as randomize_graph_batch_norms

import kerasbn
from kerasbn.fold import ChannelAffine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lecture_cnn import build_lecture_cnn

BATCH_NORMS = (kerasbn.BatchNorm, keras.layers.BatchNormalization)
BN_KINDS = {"kerasbn": kerasbn.BatchNorm, "keras": keras.layers.BatchNormalization}


def randomize_batch_norms(model, rng):
    """Gives every BN layer (nested ones too) trained-looking weights."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomize_batch_norms(layer, rng)
        if isinstance(layer, BATCH_NORMS):
            layer.set_weights(
                [
                    rng.uniform(0.3, 3.0, w.shape)
                    if v.name in ("gamma", "moving_variance", "moving_stddev")
                    else rng.normal(0.0, 1.0, w.shape)
                    for v, w in zip(layer.weights, layer.get_weights())
                ]
            )
    return model


def leaf_layers(model):
    for layer in model.layers:
        yield from leaf_layers(layer) if isinstance(layer, keras.Model) else [layer]


def count(model, kinds):
    return sum(isinstance(layer, kinds) for layer in leaf_layers(model))


def assert_predicts_like(folded, model, x, name):
    """max |folded - model| <= 1e-5 * max |model|, output by output."""
    expected = model.predict(x, verbose=0)
    actual = folded.predict(x, verbose=0)
    for a, e in zip(keras.tree.flatten(actual), keras.tree.flatten(expected)):
        relative = np.max(np.abs(a - e)) / np.max(np.abs(e))
        assert relative <= 1e-5, relative
        record(f"fold: {name} (relative)", relative, 0.0)


def chain(input_shape, *layers):
    return keras.Sequential([keras.Input(input_shape), *layers])


@pytest.fixture(scope="module")
def lecture_cnn():
    return randomize_batch_norms(build_lecture_cnn(), np.random.default_rng(5))


def test_lecture_cnn_folds_all_three_bn_and_matches_predict(rng, lecture_cnn):
    folded = kerasbn.fold_batch_norms(lecture_cnn)
    assert isinstance(folded, keras.Sequential)
    assert count(folded, (*BATCH_NORMS, ChannelAffine)) == 0
    kept = [layer for layer in lecture_cnn.layers if not isinstance(layer, BATCH_NORMS)]
    assert [layer.name for layer in folded.layers] == [layer.name for layer in kept]
    assert_predicts_like(folded, lecture_cnn, rng.normal(size=(16, 28, 28, 1)), "cnn")


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("kind", BN_KINDS)
def test_folded_kernel_and_bias_equal_numpy_closed_form(rng, kind, use_bias):
    model = chain(
        (5, 5, 2),
        keras.layers.Conv2D(3, 3, use_bias=use_bias),
        BN_KINDS[kind](epsilon=0.01),
    )
    randomize_batch_norms(model, rng)
    conv, bn = model.layers
    if use_bias:
        conv.bias.assign(rng.normal(size=3))
    gamma, beta, mean, var = bn.get_weights()
    kernel = conv.get_weights()[0].astype("f8")
    bias = conv.get_weights()[1] if use_bias else np.zeros(3)
    scale = gamma / np.sqrt(var.astype("f8") + 0.01)

    (folded_conv,) = kerasbn.fold_batch_norms(model).layers
    new_kernel, new_bias = folded_conv.get_weights()
    np.testing.assert_allclose(new_kernel, kernel * scale, rtol=1e-6)
    np.testing.assert_allclose(
        new_bias, (bias - mean) * scale + beta, rtol=1e-6, atol=1e-6
    )


L = keras.layers
FOLDABLE = {  # input shape, producer, BN arguments
    "conv1d": ((9, 3), lambda: L.Conv1D(4, 3), {}),
    "conv2d": ((6, 6, 3), lambda: L.Conv2D(4, 3, strides=2, padding="same"), {}),
    "conv3d": ((4, 4, 4, 2), lambda: L.Conv3D(3, 2, use_bias=False), {}),
    "grouped_conv2d": ((6, 6, 4), lambda: L.Conv2D(6, 3, groups=2), {}),
    "depthwise2d": ((6, 6, 3), lambda: L.DepthwiseConv2D(3, depth_multiplier=2), {}),
    "depthwise1d": ((8, 3), lambda: L.DepthwiseConv1D(3, use_bias=False), {}),
    "dense": ((5,), lambda: L.Dense(4), {}),
    "dense_rank3": ((3, 5), lambda: L.Dense(4), {"axis": 2}),
    "channels_first": (
        (3, 6, 6),
        lambda: L.Conv2D(4, 3, data_format="channels_first"),
        {"axis": 1},
    ),
    "list_axis": ((6, 3), lambda: L.Conv1D(4, 3), {"axis": [-1]}),
}


@functools.cache
def channels_first_conv_fails() -> str:
    """Why this backend cannot run a channels_first Conv2D on this CPU, or "".

    TensorFlow's CPU convolution without oneDNN (its default on a CPU without
    AVX-512, or with TF_ENABLE_ONEDNN_OPTS=0) supports only NHWC.
    """
    model = chain((2, 3, 3), L.Conv2D(1, 1, data_format="channels_first"))
    try:
        model.predict(np.zeros((1, 2, 3, 3), "float32"), verbose=0)
    except Exception as error:  # the backend's own error type
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        told = [line for line in lines if "NHWC" in line or "support" in line]
        return f"{type(error).__name__}: {(told or lines or [''])[-1][:200]}"
    return ""


@pytest.mark.parametrize("kind", BN_KINDS)
@pytest.mark.parametrize("case", FOLDABLE)
def test_each_foldable_layer_absorbs_the_bn(rng, case, kind):
    shape, make_producer, bn_kwargs = FOLDABLE[case]
    if case == "channels_first" and channels_first_conv_fails():
        pytest.skip(f"no channels_first Conv2D here: {channels_first_conv_fails()}")
    if kind == "keras" and isinstance(bn_kwargs.get("axis"), list):
        pytest.skip("keras.layers.BatchNormalization takes one int axis")
    producer = make_producer()
    model = randomize_batch_norms(
        chain(shape, producer, BN_KINDS[kind](**bn_kwargs)), rng
    )
    folded = kerasbn.fold_batch_norms(model)
    assert [type(layer) for layer in folded.layers] == [type(producer)]
    assert_predicts_like(folded, model, rng.normal(size=(4, *shape)), case)


def functional(build):
    inputs = keras.Input((6, 6, 3))
    return keras.Model(inputs, build(inputs))


UNFOLDABLE = {
    "after_activation_layer": lambda x: kerasbn.BatchNorm()(
        keras.layers.ReLU()(keras.layers.Conv2D(4, 3)(x))
    ),
    "conv_with_activation": lambda x: kerasbn.BatchNorm()(
        keras.layers.Conv2D(4, 3, activation="relu")(x)
    ),
    "on_model_input": lambda x: keras.layers.BatchNormalization()(x),
    "after_pooling": lambda x: kerasbn.BatchNorm()(keras.layers.MaxPooling2D()(x)),
    "not_the_channel_axis": lambda x: kerasbn.BatchNorm(axis=1)(
        keras.layers.Conv2D(4, 3)(x)
    ),
    "two_axes": lambda x: kerasbn.BatchNorm(axis=[2, 3])(keras.layers.Conv2D(4, 3)(x)),
}


@pytest.mark.parametrize("case", UNFOLDABLE)
def test_unfoldable_bn_becomes_one_channel_affine(rng, case):
    model = randomize_batch_norms(functional(UNFOLDABLE[case]), rng)
    folded = kerasbn.fold_batch_norms(model)
    assert count(folded, BATCH_NORMS) == 0
    assert count(folded, ChannelAffine) == 1
    assert_predicts_like(folded, model, rng.normal(size=(4, 6, 6, 3)), case)


def test_conv_output_used_twice_keeps_its_bn_as_an_affine(rng):
    def build(x):
        conv = keras.layers.Conv2D(4, 3)(x)
        return [keras.layers.Add()([kerasbn.BatchNorm()(conv), conv]), conv]

    model = randomize_batch_norms(functional(build), rng)
    folded = kerasbn.fold_batch_norms(model)
    assert count(folded, ChannelAffine) == 1
    assert_predicts_like(folded, model, rng.normal(size=(4, 6, 6, 3)), "shared output")


def test_shared_conv_called_twice_is_not_folded(rng):
    conv = keras.layers.Conv2D(3, 1)
    inputs = [keras.Input((4, 4, 3)), keras.Input((4, 4, 3))]
    outputs = [kerasbn.BatchNorm()(conv(inputs[0])), conv(inputs[1])]
    model = randomize_batch_norms(keras.Model(inputs, outputs), rng)
    folded = kerasbn.fold_batch_norms(model)
    assert count(folded, ChannelAffine) == 1
    x = [rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))]
    assert_predicts_like(folded, model, x, "shared conv")


def test_nested_sequential_and_functional_models_are_folded(rng):
    inner_seq = chain(
        (4, 4, 4), keras.layers.Conv2D(5, 1, use_bias=False), kerasbn.BatchNorm()
    )
    inner_in = keras.Input((4, 4, 5))
    dense = keras.layers.Dense(2)(keras.layers.Flatten()(inner_in))
    inner_fn = keras.Model(inner_in, keras.layers.BatchNormalization()(dense))
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inputs))
    model = randomize_batch_norms(keras.Model(inputs, inner_fn(inner_seq(x))), rng)

    folded = kerasbn.fold_batch_norms(model)
    assert count(folded, (*BATCH_NORMS, ChannelAffine)) == 0
    assert isinstance(folded.layers[2], keras.Sequential)
    assert_predicts_like(folded, model, rng.normal(size=(4, 6, 6, 3)), "nested")


def test_renorm_bn_folds_with_its_moving_statistics(rng):
    model = chain((6,), keras.layers.Dense(3), kerasbn.BatchNorm(renorm=True))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(rng.normal(2.0, 3.0, (32, 6)), rng.normal(size=(32, 3)), verbose=0)
    folded = kerasbn.fold_batch_norms(model)
    assert len(folded.layers) == 1
    assert_predicts_like(folded, model, rng.normal(2.0, 3.0, (8, 6)), "renorm")


def test_input_model_is_untouched(rng, lecture_cnn):
    layers = list(lecture_cnn.layers)
    weights = lecture_cnn.get_weights()
    folded = kerasbn.fold_batch_norms(lecture_cnn)
    assert lecture_cnn.layers == layers
    assert not {id(v) for v in folded.weights} & {id(v) for v in lecture_cnn.weights}
    for before, after in zip(weights, lecture_cnn.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_channel_affine_matches_numpy_for_list_axes(rng):
    layer = ChannelAffine(axis=[1, 3])
    layer.build((None, 2, 3, 4))
    scale, offset = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    layer.set_weights([scale, offset])
    x = rng.normal(size=(5, 2, 3, 4)).astype("float32")
    expected = x * scale[:, None, :] + offset[:, None, :]
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-6, atol=1e-6)


def test_folded_model_round_trips_through_a_keras_file(tmp_path, rng):
    model = randomize_batch_norms(functional(UNFOLDABLE["after_activation_layer"]), rng)
    folded = kerasbn.fold_batch_norms(model)
    folded.save(tmp_path / "folded.keras")
    loaded = keras.models.load_model(tmp_path / "folded.keras")
    x = rng.normal(size=(2, 6, 6, 3))
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), folded.predict(x, verbose=0)
    )


def test_a_layer_that_is_not_a_model_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="fold_batch_norms.*needs a keras.Model"):
        kerasbn.fold_batch_norms(keras.layers.Dense(3))


def graph_op_types(path):
    import tensorflow as tf

    graph = tf.saved_model.load(path).signatures["serving_default"].graph.as_graph_def()
    library = [node for f in graph.library.function for node in f.node_def]
    return {node.op for node in [*graph.node, *library]}


@tensorflow_only("the check reads the op types of a TensorFlow SavedModel graph")
def test_export_and_tflite_of_folded_model_have_no_batch_norm_ops(tmp_path, rng):
    import tensorflow as tf

    def build(x):  # one BN folds into the conv, one after the ReLU stays an affine
        x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(x))
        return keras.layers.BatchNormalization()(keras.layers.ReLU()(x))

    model = randomize_batch_norms(functional(build), rng)
    folded = kerasbn.fold_batch_norms(model)
    model.export(str(tmp_path / "original"), verbose=False)
    folded.export(str(tmp_path / "folded"), verbose=False)
    # BN in inference computes rsqrt(var + eps): the original graph has it.
    assert "Rsqrt" in graph_op_types(str(tmp_path / "original"))
    ops = graph_op_types(str(tmp_path / "folded"))
    assert not [op for op in ops if "BatchNorm" in op or op == "Rsqrt"], ops

    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "folded"))
    tflite = converter.convert()
    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        tf.lite.experimental.Analyzer.analyze(model_content=tflite)
    tflite_ops = [
        line.split()[1] for line in listing.getvalue().splitlines() if "Op#" in line
    ]
    assert "CONV_2D" in tflite_ops[0]
    assert not [op for op in tflite_ops if "BATCH" in op or "RSQRT" in op], tflite_ops

    x = rng.normal(size=(3, 6, 6, 3)).astype("float32")
    out = run_tflite(tflite, x)
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(
        out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
    )
    record("fold: TFLite of folded vs original predict", out, expected)


def test_bench_fold_script_runs_and_its_variants_agree(tmp_path):
    pytest.importorskip("tensorflow", reason="benchmarks/bench_fold.py imports it")
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))  # the script imports its harness
    spec = importlib.util.spec_from_file_location(
        "bench_fold", benchmarks / "bench_fold.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench_fold.json"
    bench.main(["--rounds", "1", "--calls", "1", "--batch", "4", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [r["model"] for r in report["results"]] == ["lecture_cnn", "resnet_stack"]
    for result in report["results"]:
        assert result["max_relative_difference"] <= 1e-5
        assert result["params"]["folded"] < result["params"]["keras_bn"]
        assert set(result["speedup_latency"]) == {"kerasbn_bn", "keras_bn"}


def test_bn_called_with_training_true_in_the_graph_is_refused():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4)(inputs)
    outputs = kerasbn.BatchNorm(name="always_batch_stats")(hidden, training=True)
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match=r"always_batch_stats.*training=True"):
        kerasbn.fold_batch_norms(model)


@pytest.mark.parametrize("kind", BN_KINDS)
def test_fold_handles_op_nodes_shared_layers_nested_models_and_keyword_calls(rng, kind):
    model = every_node_model(BN_KINDS[kind])
    randomize_graph_batch_norms(model, rng)
    folded = kerasbn.fold_batch_norms(model)
    assert count(folded, BATCH_NORMS) == 0
    # Absorbed: the BN after a layer it alone consumes, nested ones included.
    # Kept as affines: after the shared convolution (both calls, one of them
    # with `inputs=`) and after a convolution whose output an op node reads.
    affines = {
        layer.name for layer in leaf_layers(folded) if type(layer) is ChannelAffine
    }
    assert affines == {"bn_shared_a", "bn_shared_b", "bn_f"}
    # Six BN layers of 4 weights go; three affines of 2 come; the conv stays shared.
    assert len(folded.weights) == len(model.weights) - 4 * 6 + 2 * 3
    x = graph_inputs(rng)
    expected = flat_numpy(model(x, training=False))
    for a, e in zip(flat_numpy(folded(x, training=False)), expected, strict=True):
        relative = np.max(np.abs(a - e)) / np.max(np.abs(e))
        record(f"fold: every-node graph, {kind} (relative)", relative, 0.0)
        assert relative <= 1e-5, relative


def test_bn_called_with_the_inputs_keyword_is_folded_into_its_producer(rng):
    inputs = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(4, 3, name="conv")
    outputs = keras.layers.BatchNormalization(name="bn")(inputs=conv(inputs))
    model = keras.Model(inputs, keras.ops.relu(outputs))
    randomize_graph_batch_norms(model, rng)
    folded = kerasbn.fold_batch_norms(model)
    assert [type(layer).__name__ for layer in leaf_layers(folded)] == [
        "InputLayer",
        "Conv2D",
    ]
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    expected = flat_numpy(model(x))[0]
    relative = np.max(np.abs(flat_numpy(folded(x))[0] - expected)) / np.max(
        np.abs(expected)
    )
    record("fold: BN called with inputs= (relative)", relative, 0.0)
    assert relative <= 1e-5, relative


def test_bn_with_batch_statistics_mode_is_refused_naming_its_path(rng):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            kerasbn.BatchNorm(statistics="batch"),
        ]
    )
    with pytest.raises(
        ValueError, match=r"\['sequential_?\d*/batch_norm_?\d*'\].*statistics='batch'"
    ):
        kerasbn.fold_batch_norms(model)


def test_bn_in_moving_mode_folds_like_any_other(rng):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            kerasbn.BatchNorm(
                statistics="moving", moving_mean_initializer="random_normal"
            ),
        ]
    )
    x = rng.normal(size=(8, 4)).astype("float32")
    folded = kerasbn.fold_batch_norms(model)
    np.testing.assert_allclose(
        folded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
