"""Our exception types. Every user mistake raises a `QpmError`; the CLI prints its message as one line and exits 2.

:func:`validation_problems` turns a pydantic ``ValidationError`` (the schemas of our documents) into that one line.
"""

from __future__ import annotations

from typing import Any


class QpmError(Exception):
    """A user-facing error whose message says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(QpmError):
    """Invalid settings, flags or config files."""


class PluginError(QpmError):
    """Unknown plugin names, plugins that fail to load, or two plugins claiming one name."""


class DatasetError(QpmError):
    """A missing or malformed dataset."""


class WeightsError(QpmError):
    """Missing, unreadable or mismatching backbone weights."""


class ImageError(QpmError):
    """An image that cannot be read."""


class CacheError(QpmError):
    """A token cache that is locked, incomplete or built with other settings."""


class SelectionError(QpmError):
    """An infeasible or malformed feature-selection request."""


class ArtifactError(QpmError):
    """A run directory or model artifact that is missing, incomplete or of the wrong kind."""


def validation_problems(exc: Any) -> str:
    """A pydantic ValidationError as ``field: problem; field: problem`` (one line)."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        out.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(out)
