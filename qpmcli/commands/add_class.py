"""``qpm add-class NAME IMG_DIR [RUN] -o NEW_RUN``: a new class from a few images; old classes untouched."""

from __future__ import annotations

from typing import Any

import typer

from qpmcli import options as opts
from qpmcli.commands._common import JsonFlag, Quiet, console, print_json


def add_class(
    name: str = typer.Argument(..., help="The new class's name."),
    images: str = typer.Argument(..., metavar="IMG_DIR", help="A folder with a few images of the new class."),
    run: str = typer.Argument(None, help="The run to extend (default: QPM_MODEL, else the current run). Never "
                                         "changed."),
    out: str = opts.out_opt(None, "The new run's folder (required)."),
    bias: bool = typer.Option(True, "--bias/--no-bias",
                              help="Fit the new class's bias against the old classes (old classes keep none)."),
    metrics: str = typer.Option("Accuracy", "--metrics", autocompletion=opts.complete_metrics,
                                help="Metrics of the new run on the old test set (as qpm evaluate; 'none': skip)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per batch."),
    force: bool = typer.Option(False, "--force", help="Replace an output folder that holds other files."),
    current: bool = typer.Option(True, "--current/--no-current", help="Make the new run the current run."),
    device: str = opts.device_opt(),
    quiet: bool = Quiet,
    json_out: bool = JsonFlag,
) -> None:
    """Add a class chosen from a few images: k of the model's selected features (an exact choice; no two classes
    share a set) and a bias; backbone, adapter and old classes stay as they are (bit-identical logits)."""
    from qpmcli.addclass import AddClassRequest, run_add_class
    from qpmcli.commands._common import say, settings_from_flags
    from qpmcli.current import resolve_model

    settings = settings_from_flags(device=device, device_check="torch")
    target = resolve_model(settings, run, run_only=True)
    req = AddClassRequest(name=name, images=images, run=str(target.path), out=out, bias=bias, metrics=metrics,
                          force=force, device=settings.device, batch_size=batch_size).checked()
    if not quiet and not json_out:
        say(target.line("adding a class to"))
    err = console(stderr=True)
    summary = run_add_class(req, settings, progress=not (quiet or json_out),
                            log=None if (json_out or quiet) else (lambda m: err.print(m, highlight=False)))
    if current:
        from qpmcli.current import set_current

        set_current(settings, summary["run"], by="add-class")
        summary["current"] = True
    if json_out:
        print_json(summary)
        return
    print_add_class(summary)


def print_add_class(summary: dict[str, Any]) -> None:
    out = console()
    cls = summary["class"]
    out.print(f"new run {summary['run']}: class {cls['name']!r} (index {cls['index']}) from {len(cls['images'])} "
              f"image(s), {summary['seconds']:.2f} s", highlight=False)
    out.print("features: " + ", ".join(f"{f['label']} ({f['value']:+.3f})" for f in summary["features"]),
              highlight=False)
    near = summary["nearest"]
    out.print(f"nearest existing class: shares {near['shares']} with {near['class']!r}", highlight=False)
    if summary.get("bias"):
        b = summary["bias"]
        out.print(f"bias {b['bias']:+.3f} (margin {b['margin']:.3f}): wins {100 * b['given_recall']:.0f}% of the "
                  f"given images and {b['train_images_taken']} of {b['train_images']} old training images",
                  highlight=False)
    o = summary["old_classes"]
    out.print(f"old test set: accuracy {100 * o['accuracy_before']:.1f}% -> {100 * o['accuracy_after']:.1f}% "
              f"({o['taken_by_new_class']} image(s) now go to the new class); old logits "
              f"{'bit-identical' if o['identical'] else 'CHANGED'}", highlight=False)
    for note in summary.get("notes") or []:
        out.print(f"note: {note}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("add-class")(add_class)
