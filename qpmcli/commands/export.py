"""``qpm export RUN --onnx``: the whole classifier (and its adapter) as ONNX graphs with metadata."""

from __future__ import annotations

import typer

from qpmcli import checks
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
    from qpmcli.current import record_export, resolve_model
    from qpmcli.errors import ConfigError

    if not onnx:
        raise ConfigError("choose an export format: pass --onnx")
    settings = settings_from_flags(weights_dir=weights_dir, device=device)
    checks.check_out_file(out, "--out")
    if out is not None and not str(out).lower().endswith(".onnx"):
        raise ConfigError(f"--out {out}: the file name must end in .onnx")
    checks.check_positive(opset, "--opset", 7)
    int8_opts = _int8_options(int8, calibrate, calibrate_n, verify_images, min_agreement)
    target = resolve_model(settings, run, run_only=True)
    if not quiet:  # -q: nothing on stderr but errors
        say(target.line("exporting"))
    from qpmcli.export import export_onnx

    err = console(stderr=True)
    report = export_onnx(target.path, out, fp16=fp16, verify=verify, adapter=adapter, weights=weights,
                         settings=settings, opset=opset, check_images=check_images or None, device=settings.device,
                         log=None if (json_out or quiet) else (lambda m: err.print(m)),
                         **({"int8": int8_opts} if int8_opts is not None else {}))
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
    if report.get("int8"):
        from qpmcli.quantize import describe

        for line in describe(report["int8"]):
            out.print(line, highlight=False)


def _int8_options(int8: bool, calibrate: str | None, calibrate_n: int, verify_images: list[str] | None,
                  min_agreement: float) -> dict | None:
    """The ``int8=`` argument of ``export_onnx`` (None without --int8); int8-only flags without --int8 are errors."""
    import math

    from qpmcli.errors import ConfigError

    if not int8:
        for flag, given in (("--calibrate", calibrate is not None), ("--verify-images", bool(verify_images)),
                            ("--min-agreement", min_agreement != 0.99), ("--calibrate-n", calibrate_n != 64)):
            if given:
                raise ConfigError(f"{flag} needs --int8")
        return None
    if not (math.isfinite(min_agreement) and 0.0 <= min_agreement <= 1.0):
        raise ConfigError(f"--min-agreement must be between 0 and 1 (a share of images), not {min_agreement}")
    checks.check_positive(calibrate_n, "--calibrate-n")
    if calibrate is not None and calibrate != "train":
        from pathlib import Path

        if not Path(calibrate).expanduser().is_dir():
            raise ConfigError(f"--calibrate {calibrate}: expected 'train' or an existing folder of images")
    return {"calibrate": calibrate, "n_calibrate": calibrate_n, "verify_images": verify_images or None,
            "min_agreement": min_agreement}


def register(app: typer.Typer) -> None:
    app.command("export")(export)
