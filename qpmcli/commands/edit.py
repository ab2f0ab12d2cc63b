"""``qpm edit [RUN] -o NEW_RUN``: change the features of classes (drop, set, swap), refit, verify; a new run."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand

from qpmcli import options as opts
from qpmcli.commands._common import JsonFlag, Quiet, console, print_json

SWAP_JOIN = "\x1f"  # joins the three values of one --swap (see SwapCommand)


class SwapCommand(TyperCommand):
    """``--swap CLASS OLD NEW`` takes three values and may repeat, which Typer cannot declare (a list of tuples):
    each ``--swap`` and the three arguments after it are joined into one value before Click parses them."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        out, i = [], 0
        while i < len(args):
            if args[i] == "--swap" and len(args) - i >= 4:
                out += ["--swap", SWAP_JOIN.join(args[i + 1:i + 4])]
                i += 4
            else:
                out.append(args[i])
                i += 1
        return super().parse_args(ctx, out)


def split_swaps(values: list[str] | None) -> tuple[tuple[str, str, str], ...]:
    from qpmcli.errors import ConfigError

    out = []
    for v in values or []:
        parts = v.split(SWAP_JOIN)
        if len(parts) != 3:
            raise ConfigError(f"--swap takes three values, CLASS OLD NEW (got {' '.join(parts)!r})")
        out.append((parts[0], parts[1], parts[2]))
    return tuple(out)


def edit(
    run: str = typer.Argument(None, help="The run to edit (default: QPM_MODEL, else the current run). Never changed."),
    out: str = opts.out_opt(None, "The new run's folder (required)."),
    drop_feature: list[str] = typer.Option(None, "--drop-feature", metavar="F",
                                           help="Remove feature F from every class (repeatable); each affected class "
                                                "gets a replacement chosen by the selection objective."),
    set_row: list[str] = typer.Option(None, "--set", metavar="CLASS=f1,f2,...",
                                      help="Give CLASS exactly these k selected features (repeatable)."),
    swap: list[str] = typer.Option(None, "--swap", metavar="CLASS OLD NEW",
                                   help="CLASS uses selected feature NEW instead of OLD (repeatable)."),
    refill: bool = typer.Option(True, "--refill/--no-refill",
                                help="Replace a dropped feature in each class that used it (--no-refill: those "
                                     "classes keep k-1 features)."),
    refill_from: str = typer.Option("all", "--refill-from",
                                    help="all: a replacement may be any dense feature (an unselected one takes the "
                                         "dropped feature's column); selected: only features the model has."),
    allow_redundant: bool = typer.Option(False, "--allow-redundant",
                                         help="Let a replacement be redundant with a dropped feature (R >= tau, the "
                                              "selection's redundancy test); by default such features are excluded."),
    refit: int = typer.Option(0, "--refit", metavar="EPOCHS",
                              help="Finetune the adapter this many epochs on the cached tokens, W fixed."),
    verify: bool = typer.Option(False, "--verify", help="Compare with the parent on the test cache: accuracy per "
                                                        "class, changed predictions, reliance on removed features."),
    metrics: str = typer.Option("Accuracy", "--metrics", autocompletion=opts.complete_metrics,
                                help="Metrics of the new run (as qpm evaluate; 'none': skip)."),
    seed: int = typer.Option(None, "--seed", help="Seed of the refit (default: the parent run's seed)."),
    force: bool = typer.Option(False, "--force", help="Replace an output folder that holds other files."),
    current: bool = typer.Option(True, "--current/--no-current", help="Make the new run the current run."),
    device: str = opts.device_opt(),
    quiet: bool = Quiet,
    json_out: bool = JsonFlag,
) -> None:
    """Edit which features the classes use and write the result as a new run (the parent is never changed).
    Operations apply in the order --set, --swap, --drop-feature; every constraint is checked before any work."""
    from qpmcli.commands._common import say, settings_from_flags
    from qpmcli.current import resolve_model
    from qpmcli.edit import EditRequest, run_edit

    settings = settings_from_flags(device=device, device_check="torch")
    target = resolve_model(settings, run, run_only=True)
    req = EditRequest(run=str(target.path), out=out, sets=tuple(set_row or ()), swaps=split_swaps(swap),
                      drop=tuple(drop_feature or ()), refill=refill, refill_from=refill_from,
                      allow_redundant=allow_redundant, refit=refit, verify=verify, metrics=metrics, seed=seed,
                      force=force, device=settings.device).checked()
    if not quiet and not json_out:
        say(target.line("editing"))
    err = console(stderr=True)
    summary = run_edit(req, settings, progress=not (quiet or json_out),
                       log=None if (json_out or quiet) else (lambda m: err.print(m, highlight=False)))
    if current:
        from qpmcli.current import set_current

        set_current(settings, summary["run"], by="edit")
        summary["current"] = True
    if json_out:
        print_json(summary)
        return
    print_edit(summary)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}"


def print_edit(summary: dict[str, Any]) -> None:
    """The diff, the replacements, the refit and (with --verify) the before/after report."""
    from rich.table import Table

    out = console()
    out.print(f"new run {summary['run']} (parent {summary['parent']['path']}, "
              f"{summary['seconds']:.2f} s)", highlight=False)
    table = Table(title="class-feature changes", title_justify="left")
    for col in ("class", "removed", "added"):
        table.add_column(col)
    for d in summary["diff"]:
        table.add_row(d["class"], ", ".join(f"f{f}" for f in d["removed"]) or "-",
                      ", ".join(f"f{f}" for f in d["added"]) or "-")
    out.print(table)
    for r in summary.get("refill") or []:
        out.print(f"refill: class {r['class']} gets f{r['feature']} ({r['source']}, objective gain "
                  f"{r['value']:.3f})", highlight=False)
    if summary.get("unused_features"):
        out.print("features no class uses (kept as zero columns): "
                  + ", ".join(f"f{f}" for f in summary["unused_features"]), highlight=False)
    if summary.get("objective"):
        o = summary["objective"]
        out.print(f"selection objective {o['before']:.3f} -> {o['after']:.3f}", highlight=False)
    if summary.get("refit"):
        last = (summary["refit"]["history"] or [{}])[-1]
        out.print(f"refit: {summary['refit']['epochs']} epoch(s) in {summary['refit']['seconds']:.1f} s, train acc "
                  f"{_pct(last.get('train_acc'))}%, test acc {_pct(last.get('test_acc'))}%", highlight=False)
    if summary.get("metrics"):
        out.print("metrics: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in summary["metrics"].items()), highlight=False)
    for note in summary.get("notes") or []:
        out.print(f"note: {note}", highlight=False)
    v = summary.get("verify")
    if not v:
        return
    table = Table(title=f"verify on {v['n']} test images: accuracy {_pct(v['accuracy']['before'])}% -> "
                        f"{_pct(v['accuracy']['after'])}%", title_justify="left")
    for col in ("class", "n", "before %", "after %"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for r in v["per_class"]:
        table.add_row(r["class"], str(r["n"]), _pct(r["before"]), _pct(r["after"]))
    out.print(table)
    out.print(f"{v['n_changed']} prediction(s) changed", highlight=False)
    for c in v["changed"][:10]:
        out.print(f"  test image {c['index']} ({c['label']}): {c['before']} -> {c['after']}", highlight=False)
    for r in v["reliance"]:
        out.print(f"reliance of {r['class']} on f{r['feature']}: {_pct(r['before'])}% -> {_pct(r['after'])}% of its "
                  f"evidence", highlight=False)
    same = v.get("unedited_logits")
    if same:
        out.print(f"logits of the {same['classes']} unedited classes: "
                  f"{'bit-identical' if same['identical'] else 'CHANGED'}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("edit", cls=SwapCommand)(edit)
