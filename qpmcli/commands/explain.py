"""``qpm explain``: figures that show why an image got its class (local), how two classes differ (--compare), what
a class's features look like in the training data (--class), optionally as one self-contained HTML report."""

from __future__ import annotations

import typer

from qpmcli import checks
from qpmcli import options as opts
from qpmcli.commands._common import JsonFlag, Quiet, Weights, WeightsDir, console, print_json, set_line


def explain(
    images: list[str] = typer.Argument(None, help="Image files or folders (optional with --class)."),
    model: str = opts.model_opt(),
    out: str = opts.out_opt("explanations", "Output folder for figures and the report."),
    compare: str = typer.Option(None, "--compare", help="Contrast the explained class with this class."),
    class_name: str = typer.Option(None, "--class",
                                   help="Explain this class: its features' training prototypes, and the images "
                                        "with respect to it instead of their predicted class."),
    html: bool = typer.Option(False, "--html/--no-html", help="Also write one self-contained report.html."),
    top_k: int = typer.Option(5, "--top-k", help="Runner-up classes shown."),
    device: str = opts.device_opt(tensorrt=True),
    weights: str = Weights,
    weights_dir: str = WeightsDir,
    coverage: float = opts.coverage_opt(),
    set_score: str = opts.set_score_opt(),
    quiet: bool = Quiet,
    json_out: bool = JsonFlag,
) -> None:
    """Explain predictions: the class's 5 features, where they fire, and what they contribute to the logit. With
    --coverage, also the image's prediction set as a small tree (calibrated by `qpm conformal`)."""
    from qpmcli.commands._common import ort_device, say, settings_from_flags
    from qpmcli.current import resolve_model
    from qpmcli.errors import ConfigError

    settings = settings_from_flags(weights_dir=weights_dir, device_check=None)
    device = ort_device(device, settings)
    checks.check_positive(top_k, "--top-k")
    checks.check_out_dir(out, "--out")
    opts.check_set_options(coverage, set_score)
    if not images and not class_name:
        raise ConfigError("give at least one image (or --class NAME for a global explanation)")
    target = resolve_model(settings, model)
    if not quiet:  # -q: nothing on stderr but errors
        say(target.line())
    from qpmcli.explain import explain as run_explain

    summary = run_explain(images or [], str(target.path), out_dir=out, compare=compare, class_name=class_name,
                          html_report=html, device=device, top_k=top_k, progress=not quiet and not json_out,
                          weights=weights, settings=settings, coverage=coverage, set_score=set_score)
    if not quiet:
        for item in summary.get("skipped", []):
            say(f"skipped {item['image']}: {item['reason']}")
    if json_out:
        print_json(summary)
        return
    from rich.markup import escape

    con = console()
    labels = summary.get("feature_labels") or {}

    def listed(ids: list[int]) -> str:  # the model's feature labels ("f12 red circle")
        return escape(", ".join(str(labels.get(str(f), f)) for f in ids)) or "none"

    glob = summary.get("global")
    if glob:
        con.print(f"class [bold]{escape(glob['class'])}[/]: features {listed(glob['features'])} -> {glob['figure']}")
    for item in summary["images"]:
        if "error" in item:
            con.print(f"{escape(item['image'])}: [red]skipped[/] ({escape(item['error'])})")
            continue
        feats = escape(", ".join(f"{e['label']} ({e['contribution']:+.2f})" for e in item["features"]))
        con.print(f"{escape(item['image'])}: [bold]{escape(item['class_name'])}[/] p={item['probability']:.3f}  "
                  f"features {feats}")
        con.print(f"  -> {item['figure']}")
        if item.get("set"):
            con.print(f"  {escape(set_line(item['set']))} -> {item['set']['figure']}", highlight=False)
        c = item.get("compare")
        if c and "skipped" in c:
            con.print(f"  no contrastive view: {escape(c['skipped'])}")
        elif c:
            con.print(f"  vs {escape(c['class_b'])}: shared {listed(c['shared'])}; only A {listed(c['only_a'])}; "
                      f"only B {listed(c['only_b'])} -> {c['figure']}")
    if summary.get("html"):
        con.print(f"report: {summary['html']}")
    if summary.get("provider"):
        con.print(f"model: {summary['kind']} ({summary['provider']}, {summary.get('precision', 'fp32')})",
                  highlight=False)


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)
