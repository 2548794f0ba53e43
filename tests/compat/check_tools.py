"""Each public kerasbn tool on the installed Keras and backend: pass or fail.

Run in any environment with kerasbn importable (``PYTHONPATH`` at the
checkout): ``KERAS_BACKEND=jax python tests/compat/check_tools.py``. Prints
one JSON object: the versions, then each check's ``"pass"``, ``"fail: ..."``
or ``"skip: ..."``. Each check compares against an independent reference:
Keras's own BN, NumPy, or the model before the tool. ``tests/compat/matrix.py``
runs it in every supported Keras's environment.
"""

import json
import os
import sys
import tempfile
import traceback
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerasbn  # noqa: E402

L = keras.layers
RNG = np.random.default_rng(0)
X = RNG.normal(1.0, 2.0, (16, 8, 8, 3)).astype("float32")
Y = RNG.normal(size=(16, 2)).astype("float32")
FOLDER = tempfile.mkdtemp()


def cnn(bn, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = L.ReLU(name="relu")(bn(momentum=0.5, name="bn")(x))
    x = L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inputs, x, name="cnn")


def trained(model):
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(X, Y, batch_size=8, epochs=2, verbose=0)
    return model


class Net(keras.Model):
    """A subclassed model holding BN layers in a list."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.convs = [L.Conv2D(4, 3, padding="same") for _ in range(2)]
        self.norms = [L.BatchNormalization(momentum=0.5) for _ in range(2)]
        self.pool = L.GlobalAveragePooling2D()

    def call(self, x, training=None):
        for conv, norm in zip(self.convs, self.norms):
            x = keras.ops.relu(norm(conv(x), training=training))
        return self.pool(x)


def close(a, b, tol=1e-5):
    a, b = (np.asarray(keras.ops.convert_to_numpy(t), "f8") for t in (a, b))
    return float(np.max(np.abs(a - b))) <= tol * max(1.0, float(np.max(np.abs(b))))


def check_layer_fit():
    ours, theirs = trained(cnn(kerasbn.BatchNorm)), trained(cnn(L.BatchNormalization))
    assert all(
        close(a, b, 1e-4) for a, b in zip(ours.get_weights(), theirs.get_weights())
    )
    assert close(ours.predict(X, verbose=0), theirs.predict(X, verbose=0), 1e-4)


def check_keras_file():
    model = trained(cnn(kerasbn.BatchNorm))
    path = os.path.join(FOLDER, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert np.array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))


def check_fold():
    model = trained(cnn(L.BatchNormalization))
    folded = kerasbn.fold_batch_norms(model)
    assert [layer.name for layer in folded.layers if "bn" in layer.name] == []
    assert close(folded.predict(X, verbose=0), model.predict(X, verbose=0))
    keras.Model(folded.inputs, folded.get_layer("relu").output).predict(X, verbose=0)


def check_recalibrate():
    model = cnn(kerasbn.BatchNorm)
    kerasbn.recalibrate(model, X, batch_size=8)
    seen = keras.ops.convert_to_numpy(model.get_layer("conv")(X)).astype("f8")
    bn = model.get_layer("bn")
    assert close(keras.ops.convert_to_numpy(bn.moving_mean), seen.mean((0, 1, 2)))
    assert close(keras.ops.convert_to_numpy(bn.moving_variance), seen.var((0, 1, 2)))


def check_convert():
    model = trained(cnn(L.BatchNormalization))
    converted = kerasbn.from_keras(model)
    assert isinstance(converted.get_layer("bn"), kerasbn.BatchNorm)
    assert close(converted.predict(X, verbose=0), model.predict(X, verbose=0), 1e-6)
    back = kerasbn.to_keras(converted)
    assert type(back.get_layer("bn")) is L.BatchNormalization
    assert back.get_layer("bn").get_config() == model.get_layer("bn").get_config()
    net = Net(name="net")
    net(X)
    path = os.path.join(FOLDER, "net.weights.h5")
    kerasbn.from_keras(net).save_weights(path)  # the file names Keras's BN
    fresh = Net(name="net")
    fresh(X)
    fresh.load_weights(path)
    assert close(fresh(X), net(X), 1e-6)


def check_freeze():
    model = cnn(L.BatchNormalization)
    kerasbn.freeze_batch_norms(model, train_affine=True)
    before = keras.ops.convert_to_numpy(model.get_layer("bn").moving_mean)
    trained(model)
    after = keras.ops.convert_to_numpy(model.get_layer("bn").moving_mean)
    assert np.array_equal(before, after)


def check_subclassed_fold():
    net = Net(name="net")
    net(X)
    for norm in net.norms:
        norm.moving_variance.assign(RNG.uniform(0.5, 2.0, 4))
    folded = kerasbn.fold_batch_norms(net)
    assert type(folded) is Net
    assert close(folded(X, training=False), net(X, training=False))


def check_legacy():
    try:
        import tf_keras
    except ImportError:
        return "skip: tf_keras is not installed"
    old = tf_keras.Sequential(
        [
            tf_keras.Input((8, 8, 3)),
            tf_keras.layers.Conv2D(4, 3),
            tf_keras.layers.BatchNormalization(),
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(3),
        ]
    )
    old.compile("adam", tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    old.fit(X, np.arange(16) % 3, verbose=0)
    path = os.path.join(FOLDER, "old.h5")
    old.save(path)
    model = kerasbn.load_legacy_model(path)
    assert model.compiled
    assert close(model.predict(X, verbose=0), old.predict(X, verbose=0))


def check_from_torch():
    try:
        import torch
    except ImportError:
        return "skip: torch is not installed"
    module = torch.nn.BatchNorm2d(3, momentum=0.3)
    module.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    module.eval()
    layer = kerasbn.from_torch(module)
    nchw = np.transpose(X, (0, 3, 1, 2)).copy()
    expected = module(torch.from_numpy(nchw)).detach().numpy()
    actual = keras.ops.convert_to_numpy(layer(np.transpose(nchw, (0, 2, 3, 1))))
    assert close(np.transpose(actual, (0, 3, 1, 2)), expected)


CHECKS = {
    "layer fit = Keras BN": check_layer_fit,
    ".keras round trip": check_keras_file,
    "fold_batch_norms": check_fold,
    "recalibrate": check_recalibrate,
    "from_keras / to_keras": check_convert,
    "freeze_batch_norms": check_freeze,
    "subclassed model's fold": check_subclassed_fold,
    "load_legacy_model": check_legacy,
    "from_torch": check_from_torch,
}


def main() -> None:
    import importlib.metadata as metadata

    versions = {"keras": keras.__version__, "backend": keras.backend.backend()}
    for name in ("jax", "tensorflow", "torch"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    results = {}
    for name, check in CHECKS.items():
        try:
            results[name] = check() or "pass"
        except Exception as error:  # reported, not raised: one row per run
            line = traceback.format_exception_only(type(error), error)[-1].strip()
            results[name] = f"fail: {line[:300]}"
    print(json.dumps({"versions": versions, "results": results}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
