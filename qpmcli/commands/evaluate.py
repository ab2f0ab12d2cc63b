"""``qpm evaluate``: accuracy and the interpretability metrics of a trained run, saved in its metrics.json."""

from __future__ import annotations

import typer

from qpmcli import checks
from qpmcli import options as opts
from qpmcli.commands._common import Device, JsonFlag, Quiet, console, print_json

# How the paper shows each metric: fractions become percentages, counts stay counts.
_COUNTS = ("NFeatures", "PerClass", "Pooling-Ratio", "Alignment", "Set-Size")


def evaluate(
    run: str = typer.Argument(None, help="Run directory written by `qpm train` (default: QPM_MODEL, else the "
                                         "current run)."),
    metrics: str = typer.Option("all", "--metrics", help="all, fast, essential, or metric names (comma separated), "
                                "e.g. Accuracy,SID@5,Plausibility.", autocompletion=opts.complete_metrics),
    stage: str = typer.Option("final", "--stage", help="final (the QPM model) or dense (the dense model)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward pass."),
    coverage: float = typer.Option(None, "--coverage", help="The calibration (of `qpm conformal`) whose prediction "
                                   "sets Coverage, Set-Size and Set-Coherence measure, e.g. 0.9 (default: the "
                                   "last one calibrated)."),
    set_score: str = opts.set_score_opt(),
    device: str = Device,
    quiet: bool = Quiet,
    json_out: bool = JsonFlag,
) -> None:
    """Compute the accuracy and interpretability metrics of a run and merge them into RUN/metrics.json."""
    from qpmcli.commands._common import say, settings_from_flags
    from qpmcli.current import resolve_model

    checks.check_choice(stage, ("final", "dense"), "--stage")
    checks.check_positive(batch_size, "--batch-size")
    from qpmcli.metricnames import checked_metric_names

    checked_metric_names(metrics)
    opts.check_set_options(coverage, set_score)
    settings = settings_from_flags(device=device, device_check="torch")
    target = resolve_model(settings, run, run_only=True)
    if not quiet:  # -q: nothing on stderr but errors
        say(target.line("evaluating"))
    from qpmcli.evaluate import evaluate_run

    result = evaluate_run(str(target.path), metrics, stage=stage, batch_size=batch_size,
                          progress=not (quiet or json_out), settings=settings, coverage=coverage, set_score=set_score)
    if json_out:
        print_json(result)
        return
    from rich.table import Table

    table = Table(title=f"{result['run']} ({stage}, {result['n_test']} test images, {result['device']})",
                  title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("paper scale", justify="right")
    for name, value in result["metrics"].items():
        if value is None:
            table.add_row(name, "n/a", "not applicable")
        elif name in _COUNTS:
            table.add_row(name, f"{value:.4g}", f"{value:.2f}")
        else:
            table.add_row(name, f"{value:.4f}", f"{100 * value:.1f} %")
    out = console()
    out.print(table)
    for note in result["notes"]:
        out.print(f"note: {note}")
    known = [a for a in result.get("per_class_accuracy") or [] if a is not None]
    if known:
        median = sorted(known)[len(known) // 2]
        out.print(f"per-class accuracy: lowest {100 * min(known):.1f} %, median {100 * median:.1f} % over "
                  f"{len(known)} classes (every class: --json, per_class_accuracy)", highlight=False)
    cal = result.get("calibration")
    if cal:
        out.print(f"prediction sets: coverage {cal['coverage']:g}, score {cal['score']}"
                  + (f", level {cal['level']}" if cal.get("level") is not None else "")
                  + (", per class" if cal.get("per_class") else ""), highlight=False)
    out.print(f"saved to {result['run']}/metrics.json ({result['seconds']:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
