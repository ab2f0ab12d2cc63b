"""Built-in qpm backbones."""

from __future__ import annotations

from qpmcli.hookspecs import hookimpl


@hookimpl
def qpm_backbones() -> list:
    return []
