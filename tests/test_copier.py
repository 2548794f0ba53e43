"""The copier and the model copies: ``copy.deepcopy``'s results, no global state.

``copy.deepcopy`` is the reference for plain Python objects. For models, a
copy must change nothing outside itself while it is made (no class patched,
no ``copy`` module table, no recursion limit or thread stack size), also when
it fails, and must leave the original as it was.
"""

import copy
import sys
import threading

import keras
import numpy as np
import pytest
from conftest import to_numpy

import kerasbn
from kerasbn._copier import Copier, CopyError

L = keras.layers


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a, b):
        self.a, self.b = a, b


class WithState:
    def __init__(self, value):
        self.value = value

    def __getstate__(self):
        return {"value": self.value, "seen": True}

    def __setstate__(self, state):
        self.__dict__.update(state)


class Node:
    def __init__(self, nxt=None):
        self.next = nxt


def structure():
    shared = [1, 2]
    data = {
        "shared": (shared, shared),
        "set": {1, 2, 3},
        "frozen": frozenset({4}),
        "slots": Slotted([3], "x"),
        "state": WithState([5]),
        "array": np.arange(4.0),
        "tuple": (1, "a", None),
        "nested": [[{"k": (shared,)}]],
    }
    data["self"] = data
    return data


def test_copier_copies_as_copy_deepcopy_does():
    original = structure()
    mine, theirs = Copier().copy(original), copy.deepcopy(original)
    assert mine["self"] is mine and mine is not original
    assert mine["shared"][0] is mine["shared"][1] is mine["nested"][0][0]["k"][0]
    assert mine["shared"][0] is not original["shared"][0]
    assert mine["tuple"] is original["tuple"]  # immutable and atomic: kept
    for key in ("set", "frozen", "tuple"):
        assert mine[key] == theirs[key]
    assert (mine["slots"].a, mine["slots"].b) == (theirs["slots"].a, theirs["slots"].b)
    assert vars(mine["state"]) == vars(theirs["state"]) == {"value": [5], "seen": True}
    np.testing.assert_array_equal(mine["array"], theirs["array"])
    assert mine["array"] is not original["array"]


def test_copier_needs_no_recursion_for_a_deep_chain():
    head = None
    for _ in range(50_000):  # copy.deepcopy would exceed the recursion limit
        head = Node(head)
    limit = sys.getrecursionlimit()
    copied = Copier().copy(head)
    assert sys.getrecursionlimit() == limit
    length = 0
    while copied is not None:
        copied, length = copied.next, length + 1
    assert length == 50_000


def test_copier_error_names_the_path_of_the_object_that_failed():
    original = {"layers": [1, {"stream": (i for i in range(3))}]}
    with pytest.raises(CopyError, match=r"\['layers'\]\[1\]\['stream'\].*generator"):
        Copier().copy(original, "root")


def global_state():
    """What a copy must not change: the copy module's table, the classes
    that Keras copies, the recursion limit and the thread stack size."""
    classes = (keras.layers.Layer, keras.Model, keras.Variable, keras.optimizers.Adam)
    return (
        dict(copy._deepcopy_dispatch),
        # (``__slotnames__`` is the reduce protocol's own cache of a class's
        # slots, which pickle and copy.deepcopy write too.)
        [sorted(set(vars(cls)) - {"__slotnames__"}) for cls in classes],
        sys.getrecursionlimit(),
        threading.stack_size(),
    )


class Spy:
    """Records the global state while a model copy is being made."""

    seen: list = []

    def __deepcopy__(self, memo):
        Spy.seen.append(global_state())
        return Spy()


@keras.saving.register_keras_serializable(package="kerasbn_copier_tests")
class Holding(L.Layer):
    """A layer holding an arbitrary Python object."""

    def __init__(self, held=None, **kwargs):
        super().__init__(**kwargs)
        self.held = held

    def call(self, x):
        return x


def model_holding(held):
    inputs = keras.Input((4,), name="x")
    x = L.BatchNormalization(name="bn")(L.Dense(3, name="dense")(inputs))
    x = Holding(held, name="holder")(x)
    model = keras.Model(inputs, x, name="holding")
    model.compile("adam", "mse")
    return model


TOOLS = {
    "from_keras": kerasbn.from_keras,
    "to_keras": lambda m: kerasbn.to_keras(kerasbn.from_keras(m, in_place=True)),
    "fold_batch_norms": kerasbn.fold_batch_norms,
}


@pytest.mark.parametrize("tool", TOOLS)
def test_a_copy_changes_no_global_state_while_it_is_made(rng, tool):
    model = model_holding(Spy())
    before = global_state()
    Spy.seen.clear()
    TOOLS[tool](model)
    assert Spy.seen and all(seen == before for seen in Spy.seen)
    assert global_state() == before


@pytest.mark.parametrize("tool", TOOLS)
def test_a_failed_copy_leaves_the_original_and_global_state_as_they_were(rng, tool):
    """A layer holds a generator, which cannot be copied: the tool raises,
    naming the tool, the object's path and the way out, and nothing changed."""
    model = model_holding(i for i in range(3))
    x = rng.normal(size=(8, 4)).astype("float32")
    model.fit(x, rng.normal(size=(8, 3)), verbose=0)
    train_function = model.train_function
    weights = [w.copy() for w in model.get_weights()]
    kinds = [type(layer) for layer in model.layers]
    before = global_state()
    with pytest.raises(ValueError) as raised:
        TOOLS[tool](model)
    message = str(raised.value)
    assert "works on a copy of the model" in message
    assert "layer 'holder'" in message and ".held" in message
    assert "generator" in message and "in_place=True" in message
    assert global_state() == before
    if tool != "to_keras":  # (to_keras's test converts in place first)
        assert [type(layer) for layer in model.layers] == kinds
        assert model.train_function is train_function
    for w, b in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(w, b)
    model.get_layer("holder").held = None  # the same model copies once it can
    copied = kerasbn.from_keras(model)
    np.testing.assert_allclose(
        copied.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def test_a_copy_is_made_from_a_thread_with_the_default_stack(rng):
    """A deep graph (300 layers) copies in a thread of its own, with
    Python's default stack and recursion limit."""
    inputs = keras.Input((3,))
    x = inputs
    for i in range(100):
        x = L.ReLU(name=f"relu_{i}")(L.BatchNormalization(name=f"bn_{i}")(x))
        x = L.Dense(3, name=f"dense_{i}")(x)
    model = keras.Model(inputs, x)
    result = []
    worker = threading.Thread(target=lambda: result.append(kerasbn.from_keras(model)))
    worker.start()
    worker.join()
    assert result, "the copy failed in its thread"
    x = rng.normal(size=(2, 3)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(result[0](x)), to_numpy(model(x)), rtol=1e-5, atol=1e-5
    )
