"""``qpm export RUN --onnx``: the whole classifier (and its adapter) as ONNX graphs with metadata."""

from __future__ import annotations

import typer

from qpmcli import options as opts
from qpmcli.commands._common import JsonFlag, Quiet, Weights, WeightsDir, console, print_json


def export(
    run: str = typer.Argument(None, help="Run directory (default: QPM_MODEL, else the current run)."),
    onnx: bool = typer.Option(False, "--onnx", help="Export to ONNX (the only format so far; required)."),
    out: str = opts.out_opt(None, "Output file (default <run>/model.onnx)."),
    fp16: bool = typer.Option(False, "--fp16/--no-fp16", help="Also write <stem>.fp16.onnx (fp16 weights, fp32 I/O)."),
    verify: bool = typer.Option(False, "--verify/--no-verify",
                                help="Compare ONNX Runtime with PyTorch on check images; a mismatch fails."),
    adapter: bool = typer.Option(True, "--adapter/--no-adapter", help="Also write the adapter-only (tokens in) graph."),
    check_images: list[str] = typer.Option(None, "--check-images",
                                           help="Images/folders for --verify (default: the run's test split)."),
    weights: str = Weights,
    weights_dir: str = WeightsDir,
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
    device: str = opts.device_opt(),
    quiet: bool = Quiet,
    json_out: bool = JsonFlag,
) -> None:
    """Export a trained run as ONNX: image -> logits, feature maps [B,K,h,w], features [B,K], with metadata."""
    from qpmcli.commands._common import say, settings_from_flags
    from qpmcli.current import record_export, resolve_model
    from qpmcli.errors import ConfigError

    if not onnx:
        raise ConfigError("choose an export format: pass --onnx")
    settings = settings_from_flags(weights_dir=weights_dir, device=device)
    opts.check_out_file(out, "--out")
    if out is not None and not str(out).lower().endswith(".onnx"):
        raise ConfigError(f"--out {out}: the file name must end in .onnx")
    opts.check_positive(opset, "--opset", 7)
    target = resolve_model(settings, run, run_only=True)
    say(target.line("exporting"))
    from qpmcli.export import export_onnx

    err = console(stderr=True)
    report = export_onnx(target.path, out, fp16=fp16, verify=verify, adapter=adapter, weights=weights,
                         settings=settings, opset=opset, check_images=check_images or None, device=settings.device,
                         log=None if (json_out or quiet) else (lambda m: err.print(m)))
    full = report.get("files", {}).get("full")
    if full:
        report["current"] = record_export(settings, target.path, full)
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
