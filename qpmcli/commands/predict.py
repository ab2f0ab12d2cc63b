"""``qpm predict IMAGE_OR_DIR... --model (RUN | model.onnx)``: top-k classes and the features behind them."""

from __future__ import annotations

import typer

from qpmcli.commands._common import JsonFlag, WeightsDir, console, print_json


def predict(
    inputs: list[str] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    model: str = typer.Option(..., "--model", "-m", help="Run directory or exported .onnx file."),
    top_k: int = typer.Option(5, "--top-k", help="Classes to list per image."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per inference batch."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda[:N], tensorrt."),
    weights: str = typer.Option(None, "--weights", help="Backbone weights (run directories / adapter graphs)."),
    weights_dir: str = WeightsDir,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    json_out: bool = JsonFlag,
) -> None:
    """Classify images; unreadable images are reported per file and do not stop the others."""
    from qpmcli.errors import ImageError
    from qpmcli.predict import predict as run_predict
    from qpmcli.settings import resolve_settings

    settings, _ = resolve_settings(weights_dir=weights_dir)
    result = run_predict(inputs, model, top_k=top_k, batch_size=batch_size, device=device, weights=weights,
                         settings=settings, progress=not quiet and not json_out)
    if json_out:
        print_json(result)
    else:
        _print_result(result)
    if result["num_failed"] == result["num_images"]:
        raise ImageError(f"none of the {result['num_images']} images could be read")


def _print_result(result: dict) -> None:
    out = console()
    err = console(stderr=True)
    for p in result["predictions"]:
        if "error" in p:
            err.print(f"[red]{p['path']}: {p['error']}[/red]", highlight=False)
            continue
        top = p["top_k"][0]
        others = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in p["top_k"][1:])
        feats = ", ".join(f"f{f['feature']} {f['contribution']:+.2f}" for f in p["features"])
        out.print(f"{p['path']}: [bold]{top['class']}[/bold] {top['probability']:.3f}"
                  + (f"  (then {others})" if others else "") + f"\n    features: {feats}", highlight=False)
    out.print(f"{result['num_images'] - result['num_failed']} of {result['num_images']} images classified with "
              f"{result['kind']} ({result['provider']})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
