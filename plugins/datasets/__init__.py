"""Built-in qpm datasets."""

from __future__ import annotations

from qpmcli.hookspecs import hookimpl


@hookimpl
def qpm_datasets() -> list:
    return []
