"""``qpm runs``: the runs under runs_dir (and any folder given), read from their run files only (fast, no torch)."""

from __future__ import annotations

import typer

from qpmcli.commands._common import JsonFlag, console, print_json


def runs(
    folders: list[str] = typer.Argument(None, help="More folders to search (a run folder or a folder of runs)."),
    json_out: bool = JsonFlag,
) -> None:
    """List runs: dataset, backbone, selector, status (complete / interrupted at a stage / stale), accuracy, SID@5,
    created, exported .onnx; the current run is marked with *, a run made by edit/add-class names its parent."""
    from pathlib import Path

    from qpmcli.commands._common import settings_from_flags
    from qpmcli.errors import ConfigError
    from qpmcli.runs import list_runs

    for f in folders or []:
        if not Path(f).expanduser().is_dir():
            raise ConfigError(f"{f} is not a folder; give run folders or folders of runs")
    settings = settings_from_flags(device_check=None)
    data = list_runs(settings, folders or [])
    if json_out:
        print_json(data)
        return
    out = console()
    if not data["runs"]:
        out.print(f"no runs under {', '.join(data['searched'])}; train one with `qpm train` or run `qpm demo`",
                  highlight=False, markup=False)
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title="qpm runs (* = current run)", title_justify="left")
    for col in ("", "name", "dataset", "backbone", "selector", "status", "acc", "SID@5", "created", "onnx", "path"):
        table.add_column(col, justify="right" if col in ("acc", "SID@5") else "left")
    pct = lambda v: "-" if v is None else f"{100 * float(v):.1f}"  # noqa: E731
    for r in data["runs"]:  # Text: names from run files are shown as written, never read as rich markup
        name = r["name"] if not r.get("parent") else f"{r['name']} ({r['edit']} of {Path(r['parent']).name})"
        table.add_row(*(Text(str(v)) for v in (
            "*" if r["current"] else "", name, r["dataset"] or "?", r["backbone"] or "?",
            r["selector"] or r["head"] or "?", r["status"], pct(r["accuracy"]), pct(r["sid5"]), r["created"] or "-",
            "yes" if r["onnx"] else "no", r["path"])))
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("runs")(runs)
