"""The tools on every way a Keras 3 model can hold a BN layer.

Hand-written subclassed layers and models hold BN layers as attributes, in
lists, tuples and dicts nested several levels deep, shared by two calls,
created in ``build()`` and in a layer that creates its weights only on its
first call. Every tool must reach all of them, give back the model's class,
names and weight paths, and compute what the original computes (Keras's own
BN is the reference), on every backend.
"""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import assert_close_at_scale, record, to_numpy

import kerasbn
from kerasbn import _graph

L = keras.layers
KERAS_BN = L.BatchNormalization
BATCH_NORMS = (kerasbn.BatchNorm, KERAS_BN)


@keras.saving.register_keras_serializable(package="kerasbn_tests")
class LazyBlock(L.Layer):
    """Creates its conv and BN in ``build()``; the BN's weights exist only
    after the first call."""

    def __init__(self, filters=4, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters

    def build(self, input_shape):
        self.conv = L.Conv2D(self.filters, 3, padding="same", use_bias=False)
        self.norm = KERAS_BN(name="late_bn")

    def call(self, x, training=None):
        return keras.ops.relu(self.norm(self.conv(x), training=training))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="kerasbn_tests")
class Holders(L.Layer):
    """BN layers in a tuple, a dict of lists and a shared attribute."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pair = (L.Dense(6), KERAS_BN(name="tuple_bn"))
        self.table = {"deep": [[KERAS_BN(momentum=0.5, name="nested_bn")]]}
        self.shared = KERAS_BN(name="shared_bn")

    def call(self, x, training=None):
        h = self.pair[1](self.pair[0](x), training=training)
        h = self.table["deep"][0][0](h, training=training)
        return self.shared(h, training=training) + self.shared(
            2.0 * h, training=training
        )


@keras.saving.register_keras_serializable(package="kerasbn_tests")
class Net(keras.Model):
    """A subclassed model holding every pattern, and a layer off the call path."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = L.Conv2D(4, 3, use_bias=False)
        self.stem_bn = KERAS_BN(epsilon=1e-2, name="stem_bn")
        self.block = LazyBlock(name="lazy")
        self.pool = L.GlobalAveragePooling2D()
        self.holders = Holders(name="holders")
        self.unused = L.Dense(2, name="unused")  # never called, still held

    def call(self, x, training=None):
        h = self.stem_bn(self.stem(x), training=training)
        h = self.pool(self.block(h, training=training))
        return self.holders(h, training=training)


BN_NAMES = {"stem_bn", "late_bn", "tuple_bn", "nested_bn", "shared_bn"}
IMAGE = (8, 8, 3)


def build_net(rng):
    model = Net(name="net")
    model(np.zeros((2, *IMAGE), "float32"))
    for _, bn in _graph.batch_norms(model):
        bn.set_weights(
            [
                rng.uniform(0.5, 2.0, w.shape).astype("float32")
                if "variance" in w.path or "gamma" in w.path
                else rng.normal(0.0, 0.5, w.shape).astype("float32")
                for w in bn.weights
            ]
        )
    return model


def images(rng, n=6):
    return rng.normal(1.0, 2.0, (n, *IMAGE)).astype("float32")


def bn_classes(model):
    return {bn.name: type(bn) for _, bn in _graph.batch_norms(model)}


def paths(model):
    return [w.path for w in model.weights]


def test_walker_finds_every_bn_once_with_its_path(rng):
    model = build_net(rng)
    found = dict((bn.name, path) for path, bn in _graph.batch_norms(model))
    assert set(found) == BN_NAMES
    assert found["nested_bn"] == "net/holders/nested_bn"
    assert found["late_bn"] == "net/lazy/late_bn"
    assert len(_graph.batch_norms(model)) == len(BN_NAMES)  # shared: once


@pytest.mark.parametrize("in_place", [False, True])
def test_from_keras_swaps_every_bn_keeps_class_paths_and_matches_keras(rng, in_place):
    model = build_net(rng)
    reference = build_net(np.random.default_rng(0))
    reference.set_weights(model.get_weights())
    before = paths(model)
    converted = kerasbn.from_keras(model, in_place=in_place)
    assert (converted is model) is in_place
    assert type(converted) is Net and converted.name == "net"
    assert set(bn_classes(converted).values()) == {kerasbn.BatchNormalization}
    assert paths(converted) == before
    assert converted.unused is not None and not converted.unused.built
    if not in_place:  # the original is untouched
        assert set(bn_classes(model).values()) == {KERAS_BN}
    x = images(rng)
    for training in (False, True):  # the training call moves the statistics
        actual = converted(x, training=training)
        expected = reference(x, training=training)
        # BN layers in series each renormalize the rounding of the one before:
        # float32 rounding relative to the outputs' scale.
        assert_close_at_scale(actual, expected, rtol=1e-5)
        record(f"graph: subclassed from_keras, training={training}", actual, expected)
    for a, e in zip(converted.weights, reference.weights, strict=True):
        assert_close_at_scale(a, e)  # summation order differs between kernels


def test_copy_is_a_true_copy(rng):
    model = build_net(rng)
    converted = kerasbn.from_keras(model)
    converted.stem_bn.moving_mean.assign(np.full(4, 7.0, "float32"))
    assert not np.any(to_numpy(model.stem_bn.moving_mean) == 7.0)
    assert not any(a is b for a, b in zip(converted.weights, model.weights))


def test_to_keras_gives_back_keras_bn_everywhere_with_the_same_weights(rng):
    model = build_net(rng)
    back = kerasbn.to_keras(kerasbn.from_keras(model))
    assert set(bn_classes(back).values()) == {KERAS_BN}
    assert paths(back) == paths(model)
    for a, e in zip(back.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, e)
    x = images(rng)
    np.testing.assert_array_equal(to_numpy(back(x)), to_numpy(model(x)))


def test_fold_leaves_no_bn_and_reports_each(rng):
    model = build_net(rng)
    folded, report = kerasbn.fold_batch_norms(model, return_report=True)
    assert type(folded) is Net
    assert not [
        layer for _, layer in _graph.walk(folded) if isinstance(layer, BATCH_NORMS)
    ]
    assert report.absorbed == []  # inside call(): no graph records the flow
    assert {path.rsplit("/", 1)[1] for path in report.affine} == BN_NAMES
    x = images(rng)
    expected = to_numpy(model(x, training=False))
    actual = to_numpy(folded(x, training=False))
    relative = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert relative < 1e-5
    record("graph: subclassed fold (relative)", relative, 0.0)


def test_fold_absorbs_graph_pairs_in_a_functional_subclass(rng):
    @keras.saving.register_keras_serializable(package="kerasbn_tests")
    class Backbone(keras.Model):
        """A functional model with a class of its own, as keras_hub's are."""

        def __init__(self, **kwargs):
            inputs = keras.Input(IMAGE)
            x = L.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
            x = KERAS_BN(name="bn")(x)
            x = LazyBlock(name="lazy")(x)
            super().__init__(inputs, L.ReLU()(x), **kwargs)
            self.pyramid = {"P1": x}

    model = Backbone(name="backbone")
    for _, bn in _graph.batch_norms(model):
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, 4).astype("float32"))
    folded, report = kerasbn.fold_batch_norms(model, return_report=True)
    assert type(folded) is Backbone and list(folded.pyramid) == ["P1"]
    assert report == kerasbn.fold.FoldReport(
        absorbed=["backbone/bn"], affine=["backbone/lazy/late_bn"]
    )
    assert type(folded.get_layer("bn")) is kerasbn.fold.Absorbed
    assert folded.get_layer("conv").use_bias
    x = images(rng)
    np.testing.assert_allclose(
        to_numpy(folded(x)), to_numpy(model(x)), rtol=1e-5, atol=1e-5
    )


def test_recalibrate_reaches_every_bn(rng):
    model = build_net(rng)
    before = {bn.name: to_numpy(bn.moving_mean) for _, bn in _graph.batch_norms(model)}
    x = images(rng, 32)
    kerasbn.recalibrate(model, x, batch_size=8)
    stem = to_numpy(model.stem(x)).astype("f8")  # what the stem BN sees
    # The mean to float32 rounding of the spread (a mean near 0 has no
    # relative precision of its own).
    np.testing.assert_allclose(
        to_numpy(model.stem_bn.moving_mean),
        stem.mean(axis=(0, 1, 2)),
        rtol=1e-5,
        atol=1e-5 * float(stem.std()),
    )
    np.testing.assert_allclose(
        to_numpy(model.stem_bn.moving_variance), stem.var(axis=(0, 1, 2)), rtol=1e-5
    )
    changed = {
        bn.name
        for _, bn in _graph.batch_norms(model)
        if not np.allclose(to_numpy(bn.moving_mean), before[bn.name])
    }
    assert changed == BN_NAMES


def test_unbuilt_bn_is_named_by_fold(rng):
    class WithSpare(keras.Model):
        def __init__(self):
            super().__init__(name="spare_net")
            self.dense = L.Dense(3)
            self.spare = {"bn": KERAS_BN(name="never_called")}

        def call(self, x):
            return self.dense(x)

    model = WithSpare()
    model(np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="spare_net/never_called.*not built"):
        kerasbn.fold_batch_norms(model)


def test_subclass_of_keras_bn_is_left_with_a_warning_naming_its_path():
    class MyBN(KERAS_BN):
        pass

    model = keras.Sequential([keras.Input((3,)), MyBN(name="mine")])
    with pytest.warns(UserWarning, match="'sequential.*/mine'.*subclass"):
        converted = kerasbn.from_keras(model)
    assert type(converted.layers[0]) is MyBN


def test_keras_file_of_the_swapped_model_loads_in_a_fresh_process(rng, tmp_path):
    """Graph-node BN loads back as kerasbn; code-created BN as the code makes
    it, with the saved statistics, and from_keras on it gives kerasbn again."""
    inputs = keras.Input(IMAGE)
    h = KERAS_BN(name="graph_bn")(L.Conv2D(4, 3, name="conv")(inputs))
    model = keras.Model(inputs, LazyBlock(name="lazy")(h), name="mixed")
    for _, bn in _graph.batch_norms(model):
        bn.moving_mean.assign(rng.normal(size=4).astype("float32"))
    converted = kerasbn.from_keras(model)
    path = tmp_path / "mixed.keras"
    converted.save(path)
    x = images(rng)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", to_numpy(converted.predict(x, verbose=0)))
    script = textwrap.dedent(
        f"""
        import json, sys, numpy as np, keras, kerasbn
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        import test_graph  # registers LazyBlock, the model's own package
        loaded = keras.models.load_model({str(path)!r})
        kinds = {{bn.name: "kerasbn" if isinstance(bn, kerasbn.BatchNorm) else
                 "keras" if type(bn) is keras.layers.BatchNormalization else "?"
                 for bn in loaded._flatten_layers() if "bn" in bn.name}}
        again = kerasbn.from_keras(loaded, in_place=True)
        y = again.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0)
        diff = float(np.max(np.abs(y - np.load({str(tmp_path / "y.npy")!r}))))
        print(json.dumps({{"kinds": kinds, "diff": diff}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kinds"] == {"graph_bn": "kerasbn", "late_bn": "keras"}
    assert result["diff"] == 0.0
