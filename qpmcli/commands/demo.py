"""``qpm demo``: the whole pipeline on embedded data and weights."""

from __future__ import annotations

import typer

from qpmcli import checks
from qpmcli import options as opts
from qpmcli.commands._common import Device, JsonFlag, Quiet, console, print_json
from qpmcli.demo import DEMO_TIME_LIMIT


def demo(
    out: str = opts.out_opt("qpm-demo", "Output folder (re-running continues where it stopped)."),
    quick: bool = typer.Option(False, "--quick/--no-quick", help="A smaller, faster run (smoke test)."),
    time_limit: float = typer.Option(DEMO_TIME_LIMIT, "--time-limit",
                                     help="Safety cap on the selection's seconds: the selection stops after a fixed "
                                          "amount of search work (the same tables however fast the machine is) long "
                                          "before."),
    current: bool = typer.Option(True, "--current/--no-current",
                                 help="Make the demo's QPM run the current run (for export/explain/predict)."),
    force: bool = typer.Option(False, "--force", help="Write the demo into a folder that holds other files."),
    device: str = Device,
    quiet: bool = Quiet,
    json_out: bool = JsonFlag,
) -> None:
    """Train, select, finetune, evaluate, export and explain on data and weights that ship with qpm (no downloads)."""
    import time

    from qpmcli.commands._common import settings_from_flags

    checks.check_time_limit(time_limit)
    checks.check_out_dir(out, "--out")
    settings = settings_from_flags(device=device, device_check="torch")
    from qpmcli.current import check_recordable, try_set_current
    from qpmcli.demo import TABLE_COLUMNS, check_demo_folder, run_demo

    check_demo_folder(out, force)  # never among the user's files
    if current:
        check_recordable(settings)  # record keeping that can fail goes first
    out_console = console(stderr=json_out)
    start = time.perf_counter()
    summary = run_demo(out, quick=quick, device=settings.device, time_limit=time_limit,
                       progress=not (quiet or json_out), force=force,
                       log=(lambda m: None) if quiet else (lambda m: out_console.print(m)))
    if current:
        warning = try_set_current(settings, summary["runs"]["qpm"], onnx=summary["onnx"], by="demo")
        if warning:
            out_console.print(warning, markup=False, highlight=False)
        else:
            summary["current"] = summary["runs"]["qpm"]
    summary["seconds"] = time.perf_counter() - start
    if json_out:
        print_json(summary)
        return
    from rich.table import Table

    table = Table(title="qpm demo: shapes dataset, EfficientNet-Lite0 (values in %)", title_justify="left")
    table.add_column("method", no_wrap=True)
    for _, label in TABLE_COLUMNS:
        table.add_column(label, justify="right")
    for row in summary["table"]:
        table.add_row(row["method"], *("n/a" if row[k] is None else f"{row[k]:.1f}" for k, _ in TABLE_COLUMNS))
    out_console.print(table)
    out_console.print("Acc accuracy, Plaus. plausibility (GradCAM mass in the dilated object mask), SID@5, Indep. "
                      "class-independence, Contr. contrastiveness, Ground. structural grounding; Dense = the QPM "
                      "model before selection (the paper's table has the same rows on CUB/Cars).")
    sel = summary.get("selection") or {}
    if sel:
        gap = sel.get("gap")
        out_console.print(f"selection ({sel.get('solver')}): {sel.get('status')}, "
                          f"objective {sel.get('objective'):.2f}, bound {sel.get('bound') or float('nan'):.2f}, gap "
                          f"{'n/a' if gap is None else f'{100 * gap:.1f}%'}, {sel.get('seconds', 0):.1f} s")
    if summary.get("feature_names"):
        out_console.print(f"features named by the parts they fire on: {summary['named']} "
                          f"(qpm name-features; {summary['feature_names']})", highlight=False)
    sets = summary.get("conformal") or []
    if sets:
        cols = "; ".join(f"{c['score']}{'' if c['level'] is None else ' (L=' + str(c['level']) + ')'} "
                         f"{c['coverage']:.3f} / {c['set_size']:.2f}" for c in sets)
        out_console.print(f"90 % prediction sets, held-out calibration: test coverage / mean set size: {cols}")
    exp = summary["export"]
    out_console.print(f"ONNX model: {summary['onnx']} (verified: {exp.get('verified', exp.get('verify'))})")
    figures = [f for img in summary["explanations"].get("images", [])
               for f in (img.get("figure") or img.get("png"), (img.get("set") or {}).get("figure"))]
    out_console.print(f"explanation figures: {', '.join(str(f) for f in figures if f)}")
    out_console.print(f"runs: {summary['runs']['qpm']} and {summary['runs']['linear_probe']}")
    out_console.print(f"finished in {summary['seconds']:.0f} s; everything is under {summary['out_dir']}")
    if summary.get("current"):
        out_console.print(f"current run: {summary['runs']['qpm']}; next: qpm export --onnx, qpm explain IMAGE, "
                          f"qpm predict IMAGE")
    if summary.get("serve"):
        out_console.print(f"explore the model in your browser: {summary['serve']}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
