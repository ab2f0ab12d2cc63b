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
    int8: bool = typer.Option(False, "--int8/--no-int8",
                              help="Also write <stem>.int8.onnx (ONNX Runtime int8 quantization for CPUs), verified "
                                   "against fp32; fails below --min-agreement."),
    calibrate: str = typer.Option(None, "--calibrate", metavar="train|DIR",
                                  help="--int8: also try static QDQ quantization calibrated on the run's train split "
                                       "or a folder of images; kept only when faster and as accurate."),
    calibrate_n: int = typer.Option(64, "--calibrate-n", help="--calibrate: number of images."),
    verify_images: list[str] = typer.Option(None, "--verify-images",
                                            help="--int8: images/folders to compare int8 with fp32 on (default: the "
                                                 "run's test split)."),
    min_agreement: float = typer.Option(0.99, "--min-agreement",
                                        help="--int8: least top-1 agreement with fp32 (0-1)."),
    device: str = opts.device_opt(),
    quiet: bool = Quiet,
    json_out: bool = JsonFlag,
) -> None:
    """Export a trained run as ONNX: image -> logits, feature maps [B,K,h,w], features [B,K], with metadata."""
    from qpmcli.commands._common import say, settings_from_flags
    from qpmcli.current import resolve_model, try_record_export
    from qpmcli.errors import ConfigError

    if not onnx:
        raise ConfigError("choose an export format: pass --onnx")
    settings = settings_from_flags(weights_dir=weights_dir, device=device)
    from qpmcli.export import ExportRequest, export_onnx

    req = ExportRequest(out=out, fp16=fp16, verify=verify, adapter=adapter, opset=opset,
                        check_images=tuple(check_images) if check_images else None, device=settings.device,
                        int8=_int8_options(int8, calibrate, calibrate_n, verify_images, min_agreement)).checked()
    target = resolve_model(settings, run, run_only=True)
    if not quiet:  # -q: nothing on stderr but errors
        say(target.line("exporting"))
    err = console(stderr=True)
    report = export_onnx(target.path, req.out, fp16=req.fp16, verify=req.verify, adapter=req.adapter,
                         weights=weights, settings=settings, opset=req.opset, check_images=req.check_images,
                         device=req.device, int8=req.int8,
                         log=None if (json_out or quiet) else (lambda m: err.print(m)))
    full = report.get("files", {}).get("full")
    if full:  # record keeping after the export: a damaged pointer is a warning, never a failed export
        report["current"], warning = try_record_export(settings, target.path, full)
        if warning:
            say(warning)
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
    if report.get("int8"):
        for line in _describe_int8(report["int8"]):
            out.print(line, highlight=False)


def _int8_options(int8: bool, calibrate: str | None, calibrate_n: int, verify_images: list[str] | None,
                  min_agreement: float):
    """The int8 options of the request (None without --int8; int8-only flags without --int8 are errors)."""
    from qpmcli.errors import ConfigError
    from qpmcli.quantize import DEFAULT_CALIBRATION_N, DEFAULT_MIN_AGREEMENT, Int8Options

    if not int8:
        for flag, given in (("--calibrate", calibrate is not None), ("--verify-images", bool(verify_images)),
                            ("--min-agreement", min_agreement != DEFAULT_MIN_AGREEMENT),
                            ("--calibrate-n", calibrate_n != DEFAULT_CALIBRATION_N)):
            if given:
                raise ConfigError(f"{flag} needs --int8")
        return None
    return Int8Options(calibrate=calibrate, n_calibrate=calibrate_n,
                       verify_images=tuple(verify_images) if verify_images else None, min_agreement=min_agreement)


def _describe_int8(report: dict) -> list[str]:
    """Human lines for the int8 part of an export report."""
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    v = report["verify"]
    rho = v["contribution_rank_correlation"]
    lines = [f"int8: {report['file']} ({report['method']}, {report['quantization']['quantized_nodes']} nodes "
             f"quantized, pooling + class-feature head in fp32; {report['optimization']['level']} graph "
             f"optimisation; size {100 * report['size_ratio']:.0f}% of fp32)",
             f"verify int8 vs fp32 on {report['verify_set']}: top-1 agreement {100 * v['top1_agreement']:.1f}% "
             f"(min {100 * report['min_agreement']:.1f}%), max probability difference {v['max_prob_diff']:.3g}, "
             f"top feature agreement {pct(v['top_feature_agreement'])}, contribution rank correlation "
             f"{'n/a' if rho is None else f'{rho:.3f}'}: {'ok' if report['passed'] else 'FAILED'}"]
    if report.get("calibration"):
        lines.append(f"int8 --calibrate: {report['calibration']['decision']}")
    return lines


def register(app: typer.Typer) -> None:
    app.command("export")(export)
