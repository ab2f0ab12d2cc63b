"""Our exception types. Every user mistake raises a `QpmError`; the CLI prints its message as one line and exits 2."""

from __future__ import annotations


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
