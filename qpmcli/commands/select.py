"""``qpm select``: choose features and the class-feature assignment from a run or a problem file."""

from __future__ import annotations

from pathlib import Path

import typer

from qpmcli.commands._common import JsonFlag, console, print_json
from qpmcli.errors import SelectionError


def select_cmd(
    run: Path = typer.Argument(None, help="Run directory with dense_features.npz (from qpm train)."),
    problem: Path = typer.Option(None, "--problem",
                                 help="Problem file: .npz with A (n_f x C), R (n_f x n_f), optional class_names."),
    selector: str = typer.Option("qpm", "--selector", help="qpm, topk, sldd or qsenn (see qpm plugins)."),
    features: int = typer.Option(50, "--features", help="Number of selected features K."),
    per_class: int = typer.Option(5, "--per-class", help="Features per class k."),
    time_limit: float = typer.Option(60.0, "--time-limit", help="Solver time limit in seconds."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed + workers = same result)."),
    workers: int = typer.Option(8, "--workers", help="CP-SAT worker threads."),
    out: Path = typer.Option(None, "--out", help="Selection JSON to write (default: RUN/selection.json)."),
    json_out: bool = JsonFlag,
) -> None:
    """Select K features and assign k of them to every class; writes the selection JSON."""
    from qpmcli.selection import load_problem_npz, problem_from_run, save_selection, select, selection_summary

    if (run is None) == (problem is None):
        raise SelectionError("give either a run directory or --problem FILE (not both)")
    prob = problem_from_run(run) if run is not None else load_problem_npz(problem)
    if out is None:
        out = (run / "selection.json") if run is not None else Path("selection.json")
    sel = select(prob, selector=selector, n_features=features, per_class=per_class, time_limit=time_limit,
                 seed=seed, workers=workers, progress=not json_out)
    save_selection(sel, out, class_names=prob.class_names)
    summary = selection_summary(sel)
    summary["out"] = str(out)
    if json_out:
        print_json(summary)
        return
    gap = "-" if sel.gap is None else f"{100 * sel.gap:.3f}%"
    obj = "-" if sel.objective is None else f"{sel.objective:.4f}"
    bound = "-" if sel.bound is None else f"{sel.bound:.4f}"
    console().print(f"{selector}: {features} features, {per_class} per class, status {sel.status}, objective {obj}, "
                    f"bound {bound}, gap {gap}, {sel.seconds:.1f} s -> {out}")


def register(app: typer.Typer) -> None:
    app.command("select")(select_cmd)
