"""kerasbn: batch normalization for Keras 3, a drop-in for keras.layers.BatchNormalization."""

from kerasbn._version import __version__ as __version__
from kerasbn.convert import from_keras, load_model, to_keras
from kerasbn.diagnose import BNMonitor, Diagnosis, diagnose
from kerasbn.fold import fold_batch_norms
from kerasbn.freeze import freeze_batch_norms
from kerasbn.layer import BatchNorm, BatchNormalization
from kerasbn.legacy import load_legacy_model
from kerasbn.recalibrate import recalibrate
from kerasbn.torch_interop import from_torch, to_torch

__all__ = [
    "BatchNorm",
    "BatchNormalization",
    "BNMonitor",
    "Diagnosis",
    "diagnose",
    "fold_batch_norms",
    "freeze_batch_norms",
    "from_keras",
    "from_torch",
    "load_legacy_model",
    "load_model",
    "recalibrate",
    "to_keras",
    "to_torch",
]
