"""Export and compile with a variable batch: every route that Keras's BN takes.

One small model (a conv whose 8x8x10 output a BN normalizes, then a Dense and
a BN), trained for one step, is exported three ways, each with the batch size
left variable: with ``kerasbn.BatchNorm``, with ``kerasbn.fold_batch_norms``
of it, and with ``keras.layers.BatchNormalization`` holding the same weights
(the peer: every route tested here works with Keras's own BN). Each artifact
runs in its own runtime at two batch sizes and must give ``predict``'s
numbers to float32 rounding. The largest differences are recorded (the
closing summary prints them as ``export <route> <variant>``).

Routes per backend (those whose runtimes install as ordinary CPU wheels):

* TensorFlow: ``model.export`` to ``tf_saved_model`` (``tf.saved_model.load``)
  and ``onnx`` (tf2onnx, onnxruntime); ``tf.function(jit_compile=True)``.
* JAX: ``model.export`` to ``tf_saved_model`` (jax2tf) and ``onnx``
  (jax2onnx, onnxruntime); ``jax.export`` with a symbolic batch.
* PyTorch: ``model.export`` to ``onnx`` (onnxruntime) and ``torch``
  (``dynamic_shapes``, ``torch.export.load``); ``torch.export.export`` with a
  dynamic batch; ``torch.jit.trace``.

LiteRT and OpenVINO, whose runtimes are large, carry the ``export_runtimes``
marker: ``python -m pytest -m export_runtimes tests/test_export.py`` runs
them where ``ai-edge-litert`` and ``openvino`` are installed (each is skipped
with its reason where its runtime is missing).
"""

import importlib.util

import keras
import numpy as np
import pytest
from conftest import BACKEND, record

import kerasbn

BATCHES = (3, 7)  # neither is the batch of any sample input the exporters use
INPUT_SHAPE = (10, 10, 3)
VARIANTS = ("kerasbn", "folded", "keras")


def _model(bn):
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE),
            keras.layers.Conv2D(10, 3),
            bn(),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(12),
            bn(),
        ]
    )


@pytest.fixture(scope="module")
def models():
    """name -> model: kerasbn trained one step, its folded copy, Keras's BN."""
    rng = np.random.default_rng(15)
    ours = _model(lambda: kerasbn.BatchNorm(momentum=0.0))
    ours.compile(optimizer="sgd", loss="mse")
    x = rng.normal(2.0, 3.0, (16, *INPUT_SHAPE)).astype("float32")
    ours.fit(x, rng.normal(size=(16, 12)), batch_size=16, epochs=1, verbose=0)
    peer = _model(lambda: keras.layers.BatchNormalization(momentum=0.0))
    peer.set_weights(ours.get_weights())
    variants = {
        "kerasbn": ours,
        "folded": kerasbn.fold_batch_norms(ours),
        "keras": peer,
    }
    # Keras exports only models that were called. The folded copy is not
    # called here: a fold of a model that was called exports as it is.
    peer.predict(x[:2], verbose=0)
    return variants


def _inputs():
    rng = np.random.default_rng(0)
    return [rng.normal(2.0, 3.0, (b, *INPUT_SHAPE)).astype("float32") for b in BATCHES]


def _check_route(route, variant, model, run):
    """``run(x)`` equals ``model.predict(x)`` at every batch size of BATCHES."""
    for x in _inputs():
        out = np.asarray(run(x))
        expected = model.predict(x, verbose=0)
        assert out.shape == expected.shape
        scale = max(1.0, float(np.max(np.abs(expected))))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * scale)
        record(f"export {route} {variant}", out, expected)


def _needs(module: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"needs {module}"
    )


def _only(*backends, reason=None):
    return pytest.mark.skipif(
        BACKEND not in backends,
        reason=reason or f"Keras 3 exports this format on {', '.join(backends)} only",
    )


# -------------------------------------------------------------------- runners
def _onnx_runner(path):
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _saved_model_runner(path):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    return lambda x: loaded.serve(tf.constant(x)).numpy()


def _torch_module_runner(module):
    import torch

    def run(x):
        with torch.no_grad():
            return module(torch.as_tensor(x)).detach().cpu().numpy()

    return run


def _torch_sample():
    import torch

    return (torch.as_tensor(_inputs()[0][:2]),)


def export_tf_saved_model(model, tmp_path):
    path = tmp_path / "saved_model"
    model.export(str(path), format="tf_saved_model", verbose=False)
    return _saved_model_runner(path)


def export_onnx(model, tmp_path):
    path = tmp_path / "model.onnx"
    model.export(str(path), format="onnx", verbose=False)
    return _onnx_runner(path)


def export_torch_format(model, tmp_path):
    import torch

    path = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    model.export(str(path), format="torch", dynamic_shapes={0: batch}, verbose=False)
    return _torch_module_runner(torch.export.load(str(path)).module())


def torch_export_dynamic(model, tmp_path):
    import torch

    batch = torch.export.Dim("batch", min=1, max=1024)
    # A Keras model's forward takes ``*args``: one spec for the args tuple.
    program = torch.export.export(
        model.eval(), _torch_sample(), dynamic_shapes=[({0: batch},)], strict=False
    )
    return _torch_module_runner(program.module())


def torch_jit_trace(model, tmp_path):
    import torch

    model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, _torch_sample())
    return _torch_module_runner(traced)


def jax_export_symbolic(model, tmp_path):
    import jax
    from jax import export

    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def infer(x):
        y, _ = model.stateless_call(trainable, frozen, x, training=False)
        return y

    (batch,) = export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, *INPUT_SHAPE), "float32")
    exported = export.export(jax.jit(infer))(spec)
    restored = export.deserialize(exported.serialize())
    return lambda x: np.asarray(restored.call(x))


def tf_function_xla(model, tmp_path):
    import tensorflow as tf

    signature = [tf.TensorSpec((None, *INPUT_SHAPE), tf.float32)]
    function = tf.function(
        lambda x: model(x, training=False),
        input_signature=signature,
        jit_compile=True,
    )
    return lambda x: function(tf.constant(x)).numpy()


def export_litert(model, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    path = tmp_path / "model.tflite"
    model.export(str(path), format="litert", verbose=False)
    interpreter = Interpreter(model_path=str(path))

    def run(x):
        index = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(index, x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    return run


def export_openvino(model, tmp_path):
    import openvino

    path = tmp_path / "model.xml"
    model.export(str(path), format="openvino", verbose=False)
    # Full float32: OpenVINO's CPU plugin infers in bfloat16 where the CPU has it.
    compiled = openvino.Core().compile_model(
        str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    return lambda x: compiled(x)[compiled.output(0)]


ROUTES = [
    pytest.param(
        export_tf_saved_model,
        id="tf_saved_model",
        marks=[_only("tensorflow", "jax"), _needs("tensorflow")],
    ),
    pytest.param(export_onnx, id="onnx", marks=_needs("onnxruntime")),
    pytest.param(tf_function_xla, id="tf_function_xla", marks=_only("tensorflow")),
    pytest.param(jax_export_symbolic, id="jax_export", marks=_only("jax")),
    pytest.param(export_torch_format, id="torch_format", marks=_only("torch")),
    pytest.param(torch_export_dynamic, id="torch_export", marks=_only("torch")),
    pytest.param(torch_jit_trace, id="torch_jit_trace", marks=_only("torch")),
    pytest.param(
        export_litert,
        id="litert",
        marks=[
            pytest.mark.export_runtimes,
            _only("tensorflow"),
            _needs("ai_edge_litert"),
        ],
    ),
    pytest.param(
        export_openvino,
        id="openvino",
        marks=[
            pytest.mark.export_runtimes,
            _needs("openvino"),
            _only(
                "tensorflow",
                "torch",
                reason="on JAX, Keras 3.15's openvino export keeps an XlaCallModule "
                "op that OpenVINO cannot convert, with Keras's own BN too",
            ),
        ],
    ),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("route", ROUTES)
def test_route_with_a_variable_batch_gives_predicts_numbers(
    route, variant, models, tmp_path
):
    model = models[variant]
    _check_route(route.__name__, variant, model, route(model, tmp_path))
