"""``qpm extract``: run a frozen backbone over a dataset split once and store its tokens in the token cache."""

from __future__ import annotations

import time

import typer

from qpmcli import checks
from qpmcli import options as opts
from qpmcli.commands._common import DataRoot, Device, JsonFlag, Quiet, Weights, WeightsDir, console, print_json


def extract(
    backbone: str = opts.backbone_opt("dinov2-vitb14-reg"),
    dataset: str = opts.dataset_opt("cub200"),
    split: str = typer.Option("all", "--split", help="train, test or all."),
    data_root: str = DataRoot,
    weights: str = Weights,
    weights_dir: str = WeightsDir,
    preprocess: str = typer.Option("official", "--preprocess", help="official or reference (the paper code's)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per backbone forward."),
    image_size: int = typer.Option(None, "--image-size", help="Square input size (default 224)."),
    skip_bad: bool = typer.Option(False, "--skip-bad/--no-skip-bad",
                                  help="Leave unreadable images out and report them."),
    bf16: bool = typer.Option(False, "--bf16/--no-bf16", help="bf16 autocast for the backbone forward (GPU)."),
    cache_dir: str = typer.Option(None, "--cache-dir", help="Token cache folder (overrides QPM_CACHE_DIR)."),
    num_workers: int = typer.Option(None, "--num-workers", help="Image decoding workers (default from settings)."),
    verify: bool = typer.Option(False, "--verify/--no-verify",
                                help="Rehash every cached row against its chunk's SHA-256 (opening checks a sample)."),
    dataset_option: list[str] = opts.dataset_option_opt(),
    device: str = Device,
    quiet: bool = Quiet,
    json_out: bool = JsonFlag,
) -> None:
    """Extract backbone tokens for a dataset into the token cache (resumable; a rerun continues where it stopped)."""
    from qpmcli.commands._common import settings_from_flags
    from qpmcli.registry import get_registry

    checks.check_choice(split, ("train", "test", "all"), "--split")
    checks.check_choice(preprocess, ("official", "reference"), "--preprocess")
    checks.check_positive(batch_size, "--batch-size")
    checks.check_positive(image_size, "--image-size")
    checks.check_positive(num_workers, "--num-workers", 0)
    checks.check_out_dir(cache_dir, "--cache-dir")
    get_registry().get("backbone", backbone)
    options = opts.parse_plugin_options("dataset", dataset, dataset_option)
    settings = settings_from_flags(data_root=data_root, weights_dir=weights_dir, device=device, cache_dir=cache_dir,
                                   num_workers=num_workers, device_check="torch")
    from qpmcli.cache import backbone_for_cache, ensure_cache

    splits = ["train", "test"] if split == "all" else [split]
    backbone_obj = backbone_for_cache(backbone, settings, weights=weights, preprocess=preprocess, dataset=dataset,
                                      image_size=image_size, amp=bf16)
    results = []
    for sp in splits:
        t0 = time.perf_counter()
        cache = ensure_cache(backbone, dataset, sp, settings, weights=weights, preprocess=preprocess,
                             data_root=data_root, dataset_options=options, progress=not (json_out or quiet),
                             backbone_obj=backbone_obj, batch_size=batch_size, skip_bad=skip_bad,
                             image_size=image_size, amp=bf16)
        verified = cache.verify() if verify else None  # a mismatch is a CacheError naming the chunk
        m = cache.manifest
        results.append({"split": sp, "path": str(cache.path), "images": m["n"], "tokens": m["t"], "dim": m["d"],
                        "grid": m["grid"], "masks": m["has_masks"], "weights_digest": m["weights_digest"],
                        "skipped": m["skipped"], "seconds": round(time.perf_counter() - t0, 3),
                        "verified_chunks": verified})
    from qpmcli.distributed import launched

    if not launched().is_main:
        return
    if json_out:
        print_json({"backbone": backbone, "dataset": dataset, "caches": results})
        return
    from rich.table import Table

    table = Table(title=f"token caches: {backbone} on {dataset}", title_justify="left")
    for col in ("split", "images", "grid x dim", "skipped", "seconds", "path"):
        table.add_column(col)
    for r in results:
        table.add_row(r["split"], str(r["images"]), f"{r['grid'][0]}x{r['grid'][1]} x {r['dim']}",
                      str(len(r["skipped"])), f"{r['seconds']:.1f}", r["path"])
    out = console()
    out.print(table)
    for r in results:
        for s in r["skipped"]:
            out.print(f"[yellow]skipped[/] {s['path']}: {s['error']}")


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)
