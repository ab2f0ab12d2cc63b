"""``qpm predict IMAGE_OR_DIR... --model (RUN | model.onnx)``: top-k classes and the features behind them."""

from __future__ import annotations

import typer

from qpmcli import checks
from qpmcli import options as opts
from qpmcli.commands._common import JsonFlag, Quiet, Weights, WeightsDir, console, print_json, set_line


def predict(
    inputs: list[str] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    model: str = opts.model_opt(),
    top_k: int = typer.Option(5, "--top-k", help="Classes to list per image."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per inference batch."),
    device: str = opts.device_opt(tensorrt=True),
    weights: str = Weights,
    weights_dir: str = WeightsDir,
    coverage: float = opts.coverage_opt(),
    set_score: str = opts.set_score_opt(),
    quiet: bool = Quiet,
    json_out: bool = JsonFlag,
) -> None:
    """Classify images; unreadable images are reported per file and do not stop the others. With --coverage, each
    image also gets its prediction set (calibrated by `qpm conformal`)."""
    from qpmcli.commands._common import ort_device, say, settings_from_flags
    from qpmcli.current import resolve_model
    from qpmcli.errors import ImageError

    settings = settings_from_flags(weights_dir=weights_dir, device_check=None)
    device = ort_device(device, settings)
    checks.check_positive(top_k, "--top-k")
    checks.check_positive(batch_size, "--batch-size")
    opts.check_set_options(coverage, set_score)
    target = resolve_model(settings, model)
    if not quiet:  # -q: nothing on stderr but errors
        say(target.line())
    from qpmcli.predict import predict as run_predict

    result = run_predict(inputs, str(target.path), top_k=top_k, batch_size=batch_size, device=device,
                         weights=weights, settings=settings, progress=not quiet and not json_out,
                         coverage=coverage, set_score=set_score)
    if result["num_failed"] == result["num_images"]:  # nothing to show but why: one line
        first = next((p["error"] for p in result["predictions"] if "error" in p), "")
        raise ImageError(f"none of the {result['num_images']} images could be read; first: {first}")
    if json_out:
        print_json(result)
    else:
        _print_result(result)


def _print_result(result: dict) -> None:
    from rich.markup import escape

    out = console()
    err = console(stderr=True)
    for p in result["predictions"]:
        if "error" in p:
            err.print(f"[red]{p['path']}: {p['error']}[/red]", highlight=False)
            continue
        top = p["top_k"][0]
        others = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in p["top_k"][1:])
        feats = escape(", ".join(f"{f['label']} {f['contribution']:+.2f}" for f in p["features"]))
        out.print(f"{p['path']}: [bold]{top['class']}[/bold] {top['probability']:.3f}"
                  + (f"  (then {others})" if others else "") + f"\n    features: {feats}", highlight=False)
        if "set_detail" in p:
            out.print("    " + set_line(p["set_detail"]), highlight=False, markup=False)
    out.print(f"{result['num_images'] - result['num_failed']} of {result['num_images']} images classified with "
              f"{result['kind']} ({result['provider']}, {result.get('precision', 'fp32')})", highlight=False)
    cal = result.get("calibration")
    if cal:
        source = cal.get("source") or {}
        test = cal.get("test") or {}
        line = (f"sets: {cal['score']} calibrated on {cal['n']} images; test coverage {test.get('coverage', 0):.3f}, "
                f"mean size {test.get('set_size', 0):.2f}")
        if not source.get("held_out"):
            line += " (calibration images were seen in training: no guarantee)"
        out.print(line, highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
