"""Keras's internals in one room: ``kerasbn/_keras_internals.py``.

No other module of kerasbn imports ``keras.src`` or reads a private attribute
of a Keras object (ruff's TID251 and SLF001 check attribute syntax; the scan
here also catches names given as strings to ``getattr`` and its kind). A
Keras without an internal that a tool relies on gets a clear error at the
tool's entry, and the model is left as it was.
"""

import ast
from pathlib import Path

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn import _graph
from kerasbn._keras_internals import KerasInternalsError

PACKAGE = Path(kerasbn.__file__).parent
ROOM = PACKAGE / "_keras_internals.py"
BY_NAME = {"getattr", "hasattr", "setattr", "delattr", "__setattr__", "__delattr__"}


def private_names_given_as_strings(path: Path) -> list[str]:
    """``file:line name`` for each private name (``_x``, not a dunder) given
    as a string to getattr/hasattr/setattr/delattr or object.__setattr__."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        name = getattr(function, "id", None) or getattr(function, "attr", None)
        if name not in BY_NAME:
            continue
        for argument in node.args[:2]:
            if (
                isinstance(argument, ast.Constant)
                and isinstance(argument.value, str)
                and argument.value.startswith("_")
                and not argument.value.startswith("__")
            ):
                found.append(f"{path.name}:{node.lineno} {argument.value}")
    return found


def test_no_module_but_the_internals_room_names_a_private_attribute():
    modules = [p for p in PACKAGE.rglob("*.py") if p != ROOM]
    assert len(modules) > 10
    found = [hit for path in modules for hit in private_names_given_as_strings(path)]
    assert found == []
    imports = [
        f"{path.name}: {line.strip()}"
        for path in modules
        for line in path.read_text().splitlines()
        if "keras.src" in line and ("import" in line or "keras.src." in line)
    ]
    assert imports == []


def test_the_scan_finds_a_private_name_given_as_a_string(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("getattr(layer, '_layers')\nobject.__setattr__(g, '_nodes', 1)\n")
    assert private_names_given_as_strings(probe) == [
        "probe.py:1 _layers",
        "probe.py:2 _nodes",
    ]


def model():
    inputs = keras.Input((4,), name="x")
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(3)(inputs))
    built = keras.Model(inputs, x, name="net")
    built.compile("sgd", "mse")
    return built


def snapshot(built):
    return [type(layer) for _, layer in _graph.walk(built)], [
        w.copy() for w in built.get_weights()
    ]


TOOLS = {
    "from_keras": lambda m: kerasbn.from_keras(m),
    "from_keras in place": lambda m: kerasbn.from_keras(m, in_place=True),
    "fold_batch_norms": lambda m: kerasbn.fold_batch_norms(m),
    "freeze_batch_norms": lambda m: kerasbn.freeze_batch_norms(m, train_affine=True),
}


@pytest.mark.parametrize("tool", TOOLS)
def test_a_missing_layer_internal_is_named_at_the_tools_entry(monkeypatch, tool):
    built = model()
    kinds, weights = snapshot(built)
    monkeypatch.delattr(keras.layers.Layer, "_untrack_variable")
    with pytest.raises(KerasInternalsError) as raised:
        TOOLS[tool](built)
    message = str(raised.value)
    assert "`Layer._untrack_variable`" in message
    assert f"Keras {keras.__version__}" in message and "Nothing was changed" in message
    after_kinds, after_weights = snapshot(built)
    assert after_kinds == kinds
    for a, b in zip(after_weights, weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_missing_compile_record_is_named_before_a_copy():
    built = model()
    record = built._compile_config
    del built._compile_config
    try:
        with pytest.raises(KerasInternalsError, match="`Trainer._compile_config`"):
            kerasbn.from_keras(built)
    finally:
        built._compile_config = record
    assert type(built.get_layer("bn")) is keras.layers.BatchNormalization


def test_a_missing_graph_internal_is_named_for_fold(monkeypatch):
    built = model()
    for layer in built.layers:
        monkeypatch.delattr(layer, "_outbound_nodes")
    with pytest.raises(KerasInternalsError, match="`Operation._inbound_nodes`"):
        kerasbn.fold_batch_norms(built)
