"""The installed distribution's version: pyproject.toml is the one source, read from the metadata."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lensviz")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
