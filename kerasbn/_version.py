"""The version of kerasbn, written once: setup.cfg reads this literal statically."""

__all__ = ["__version__"]

__version__ = "0.2.0"
