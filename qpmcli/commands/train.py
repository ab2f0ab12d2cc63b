"""``qpm train``: extract (if needed) -> dense -> select -> finetune -> evaluate, into one run directory."""

from __future__ import annotations

import json
from typing import Any

import typer

from qpmcli.commands._common import DataRoot, Device, JsonFlag, Seed, WeightsDir, console, print_json


def _parse_pairs(pairs: list[str] | None, what: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is parsed as JSON when it is JSON (numbers, true, {"a": 1}), else kept as text."""
    from qpmcli.errors import ConfigError

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ConfigError(f"{what} {pair!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def train(
    backbone: str = typer.Option("dinov2-vitb14-reg", "--backbone", help="Backbone name (see `qpm plugins`)."),
    dataset: str = typer.Option("cub200", "--dataset", help="Dataset name (see `qpm plugins`)."),
    data_root: str = DataRoot,
    weights: str = typer.Option(None, "--weights", help="Backbone weights file ('random' for random init)."),
    weights_dir: str = WeightsDir,
    selector: str = typer.Option("qpm", "--selector", help="Feature selector (qpm, sldd, qsenn, topk, ...)."),
    features: int = typer.Option(50, "--features", help="Number of selected features."),
    per_class: int = typer.Option(5, "--per-class", help="Features assigned to every class."),
    run_dir: str = typer.Option(None, "--run-dir", help="Run directory (default: <runs_dir>/<dataset>-<backbone>)."),
    time_limit: float = typer.Option(60.0, "--time-limit", help="Selection time limit in seconds."),
    seed: int = Seed,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run; finished stages are skipped."),
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
    dataset_option: list[str] = typer.Option(None, "--dataset-option", help="Dataset option KEY=VALUE (repeat)."),
    backbone_option: list[str] = typer.Option(None, "--backbone-option",
                                              help="Backbone option KEY=VALUE, VALUE as JSON (e.g. image_size=112)."),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast (CUDA)."),
    no_bn_recompute: bool = typer.Option(False, "--no-bn-recompute",
                                         help="Keep the reference's BN statistics after the schedule-free swap."),
    eval_every: int = typer.Option(0, "--eval-every", help="Test accuracy every N epochs (0 = last epoch only)."),
    checkpoint_steps: int = typer.Option(0, "--checkpoint-steps", help="Also checkpoint every N steps."),
    metrics: str = typer.Option("all", "--metrics", help="Metrics to compute: all, fast or NAME,..."),
    device: str = Device,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    json_out: bool = JsonFlag,
) -> None:
    """Train a DINO-QPM model end to end: extract -> dense -> select -> finetune -> evaluate."""
    from dataclasses import replace

    from qpmcli.settings import resolve_settings
    from qpmcli.train import TrainRequest, phase_presets, train_run

    settings, _ = resolve_settings(data_root=data_root, weights_dir=weights_dir, device=device, seed=seed)
    dense, finetune = phase_presets(head, selector)  # the paper's settings for this row of its table
    common = dict(recompute_bn=not no_bn_recompute, bf16=bf16, eval_every=eval_every,
                  checkpoint_steps=checkpoint_steps)
    dense = replace(dense, **common, **({"epochs": dense_epochs} if dense_epochs is not None else {}),
                    **({"batch_size": batch_size} if batch_size else {}), **({"lr": dense_lr} if dense_lr else {}))
    finetune = replace(finetune, **common, **({"epochs": finetune_epochs} if finetune_epochs is not None else {}),
                       **({"batch_size": batch_size} if batch_size else {}),
                       **({"lr": finetune_lr} if finetune_lr else {}))
    from qpmcli.data import parse_options

    req = TrainRequest(backbone=backbone, dataset=dataset, data_root=data_root, weights=weights,
                       preprocess=preprocess, dataset_options=parse_options(dataset_option),
                       backbone_options=_parse_pairs(backbone_option, "backbone option"), selector=selector,
                       n_selected=features, per_class=per_class, time_limit=time_limit, head=head, n_layers=layers,
                       hidden_size=hidden_size, n_features=dense_features, pooling=pooling, dense=dense,
                       finetune=finetune, seed=settings.seed, metrics=metrics)
    err = console(stderr=True)
    summary = train_run(req, settings, run_dir=run_dir, resume=resume, progress=not quiet and not json_out,
                        log=None if json_out else (lambda m: err.print(m)))
    from qpmcli.train import dist_info

    if not dist_info().is_main:
        return
    if json_out:
        print_json(summary)
        return
    _print_summary(summary)


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
