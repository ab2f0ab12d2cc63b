"""``qpm train``: extract (if needed) -> dense -> select -> finetune -> evaluate, into one run directory."""

from __future__ import annotations

from typing import Any

import typer

from qpmcli import options as opts
from qpmcli.commands._common import DataRoot, Device, JsonFlag, Quiet, Seed, Weights, WeightsDir, console, print_json


def train(
    backbone: str = opts.backbone_opt("dinov2-vitb14-reg"),
    dataset: str = opts.dataset_opt("cub200"),
    data_root: str = DataRoot,
    weights: str = Weights,
    weights_dir: str = WeightsDir,
    selector: str = opts.selector_opt("qpm"),
    selector_option: list[str] = opts.selector_option_opt(),
    features: int = typer.Option(50, "--features", help="Number of selected features."),
    per_class: int = typer.Option(5, "--per-class", help="Features assigned to every class."),
    run_dir: str = typer.Option(None, "--run-dir", help="Run directory (default: <runs_dir>/<dataset>-<backbone>)."),
    time_limit: float = typer.Option(60.0, "--time-limit", help="Selection time limit in seconds."),
    seed: int = Seed,
    resume: bool = typer.Option(False, "--resume/--no-resume",
                                help="Continue an interrupted run; finished stages are skipped."),
    head: str = typer.Option("qpm", "--head", help="qpm (selection + finetune) or linear-probe (CLS, no MLP)."),
    dense_epochs: int = typer.Option(None, "--dense-epochs",
                                     help="Dense epochs (default 25; 40 for linear-probe, sldd and qsenn)."),
    finetune_epochs: int = typer.Option(None, "--finetune-epochs",
                                        help="Finetune epochs (default 25; 50 for sldd; qsenn follows its schedule)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Batch size of both phases (default 32 / 16)."),
    dense_lr: float = typer.Option(None, "--dense-lr", help="Dense learning rate (default 1e-3)."),
    finetune_lr: float = typer.Option(None, "--finetune-lr", help="Finetune learning rate (default 5e-3)."),
    layers: int = typer.Option(4, "--layers", help="MLP layers (0 = no MLP)."),
    hidden_size: int = typer.Option(2048, "--hidden-size", help="MLP hidden width."),
    dense_features: int = typer.Option(512, "--dense-features", help="Adapter output features n_f."),
    pooling: str = typer.Option("avg", "--pooling", help="avg, max, cls or mean-avg."),
    preprocess: str = typer.Option("official", "--preprocess", help="official or reference (paper quirks)."),
    dataset_option: list[str] = opts.dataset_option_opt(),
    backbone_option: list[str] = opts.backbone_option_opt(),
    bf16: bool = typer.Option(False, "--bf16/--no-bf16", help="bf16 autocast (CUDA)."),
    bn_recompute: bool = typer.Option(True, "--bn-recompute/--no-bn-recompute",
                                      help="Recompute BN statistics after the schedule-free swap (--no-bn-recompute "
                                           "keeps the reference's)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Test accuracy every N epochs (0 = last epoch only)."),
    checkpoint_steps: int = typer.Option(0, "--checkpoint-steps", help="Also checkpoint every N steps."),
    metrics: str = typer.Option("all", "--metrics", help="Metrics to compute: all, fast or NAME,...",
                                autocompletion=opts.complete_metrics),
    cal_fraction: float = typer.Option(0.0, "--cal-fraction",
                                       help="Hold this share of each class's training images out of training, for "
                                            "`qpm conformal`'s guaranteed prediction sets (0 = train on all, as "
                                            "the paper)."),
    current: bool = typer.Option(True, "--current/--no-current",
                                 help="Record the run as the current run (used by export/explain/predict)."),
    force: bool = typer.Option(False, "--force", help="Write the run into a folder that holds other files."),
    device: str = Device,
    quiet: bool = Quiet,
    json_out: bool = JsonFlag,
) -> None:
    """Train a DINO-QPM model end to end: extract -> dense -> select -> finetune -> evaluate."""
    from qpmcli.checks import check_out_dir
    from qpmcli.commands._common import say, settings_from_flags
    from qpmcli.train import TrainRequest, train_run

    settings = settings_from_flags(data_root=data_root, weights_dir=weights_dir, device=device, seed=seed,
                                   device_check="torch")
    check_out_dir(run_dir, "--run-dir")
    req = TrainRequest.from_options(
        head=head, selector=selector, dense_epochs=dense_epochs, finetune_epochs=finetune_epochs,
        batch_size=batch_size, dense_lr=dense_lr, finetune_lr=finetune_lr, recompute_bn=bn_recompute, bf16=bf16,
        eval_every=eval_every, checkpoint_steps=checkpoint_steps,
        backbone=backbone, dataset=dataset, data_root=data_root, weights=weights, preprocess=preprocess,
        dataset_options=opts.parse_plugin_options("dataset", dataset, dataset_option),
        backbone_options=opts.parse_plugin_options("backbone", backbone, backbone_option),
        selector_options=(opts.parse_plugin_options("selector", selector, selector_option) if head == "qpm"
                          else {}),
        n_selected=features, per_class=per_class, time_limit=time_limit, n_layers=layers, hidden_size=hidden_size,
        n_features=dense_features, pooling=pooling, seed=settings.seed, metrics=metrics,
        cal_fraction=cal_fraction,
    ).checked(settings)  # every check before any work
    from qpmcli.current import check_recordable, try_set_current
    from qpmcli.distributed import dist_info

    if current and dist_info().is_main:
        check_recordable(settings)  # record keeping that can fail goes first
    err = console(stderr=True)
    summary = train_run(req, settings, run_dir=run_dir, resume=resume, force=force,
                        progress=not quiet and not json_out,
                        log=None if (json_out or quiet) else (lambda m: err.print(m)))
    if not dist_info().is_main:
        return
    if current:
        warning = try_set_current(settings, summary["run_dir"], by="train")
        summary["current"] = warning is None
        if warning:
            say(warning)
    if json_out:
        print_json(summary)
    else:
        _print_summary(summary)
    if summary.get("current"):
        say(f"current run: {summary['run_dir']} (next: qpm export --onnx, qpm explain IMAGE)")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    out = console()
    metrics = summary.get("metrics", {})
    names: list[str] = []
    for stage in metrics.values():
        names += [k for k, v in stage.items() if k not in names and not isinstance(v, dict | list)]
    table = Table(title=f"qpm train: {summary['run_dir']}", title_justify="left")
    table.add_column("metric")
    for stage in metrics:
        table.add_column(stage, justify="right")
    for name in names:
        table.add_row(name, *(_fmt(metrics[s].get(name)) for s in metrics))
    out.print(table)
    sel = summary.get("selection")
    if sel:
        out.print(f"selection: {len(sel['features'])} features, status {sel['status']}, objective "
                  f"{_fmt(sel['objective'])}, gap {_fmt(sel['gap'])}, {sel['seconds']} s ({sel['solver']})")
    t = summary.get("timings", {})
    out.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))


def register(app: typer.Typer) -> None:
    app.command("train")(train)
