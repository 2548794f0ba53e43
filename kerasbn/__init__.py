"""kerasbn: batch normalization for Keras 3, a drop-in for keras.layers.BatchNormalization."""

from kerasbn.convert import from_keras, load_model, to_keras
from kerasbn.fold import fold_batch_norms
from kerasbn.layer import BatchNorm
from kerasbn.recalibrate import recalibrate

BatchNormalization = BatchNorm

__all__ = [
    "BatchNorm",
    "BatchNormalization",
    "fold_batch_norms",
    "from_keras",
    "load_model",
    "recalibrate",
    "to_keras",
]
__version__ = "0.1.0"
