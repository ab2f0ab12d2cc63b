"""``qpm select``: choose features and the class-feature assignment from a run or a problem file."""

from __future__ import annotations

from pathlib import Path

import typer

from qpmcli import checks
from qpmcli import options as opts
from qpmcli.artifact import MODEL_JSON, SELECTION, STALE
from qpmcli.commands._common import JsonFlag, Quiet, Seed, console, print_json
from qpmcli.errors import SelectionError


def select_cmd(
    run: Path = typer.Argument(None, help="Run directory with dense_features.npz (default: the current run)."),
    problem: Path = typer.Option(None, "--problem",
                                 help="Problem file: .npz with A (n_f x C), R (n_f x n_f), optional class_names."),
    selector: str = opts.selector_opt("qpm"),
    features: int = typer.Option(50, "--features", help="Number of selected features K."),
    per_class: int = typer.Option(5, "--per-class", help="Features per class k."),
    time_limit: float = typer.Option(60.0, "--time-limit", help="Solver time limit in seconds."),
    seed: int = Seed,
    workers: int = typer.Option(8, "--workers", help="CP-SAT worker threads."),
    bound: str = typer.Option(None, "--bound", help="qpm selector's certified bound: lp (LP + clique cuts), sdp "
                                                    "(semidefinite, SCS) or auto (sdp for large problems given "
                                                    ">= 60 s; the default). Short for --selector-option bound=..."),
    selector_option: list[str] = opts.selector_option_opt(),
    threshold_rule: str = typer.Option("reference", "--threshold-rule",
                                       help="Redundancy threshold: reference (the paper's procedure) or greedy-bisect "
                                            "(qpm's earlier rule; see docs/method-notes.md)."),
    out: Path = opts.out_opt(None, "Selection JSON to write (default: RUN/selection-<selector>.json, or "
                                   "./selection-<selector>.json with --problem)."),
    force: bool = typer.Option(False, "--force",
                               help="Replace the run's own selection.json (the finetuned model is then marked stale)."),
    quiet: bool = Quiet,
    json_out: bool = JsonFlag,
) -> None:
    """Select K features and assign k of them to every class; writes the selection JSON (never silently the run's
    own selection.json: that needs --force)."""
    from qpmcli.commands._common import say, settings_from_flags
    from qpmcli.registry import declared_options, get_registry
    from qpmcli.selection import SelectRequest

    settings = settings_from_flags(seed=seed, device_check=None)
    selector_options = opts.parse_plugin_options("selector", selector, selector_option)
    if bound is not None:  # short for --selector-option bound=...: the selector's declared option `bound`
        declared = declared_options("selector", get_registry().get("selector", selector)) or {}
        if "bound" not in declared:
            raise SelectionError(f"--bound applies to selectors with a certified bound (qpm), not {selector!r}")
        checks.check_choice(bound, declared["bound"].choices, "--bound")
        if selector_options.get("bound", bound) != bound:
            raise SelectionError(f"--bound {bound} and --selector-option bound={selector_options['bound']} differ; "
                                 f"give one")
        selector_options["bound"] = bound
    req = SelectRequest(selector=selector, n_features=features, per_class=per_class, time_limit=time_limit,
                        seed=settings.seed, workers=workers, selector_options=selector_options,
                        threshold_rule=threshold_rule).checked()
    if run is not None and problem is not None:
        raise SelectionError("give either a run directory or --problem FILE (not both)")
    if run is None and problem is None:
        from qpmcli.current import NO_RUN_HINT, read_pointer, resolve_model

        if settings.model is None and read_pointer(settings) is None:
            raise SelectionError(f"give either a run directory or --problem FILE (there is no current run yet: "
                                 f"{NO_RUN_HINT})")
        target = resolve_model(settings, None, run_only=True)
        run = target.path
        if not quiet:  # -q: nothing on stderr but errors
            say(target.line("selecting for"))
    own = None if run is None else (run / SELECTION)
    if out is None:
        name = f"selection-{selector}.json"
        out = own if (force and own is not None) else ((run / name) if run is not None else Path(name))
    checks.check_out_file(out, "--out")
    replacing = own is not None and out.resolve() == own.resolve() and own.exists()
    if replacing and not force:
        raise SelectionError(f"{own} is the run's own selection (its finetuned model was trained on it); pass --force "
                             f"to replace it, or choose another --out")
    is_own = own is not None and out.resolve() == own.resolve()
    checks.check_not_run_file(out, "--out", allow=(SELECTION,) if is_own else ())  # model.json, config.json, ...
    from qpmcli.selection import load_problem_npz, problem_from_run, save_selection, select, selection_summary

    prob = (problem_from_run(run, threshold_rule=req.threshold_rule) if run is not None
            else load_problem_npz(problem, threshold_rule=req.threshold_rule))
    req.checked(prob.n_classes, prob.n_features_total)  # the sizes against this problem, before solving
    sel = select(prob, **req.solver_options(), progress=not (json_out or quiet))
    from qpmcli.files import clean_stale_temps

    clean_stale_temps([Path(out).parent])  # what a killed select left beside its output
    save_selection(sel, out, class_names=prob.class_names)
    summary = selection_summary(sel)
    summary["out"] = str(out)
    if replacing and (run / MODEL_JSON).is_file():
        from qpmcli.artifact import RunFolder

        RunFolder(run).mark_stale("selection.json was replaced by `qpm select --force` after the model was "
                                  "finetuned on the previous selection", selection=str(out))
        summary["stale"] = True
        say(f"{run}: model.safetensors was finetuned on the previous selection and is now marked stale "
            f"({run / STALE}); `qpm runs` shows it")
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
