"""The examples in kerasbn's docstrings run and print what they say, on this backend.

The backend module of another backend is skipped: it imports that backend.
"""

import doctest
import importlib

import pytest
from conftest import BACKEND

# The modules with public objects (the private helpers carry no examples).
MODULES = [
    "kerasbn.formulas",
    "kerasbn.layer",
    "kerasbn.backends",
    "kerasbn.backends.plan",
    f"kerasbn.backends.{BACKEND}",
    "kerasbn.fold",
    "kerasbn.recalibrate",
    "kerasbn.diagnose",
    "kerasbn._comparison",
    "kerasbn.convert",
    "kerasbn.torch_interop",
    "kerasbn.legacy",
    "kerasbn.freeze",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run_as_written(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
