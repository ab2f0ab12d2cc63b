"""``qpm name-features [RUN]``: name every selected feature by the attributes it fires on (RUN/feature_names.json)."""

from __future__ import annotations

import typer

from qpmcli.commands._common import Device, JsonFlag, Quiet, Seed, console, print_json


def name_features(
    run: str = typer.Argument(None, help="Run directory written by `qpm train` (default: QPM_MODEL, else the "
                                         "current run)."),
    top: int = typer.Option(3, "--top", help="Names to keep per feature (best first)."),
    min_support: int = typer.Option(10, "--min-support",
                                    help="Least training images with the attribute, and without it, for a name."),
    bootstrap: int = typer.Option(200, "--bootstrap", help="Resamples of the training images that check each name "
                                                           "is stable (0: no check)."),
    min_stability: float = typer.Option(0.7, "--min-stability",
                                        help="Least fraction of resamples in which a name keeps its rank."),
    attributes: str = typer.Option(None, "--attributes", metavar="FILE.csv",
                                   help="Attribute labels of the training images: a CSV with the columns image, "
                                        "attribute, present[, known] (default: the run's dataset's own labels)."),
    set_names: list[str] = typer.Option(None, "--set", metavar="FEATURE=NAME",
                                        help="Name a feature yourself (repeatable); your name wins and is marked. "
                                             "FEATURE= removes your name. With an existing names file nothing else "
                                             "is recomputed."),
    seed: int = Seed,
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward pass."),
    device: str = Device,
    quiet: bool = Quiet,
    json_out: bool = JsonFlag,
) -> None:
    """Name each selected feature by the attributes its training images show (support, bootstrap stability), or by
    hand with --set; explain, predict, serve and exported ONNX files then show the names."""
    from qpmcli.commands._common import say, settings_from_flags
    from qpmcli.current import resolve_model
    from qpmcli.naming import NameRequest, parse_name_sets

    settings = settings_from_flags(device=device, seed=seed, device_check="torch")
    req = NameRequest(run="", top=top, min_support=min_support, bootstrap=bootstrap, min_stability=min_stability,
                      attributes=attributes, sets=parse_name_sets(set_names), seed=int(settings.seed),
                      device=device, batch_size=batch_size).checked()
    target = resolve_model(settings, run, run_only=True)
    req.run = str(target.path)
    if not quiet:  # -q: nothing on stderr but errors
        say(target.line("naming the features of"))
    from qpmcli.naming import run_name_features

    result = run_name_features(req, settings, progress=not (quiet or json_out),
                               log=None if (quiet or json_out) else say)
    if json_out:
        print_json(result)
        return
    _print_result(result)


def _print_result(result: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"features of {result['run']}, named from {result['source'] or 'your names only'}"),
                  title_justify="left")
    table.add_column("feature", justify="right")
    table.add_column("names (best first)")
    table.add_column("support", justify="right")
    table.add_column("stability", justify="right")
    for e in result["features"]:
        if not e["names"]:
            table.add_row(f"f{e['feature']}", f"[dim]{escape(e.get('note') or 'no name')}[/dim]", "", "")
            continue
        names = [escape(f"{n} (yours)" if (i == 0 and e["user"]) else n) for i, n in enumerate(e["names"])]
        support = ["" if v is None else str(v) for v in e["support"]]
        stability = ["" if v is None else f"{v:.2f}" for v in e["stability"]]
        table.add_row(f"f{e['feature']}", "\n".join(names), "\n".join(support), "\n".join(stability))
    out = console()
    out.print(table)
    out.print(f"{result['named']} of {len(result['features'])} features named; saved to {result['path']} "
              f"({result['seconds']:.1f} s). Names show in qpm explain, predict and serve, and in models exported "
              f"from now on.", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("name-features")(name_features)
