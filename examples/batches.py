"""Mini-batches in a fresh random order every epoch, for ``model.fit``.

Why not ``fit(x, y, shuffle=True)``: once ``keras.utils.set_random_seed`` has
been called, Keras 3 on TensorFlow shuffles NumPy arrays into the same order
at every epoch (the shuffle op gets the same seed each time the dataset is
iterated). Cycling through one fixed order is not the SGD of the lecture and
of the BN paper, so the examples draw a new permutation per epoch from their
own seeded NumPy generator.

Example:
    >>> import numpy as np
    >>> from batches import ShuffledBatches
    >>> batches = ShuffledBatches(np.zeros((10, 3)), np.arange(10), 4, seed=0)
    >>> len(batches), batches[2][0].shape
    (3, (2, 3))
"""

from __future__ import annotations

import math

import keras
import numpy as np


class ShuffledBatches(keras.utils.PyDataset):
    """Yields ``(x, y)`` mini-batches; reshuffles at the end of every epoch.

    Args:
        x: Inputs, first axis the examples.
        y: Targets, first axis the examples.
        batch_size: Examples per batch (the last batch may be smaller).
        seed: Seed of the generator of the permutations.
    """

    def __init__(
        self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int
    ) -> None:
        super().__init__()
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} and {len(y)}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(x))

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self) -> None:
        self._order = self._rng.permutation(len(self.x))
