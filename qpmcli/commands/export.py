"""``qpm export RUN --onnx``: the whole classifier (and its adapter) as ONNX graphs with metadata."""

from __future__ import annotations

import typer

from qpmcli.commands._common import JsonFlag, WeightsDir, console, print_json


def export(
    run: str = typer.Argument(..., help="Run directory (from `qpm train`)."),
    onnx: bool = typer.Option(False, "--onnx", help="Export to ONNX (the only format so far; required)."),
    out: str = typer.Option(None, "--out", help="Output file (default <run>/model.onnx)."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write <stem>.fp16.onnx (fp16 weights, fp32 I/O)."),
    verify: bool = typer.Option(False, "--verify",
                                help="Compare ONNX Runtime with PyTorch on check images; a mismatch fails."),
    no_adapter: bool = typer.Option(False, "--no-adapter", help="Skip the adapter-only (tokens in) graph."),
    check_images: list[str] = typer.Option(None, "--check-images",
                                           help="Images/folders for --verify (default: the run's test split)."),
    weights: str = typer.Option(None, "--weights", help="Backbone weights file (digest must match the run's)."),
    weights_dir: str = WeightsDir,
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
    device: str = typer.Option("cpu", "--device", help="ONNX Runtime device for --verify: cpu, cuda, auto."),
    json_out: bool = JsonFlag,
) -> None:
    """Export a trained run as ONNX: image -> logits, feature maps [B,K,h,w], features [B,K], with metadata."""
    from qpmcli.errors import ConfigError

    if not onnx:
        raise ConfigError("choose an export format: pass --onnx")
    from qpmcli.export import export_onnx
    from qpmcli.settings import resolve_settings

    settings, _ = resolve_settings(weights_dir=weights_dir)
    err = console(stderr=True)
    report = export_onnx(run, out, fp16=fp16, verify=verify, adapter=not no_adapter, weights=weights,
                         settings=settings, opset=opset, check_images=check_images or None, device=device,
                         log=None if json_out else (lambda m: err.print(m)))
    if json_out:
        print_json(report)
        return
    _print_report(report)


def _print_report(report: dict) -> None:
    from rich.table import Table

    out = console()
    table = Table(title=f"qpm export: {report['run']}", title_justify="left")
    table.add_column("graph")
    table.add_column("file")
    table.add_column("MB", justify="right")
    for kind, path in report["files"].items():
        name = path.rsplit("/", 1)[-1]
        table.add_row(kind, path, f"{report['sizes_mb'].get(name, 0):.2f}")
    out.print(table)
    for precision, res in (report.get("verify") or {}).items():
        d = res["max_abs_diff"]
        out.print(f"verify {precision}: max abs diff logits {d['logits']:.3g} maps {d['maps']:.3g} features "
                  f"{d['features']:.3g} (limit {res['tolerance']}), top-1 agreement "
                  f"{100 * res['top1_agreement']:.1f}% on {res['n']} images, {res['provider']}: "
                  f"{'ok' if res['passed'] else 'FAILED'}")
    if report.get("check_set"):
        out.print(f"check set: {report['check_set']}")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
