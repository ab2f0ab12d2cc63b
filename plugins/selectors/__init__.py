"""Built-in qpm selectors."""

from __future__ import annotations

from qpmcli.hookspecs import hookimpl


@hookimpl
def qpm_selectors() -> list:
    return []
