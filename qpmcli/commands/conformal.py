"""``qpm conformal [RUN] --alpha 0.1 --score lac|aps|hier``: calibrate prediction sets with a coverage guarantee."""

from __future__ import annotations

import typer

from qpmcli.commands._common import Device, JsonFlag, Quiet, Seed, console, print_json


def conformal(
    run: str = typer.Argument(None, help="Run directory written by `qpm train` (default: QPM_MODEL, else the "
                                         "current run)."),
    alpha: float = typer.Option(0.1, "--alpha", help="Miscoverage: sets hold the true class with probability "
                                                     "1 - alpha (0.1 -> 90 % sets)."),
    score: str = typer.Option("lac", "--score", help="lac (1 - p), aps (cumulative probability) or hier (classes "
                                                     "that share the predicted class's leading features); several "
                                                     "comma-separated (lac,aps,hier) calibrate in one pass."),
    per_class: bool = typer.Option(False, "--per-class/--marginal",
                                   help="One threshold per class: the coverage holds for every class."),
    cal_fraction: float = typer.Option(None, "--cal-fraction",
                                       help="For a run without a held-out calibration split: the share of its "
                                            "training images to calibrate on (default 0.2; seen in training, so "
                                            "without a guarantee)."),
    seed: int = Seed,
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward pass over the caches."),
    device: str = Device,
    quiet: bool = Quiet,
    json_out: bool = JsonFlag,
) -> None:
    """Calibrate prediction sets on the run's cached outputs and measure them on its test split at once; the
    calibration goes into RUN/conformal.json (and from there into `qpm export`, predict and explain)."""
    from qpmcli.calibrate import ConformalRequest, run_conformal
    from qpmcli.commands._common import say, settings_from_flags
    from qpmcli.current import resolve_model

    req = ConformalRequest(alpha=alpha, score=score, per_class=per_class, cal_fraction=cal_fraction,
                           seed=0 if seed is None else seed, batch_size=batch_size).checked(run=False)
    settings = settings_from_flags(device=device, seed=seed, device_check="torch")
    target = resolve_model(settings, run, run_only=True)
    req = req.with_run(str(target.path), seed=int(settings.seed)).checked()
    if not quiet:
        say(target.line("calibrating"))
    result = run_conformal(req, settings, progress=not (quiet or json_out),
                           log=None if (quiet or json_out) else say)
    if json_out:
        print_json(result)
        return
    for entry in result["results"]:
        print_calibration(result, entry)
    out = console()
    e = result["calibration"]
    out.print(f"saved to {result['file']} ({result['calibrations']} calibration(s)); use it with "
              f"`qpm predict IMG --coverage {e['coverage']:g}`" + (f" (the last one calibrated, {e['score']}; "
                                                                  f"--set-score chooses)" if
                                                                  len(result["results"]) > 1 else ""),
              highlight=False)


def print_calibration(result: dict, e: dict) -> None:
    """One calibration and its test measurement, a few lines."""
    out = console()
    names = result["class_names"]
    level = f", level L = {e['level']} (chosen on {e['n_level']} images)" if e.get("level") is not None else ""
    out.print(f"[bold]{result['run']}[/]: alpha {e['alpha']:g} (coverage {e['coverage']:g}), score {e['score']}"
              f"{level}{', per class' if e['per_class'] else ''}", highlight=False)
    src = e["source"]
    kind = "held-out calibration" if src["held_out"] else "training"
    if e["per_class"]:
        few = [names[c] for c in e["too_few_classes"]]
        out.print(f"thresholds for {len(names) - len(few)} of {len(names)} classes from {e['n']} {kind} images",
                  highlight=False)
        if few:
            out.print(f"[yellow]too few calibration images for {len(few)} class(es) ({', '.join(few[:5])}"
                      f"{', ...' if len(few) > 5 else ''}): they need {e['minimum_n']} each at alpha {e['alpha']:g}, "
                      f"so they are in every set[/]", highlight=False)
    elif e["too_few"]:
        out.print(f"[yellow]too few calibration images: {e['n']} < {e['minimum_n']} needed at alpha {e['alpha']:g}; "
                  f"every set is every class[/]", highlight=False)
    else:
        out.print(f"threshold {e['threshold']:.6g}: the {_ordinal(e['rank'])} smallest of {e['n']} {kind} images' "
                  f"scores", highlight=False)
    t = e["test"]
    out.print(f"test split: coverage [bold]{t['coverage']:.3f}[/] on {t['n']} images, mean set size "
              f"{t['set_size']:.2f}, empty {100 * t['empty']:.1f} %, worst class {names[t['worst_class']]} "
              f"{t['worst_class_coverage']:.3f}"
              + (f", coherence {t['set_coherence']:.2f}" if t.get("set_coherence") is not None else ""),
              highlight=False)
    if not src["held_out"]:
        out.print(f"[yellow]no guarantee: {src['note']}[/]", highlight=False)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def register(app: typer.Typer) -> None:
    app.command("conformal")(conformal)
