"""``qpm config``: show the resolved settings and where each value came from."""

from __future__ import annotations

import typer

from qpmcli.commands._common import DataRoot, Device, JsonFlag, Seed, WeightsDir, console, print_json


def config(
    data_root: str = DataRoot,
    weights_dir: str = WeightsDir,
    device: str = Device,
    seed: int = Seed,
    json_out: bool = JsonFlag,
) -> None:
    """Show the resolved settings (flags > QPM_* env > ./qpm.toml > user config > defaults) and their sources."""
    from qpmcli.settings import config_files, resolve_settings

    settings, sources = resolve_settings(data_root=data_root, weights_dir=weights_dir, device=device, seed=seed)
    values = settings.model_dump(mode="json")
    if json_out:
        print_json({"settings": values, "sources": sources, "config_files": [str(p) for p in config_files()]})
        return
    from rich.table import Table

    table = Table(title="qpm settings", title_justify="left")
    for col in ("setting", "value", "from"):
        table.add_column(col)
    for name, value in values.items():
        table.add_row(name, str(value), sources[name])
    out = console()
    out.print(table)
    out.print("config files (lowest priority first): " + ", ".join(
        f"{p}{'' if p.is_file() else ' (absent)'}" for p in config_files()))


def register(app: typer.Typer) -> None:
    app.command("config")(config)
