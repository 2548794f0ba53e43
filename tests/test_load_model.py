"""A converted model's ``.keras`` file, loaded as its original's was.

Keras's saving files a layer held in a list, dict or ``Sequential`` under its
class name, and on loading the model's own code creates the BN layers again
(``keras.layers.BatchNormalization``, however it names that class). A file
of a model that ``from_keras`` converted must load with plain
``keras.models.load_model`` wherever the original's did, with the saved
statistics, and ``kerasbn.load_model`` must give kerasbn layers with the same
statistics. The reference is the converted model itself: its weights and
outputs before saving.
"""

import json
import os
import subprocess
import sys
import textwrap
import threading

import keras
import numpy as np
import pytest
from conftest import to_numpy
from keras.layers import BatchNormalization  # as keras-io's involution example

import kerasbn
from kerasbn import _graph

L = keras.layers
KERAS_BN = L.BatchNormalization


@keras.saving.register_keras_serializable(package="kerasbn_load_tests")
class DictHolder(L.Layer):
    """BN layers held in a dict by a custom layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(4)
        self.norms = {"first": KERAS_BN(), "second": KERAS_BN(momentum=0.5)}

    def call(self, x, training=None):
        h = self.norms["first"](self.dense(x), training=training)
        return self.norms["second"](keras.ops.relu(h), training=training)


@keras.saving.register_keras_serializable(package="kerasbn_load_tests")
class SequentialInBuild(L.Layer):
    """A keras.Sequential with BN, built in ``build()`` by a custom layer."""

    def build(self, input_shape):
        self.block = keras.Sequential(
            [L.Dense(4), KERAS_BN(), L.ReLU(), L.Dense(4), KERAS_BN()]
        )
        self.block.build(input_shape)

    def call(self, x, training=None):
        return self.block(x, training=training)


@keras.saving.register_keras_serializable(package="kerasbn_load_tests")
class Involution(L.Layer):
    """keras-io's involution layer, shrunk: its kernel generator is a
    Sequential built in ``build()`` with ``BatchNormalization`` imported at
    module level (``from keras.layers import BatchNormalization``)."""

    def __init__(self, channel=4, **kwargs):
        super().__init__(**kwargs)
        self.channel = channel

    def build(self, input_shape):
        self.kernel_gen = keras.Sequential(
            [
                L.Conv2D(self.channel, 1),
                BatchNormalization(),
                L.ReLU(),
                L.Conv2D(self.channel, 1),
            ]
        )
        self.kernel_gen.build(input_shape)

    def call(self, x, training=None):
        return x * self.kernel_gen(x, training=training)

    def get_config(self):
        return {**super().get_config(), "channel": self.channel}


def dict_holder_model():
    inputs = keras.Input((5,))
    return keras.Model(inputs, DictHolder(name="holder")(inputs), name="dict_model")


def sequential_in_build_model():
    inputs = keras.Input((5,))
    return keras.Model(inputs, SequentialInBuild(name="seq_in_build")(inputs))


def involution_model():
    inputs = keras.Input((6, 6, 4))
    x = Involution(name="involution")(inputs)
    x = L.BatchNormalization(name="graph_bn")(x)
    return keras.Model(inputs, L.GlobalAveragePooling2D()(x), name="involution_net")


CASES = {
    "BN in a dict of a custom layer": (dict_holder_model, (5,)),
    "BN in a Sequential built in build()": (sequential_in_build_model, (5,)),
    "involution (module-level BatchNormalization import)": (
        involution_model,
        (6, 6, 4),
    ),
}


def trained_statistics(model, rng):
    """Gives every BN of ``model`` distinct statistics; returns them by path."""
    for _, bn in _graph.batch_norms(model):
        bn.moving_mean.assign(rng.normal(size=bn.moving_mean.shape))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, bn.moving_variance.shape))
    return statistics(model)


def statistics(model):
    """``{path: (moving_mean, moving_variance)}`` of every BN, in tree order."""
    return [
        (to_numpy(bn.moving_mean), to_numpy(bn.moving_variance))
        for _, bn in _graph.batch_norms(model)
    ]


def assert_same_statistics(loaded, expected):
    found = statistics(loaded)
    assert len(found) == len(expected)
    for (mean, var), (mean_ref, var_ref) in zip(found, expected):
        np.testing.assert_array_equal(mean, mean_ref)
        np.testing.assert_array_equal(var, var_ref)


@pytest.fixture(params=list(CASES))
def saved(request, rng, tmp_path):
    """``(path, statistics, x, outputs)`` of a converted model's file."""
    build, shape = CASES[request.param]
    model = build()
    x = rng.normal(size=(4, *shape)).astype("float32")
    model(x)
    trained_statistics(model, rng)
    converted = kerasbn.from_keras(model)
    path = tmp_path / "converted.keras"
    converted.save(path)
    return path, statistics(converted), x, to_numpy(converted(x, training=False))


def test_plain_keras_loads_a_converted_file_as_the_models_code_builds_it(saved):
    path, expected, x, outputs = saved
    loaded = keras.models.load_model(path)
    assert_same_statistics(loaded, expected)
    kinds = {type(bn) for _, bn in _graph.batch_norms(loaded)}
    assert KERAS_BN in kinds  # the model's own code made these
    np.testing.assert_allclose(
        to_numpy(loaded(x, training=False)), outputs, rtol=1e-5, atol=1e-5
    )


def test_kerasbn_load_model_gives_kerasbn_layers_with_the_saved_statistics(saved):
    path, expected, x, outputs = saved
    loaded = kerasbn.load_model(path)
    assert_same_statistics(loaded, expected)
    assert all(
        isinstance(bn, kerasbn.BatchNorm) for _, bn in _graph.batch_norms(loaded)
    )
    np.testing.assert_allclose(
        to_numpy(loaded(x, training=False)), outputs, rtol=1e-5, atol=1e-5
    )


def test_file_written_by_kerasbn_0_1_0_still_loads(rng, tmp_path):
    """kerasbn 0.1.0 turned Keras BN layers into ``BatchNorm``, which Keras
    files under ``batch_norm``: the model's code then finds no statistics.
    The same transplant is made here to write such a file."""
    model = sequential_in_build_model()
    x = rng.normal(size=(4, 5)).astype("float32")
    model(x)
    expected = trained_statistics(model, rng)
    for _, bn in _graph.batch_norms(model):
        old = kerasbn.BatchNorm.from_config(bn.get_config())
        _graph.transplant(bn, _graph.build_like(old, bn), keep_variables=True)
    model.save(tmp_path / "old.keras")
    with pytest.raises(ValueError, match="could not be loaded"):
        keras.models.load_model(tmp_path / "old.keras")
    loaded = kerasbn.load_model(tmp_path / "old.keras")
    assert_same_statistics(loaded, expected)
    assert all(
        isinstance(bn, kerasbn.BatchNorm) for _, bn in _graph.batch_norms(loaded)
    )


def test_graph_node_bn_loads_in_a_fresh_process_with_plain_keras(rng, tmp_path):
    """A BN that is a graph node is saved as kerasbn's class: a fresh process
    that imports kerasbn (as it would any package whose layers a file holds)
    loads it with plain Keras."""
    inputs = keras.Input((5,))
    model = keras.Model(inputs, KERAS_BN(name="bn")(L.Dense(3, name="d")(inputs)))
    expected = trained_statistics(model, rng)
    kerasbn.from_keras(model).save(tmp_path / "m.keras")
    script = textwrap.dedent(
        f"""
        import json, keras, kerasbn
        model = keras.models.load_model({str(tmp_path / "m.keras")!r})
        bn = model.get_layer("bn")
        print(json.dumps([type(bn).__module__, type(bn).__name__,
                          keras.ops.convert_to_numpy(bn.moving_mean).tolist()]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_BACKEND": keras.backend.backend()},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    module, name, mean = json.loads(done.stdout.strip().splitlines()[-1])
    assert (module, name) == ("kerasbn.layer", "BatchNormalization")
    np.testing.assert_array_equal(np.float32(mean), expected[0][0])


# ------------------------------------------------------------ two threads
@keras.saving.register_keras_serializable(package="kerasbn_load_tests")
class Rendezvous(L.Layer):
    """Meets the other thread while Keras constructs it during loading.

    ``role="kerasbn"``: announces that ``kerasbn.load_model`` is running and
    waits until the other thread has made its BN. ``role="plain"``: waits for
    that announcement, then creates a BN through ``keras.layers`` as a
    model's code does, records its class, and lets the other thread go on.
    """

    events: dict = {}
    made: list = []

    def __init__(self, role="plain", **kwargs):
        super().__init__(**kwargs)
        self.role = role
        started, done = self.events.get("started"), self.events.get("done")
        if started is None:
            self.norm = keras.layers.BatchNormalization()
        elif role == "kerasbn":
            started.set()
            done.wait(timeout=60)
            self.norm = keras.layers.BatchNormalization()
        else:
            started.wait(timeout=60)
            self.norm = keras.layers.BatchNormalization()
            self.made.append(type(self.norm))
            done.set()

    def call(self, x, training=None):
        return self.norm(x, training=training)

    def get_config(self):
        return {**super().get_config(), "role": self.role}


def test_two_threads_load_at_once_and_plain_keras_gets_its_own_bn(rng, tmp_path):
    """One thread runs ``kerasbn.load_model`` while the other, inside it,
    loads with plain ``keras.models.load_model``: the plain one must get
    Keras's BN, as nothing in ``keras.layers`` is rebound."""
    paths = {}
    for role in ("kerasbn", "plain"):
        inputs = keras.Input((3,))
        model = keras.Model(inputs, Rendezvous(role=role, name="meet")(inputs))
        trained_statistics(model, rng)
        paths[role] = tmp_path / f"{role}.keras"
        model.save(paths[role])
    Rendezvous.events.update(started=threading.Event(), done=threading.Event())
    Rendezvous.made.clear()
    results, errors = {}, []

    def load(role, loader):
        try:
            results[role] = loader(paths[role])
        except Exception as error:  # re-raised below
            errors.append(error)

    threads = [
        threading.Thread(target=load, args=("kerasbn", kerasbn.load_model)),
        threading.Thread(target=load, args=("plain", keras.models.load_model)),
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        Rendezvous.events.clear()
    assert not errors, errors
    assert Rendezvous.made == [KERAS_BN]  # made while kerasbn.load_model ran
    assert type(results["plain"].get_layer("meet").norm) is KERAS_BN
    assert isinstance(results["kerasbn"].get_layer("meet").norm, kerasbn.BatchNorm)
