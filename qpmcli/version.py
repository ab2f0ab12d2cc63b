"""The package version, read once from the installed package's metadata (``pyproject.toml`` is its only source).

``qpmcli.__version__``, the ``qpm_version`` of exported models and the ``versions`` block of run files all come
from :func:`qpm_version`. This module imports nothing from ``qpmcli``, so every module may use it.
"""

from __future__ import annotations

import functools

DIST_NAME = "qpm"  # the distribution name in pyproject.toml


@functools.cache
def qpm_version() -> str:
    """The installed ``qpm`` distribution's version, or ``"0+unknown"`` for a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DIST_NAME)
    except PackageNotFoundError:
        return "0+unknown"
