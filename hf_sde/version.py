"""The package version, in its own module so that exported copies of heads.py can read it."""

__version__ = "0.1.0"
