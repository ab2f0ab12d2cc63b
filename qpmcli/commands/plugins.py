"""``qpm plugins``: list every installed backbone, dataset and selector with the package that provides it."""

from __future__ import annotations

import typer

from qpmcli.commands._common import JsonFlag, console, print_json


def plugins(json_out: bool = JsonFlag) -> None:
    """List installed backbones, datasets and selectors, and which package provides each."""
    from qpmcli.registry import KINDS, declared_options, get_registry

    reg = get_registry()
    data = {
        kind + "s": [{"name": e.name, "package": e.package, "plugin": e.plugin,
                      "description": getattr(e.spec, "description", ""),
                      "options": _options(declared_options(kind, e.spec))}
                     for e in reg.entries(kind)]
        for kind in KINDS
    }
    if json_out:
        print_json(data)
        return
    from rich.table import Table

    out = console()
    for kind, rows in data.items():
        table = Table(title=kind, title_justify="left")
        for col in ("name", "package", "description"):
            table.add_column(col)
        for row in rows:
            table.add_row(row["name"], row["package"], row["description"])
        if not rows:
            table.add_row("(none installed)", "", "")
        out.print(table)


def _options(declared: dict | None) -> list[dict] | None:
    """The plugin's --dataset-option/--backbone-option/--selector-option keys with their types (``None``:
    undeclared, any key)."""
    if declared is None:
        return None
    return [{"name": o.name, "type": o.type, "default": o.default, "help": o.help, "choices": list(o.choices)}
            for o in declared.values()]


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins)
