"""The distribution's version, single source for pyproject and the wire Hello."""

__version__ = "0.1.0"
