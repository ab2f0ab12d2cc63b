"""``qpm doctor``: is this machine ready (libraries, GPU, ONNX Runtime providers, weights, data, cache)?"""

from __future__ import annotations

import typer

from qpmcli import options as opts
from qpmcli.commands._common import DataRoot, JsonFlag, WeightsDir, console, print_json


def doctor(
    backbone: str = opts.backbone_opt("dinov2-vitb14-reg"),
    dataset: str = opts.dataset_opt("cub200"),
    data_root: str = DataRoot,
    weights_dir: str = WeightsDir,
    device: str = opts.device_opt(),
    datasets: bool = typer.Option(True, "--datasets/--no-datasets", help="Run the data check of each dataset."),
    json_out: bool = JsonFlag,
) -> None:
    """Check python, torch/CUDA/cuDNN/GPU, ONNX Runtime providers (with the reason one fails to load), OR-Tools,
    backbone weights, datasets and the cache dir. Exit code 0 when everything the defaults need is there (the
    backbone and dataset qpm train uses; change them with -b/-d), else 1."""
    from qpmcli.commands._common import settings_from_flags
    from qpmcli.doctor import run_doctor

    settings = settings_from_flags(data_root=data_root, weights_dir=weights_dir, device=device, device_check=None)
    report = run_doctor(settings, backbone=backbone, dataset=dataset, datasets=datasets)
    if json_out:
        print_json(report)
    else:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"qpm doctor (backbone {backbone}, dataset {dataset}, device {report['device']})",
                      title_justify="left")
        for col in ("check", "", "needed", "detail"):
            table.add_column(col)
        for c in report["checks"]:
            mark = "[green]ok[/]" if c["ok"] else ("[dim]n/a[/]" if c["ok"] is None else "[red]NO[/]")
            table.add_row(c["name"], mark, "yes" if c["needed"] else "", escape(str(c["detail"])))
        out = console()
        out.print(table)
        out.print("ready" if report["ready"] else f"not ready: {', '.join(report['missing'])}", highlight=False)
    if not report["ready"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
