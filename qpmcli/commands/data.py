"""``qpm data check``: open both splits of a dataset and report counts, classes, masks and attributes."""

from __future__ import annotations

import typer

from qpmcli import options as opts
from qpmcli.commands._common import DataRoot, JsonFlag, console, print_json, settings_from_flags

data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)


@data_app.command("check")
def check(dataset: str = opts.dataset_opt("cub200"), data_root: str = DataRoot,
          dataset_option: list[str] = opts.dataset_option_opt(),
          full: bool = typer.Option(False, "--full/--no-full",
                                    help="Decode every image (default: a fast header check of every file)."),
          json_out: bool = JsonFlag) -> None:
    """Verify a dataset: counts per split, number of classes, whether masks and class attributes are present, and
    that every image file is readable (any unreadable one fails the check, named)."""
    from qpmcli.data import check_dataset

    options = opts.parse_plugin_options("dataset", dataset, dataset_option)
    settings = settings_from_flags(data_root=data_root, device_check=None)
    report = check_dataset(dataset, root=None, settings=settings, full=full, **options)
    if json_out:
        print_json(report)
        return
    from rich.table import Table

    table = Table(title=f"dataset {dataset}" + (f" at {report['root']}" if report.get("root") else ""),
                  title_justify="left")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("per class (min-max)", justify="right")
    for split, info in report["splits"].items():
        table.add_row(split, str(info["count"]), f"{info['per_class_min']}-{info['per_class_max']}")
    out = console()
    out.print(table)
    attrs = report["class_attributes"]
    out.print(f"classes: {report['classes']}   masks: {'yes' if report['masks'] else 'no'}   "
              f"class attributes: {'x'.join(map(str, attrs)) if attrs else 'no'}   "
              f"image attributes: {'yes' if report['image_attributes'] else 'no'}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
