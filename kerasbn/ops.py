"""The former name of :mod:`kerasbn.formulas`, which every caller should import.

Example:
    >>> from kerasbn import formulas, ops
    >>> ops.sufficient_moments is formulas.sufficient_moments
    True
"""

from kerasbn.formulas import *  # noqa: F403
from kerasbn.formulas import __all__  # noqa: F401
