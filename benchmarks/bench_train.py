"""Training throughput: our token cache (one fp16 array, held on the device) vs the reference's per-image files.

Both variants train the same adapter with the same schedule-free dense step for the same epochs. The baseline reads
the reference's layout -- two small ``.pt`` files per image (patch tokens, CLS token) -- through a shuffling DataLoader
(``num_workers`` workers, pinned memory), the way the reference's ``DinoData`` does. Ours is
``qpmcli.train.train_phase``
on a ``TokenData`` (including its BN recompute pass). Each variant runs in its own process so peak memory is its own.

    python benchmarks/bench_train.py [--quick] [--json-out PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from harness import provenance, write_result

STARTED = provenance()


def _tokens(n: int, t: int, d: int, c: int):
    import numpy as np

    g = np.random.default_rng(0)
    labels = np.arange(n) % c
    tokens = (g.standard_normal((n, t, d), dtype=np.float32) + g.standard_normal((c, d))[labels][:, None] * 0.5)
    return tokens.astype(np.float16), labels


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:  # VmHWM is this process's own peak (ru_maxrss would carry the parent's peak across exec)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from qpmcli.loop import DENSE_PHASE, TokenData, train_phase
    from qpmcli.losses import DENSE_WEIGHTS, total_loss
    from qpmcli.model import QPMModel

    grid = (args.grid, args.grid)
    t = 1 + args.grid ** 2
    cache = Path(args.workdir)
    labels = np.load(cache / "labels.npy")
    n = len(labels)
    # both variants run the same steps; the BN recompute pass (ours only, a correctness fix) is timed separately
    opts = replace(DENSE_PHASE, epochs=args.epochs, batch_size=args.batch_size, bf16=args.bf16, recompute_bn=False)
    torch.manual_seed(0)
    model = QPMModel(args.dim, args.classes, grid, hidden_size=args.hidden, n_features=args.features).to(args.device)
    import schedulefree  # warm the optimizer's first-use imports outside the timed region

    schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-3)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    if args.variant == "ours":
        tokens = np.load(cache / "tokens.npy", mmap_mode="r")
        start = time.perf_counter()
        data = TokenData(tokens, labels, args.device)
        train_phase(model, data, opts, phase="dense", seed=0, progress=False)
        held = data.held
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        from qpmcli.loop import recompute_bn_stats

        t_bn = time.perf_counter()
        recompute_bn_stats(model, data, args.batch_size, args.bf16)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        bn_seconds = time.perf_counter() - t_bn
    else:
        from torch.utils.data import DataLoader, Dataset

        class PerImageFiles(Dataset):
            """The reference layout: <i>/feat_map.pt [N_p, D] and <i>/feat_vec.pt [D] (fp16), CLS appended last."""

            def __len__(self) -> int:
                return n

            def __getitem__(self, i: int):
                fmap = torch.load(cache / "files" / str(i) / "feat_map.pt", weights_only=True)
                fvec = torch.load(cache / "files" / str(i) / "feat_vec.pt", weights_only=True)
                # our model takes CLS first; the reference's order costs the same
                return torch.cat([fvec[None], fmap]), int(labels[i])

        loader = DataLoader(PerImageFiles(), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            pin_memory=args.device.startswith("cuda"), persistent_workers=args.workers > 0,
                            generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        opt = schedulefree.AdamWScheduleFree(model.trainable_parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        for _ in range(args.epochs):
            opt.train()
            model.train()
            for x, y in loader:
                x = x.to(args.device, non_blocking=True).float()
                y = y.to(args.device, non_blocking=True)
                with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16,
                                    enabled=args.bf16):
                    out = model(x)
                loss, _ = total_loss(out.logits.float(), out.maps.float(), out.features.float(), y,
                                     model.head_weight(), DENSE_WEIGHTS)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        opt.eval()
        model.eval()
        held = False
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        bn_seconds = 0.0
    return {"variant": args.variant, "seconds": seconds, "tokens_per_second": n * t * args.epochs / seconds,
            "peak_mb": _peak_mb(args.device), "held_on_device": held, "bn_recompute_seconds": bn_seconds}


def prepare(workdir: Path, args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    tokens, labels = _tokens(args.n, 1 + args.grid ** 2, args.dim, args.classes)
    np.save(workdir / "tokens.npy", tokens)
    np.save(workdir / "labels.npy", labels)
    for i in range(args.n):
        d = workdir / "files" / str(i)
        d.mkdir(parents=True)
        torch.save(torch.from_numpy(tokens[i, 1:].copy()), d / "feat_map.pt")
        torch.save(torch.from_numpy(tokens[i, 0].copy()), d / "feat_vec.pt")
    del tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (CPU friendly)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--workers", type=int, default=min(5, os.cpu_count() or 1), help="baseline DataLoader workers")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in both variants")
    p.add_argument("--variant", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    for name, default in (("n", 2048), ("grid", 16), ("dim", 768), ("classes", 200), ("hidden", 2048),
                          ("features", 512), ("epochs", 2), ("batch-size", 32)):
        p.add_argument(f"--{name}", type=int, default=None if name != "batch-size" else default,
                       help=f"default {default}")
    args = p.parse_args()
    full = {"n": 2048, "grid": 16, "dim": 768, "classes": 200, "hidden": 2048, "features": 512, "epochs": 2}
    quick = {"n": 512, "grid": 16, "dim": 384, "classes": 20, "hidden": 256, "features": 128, "epochs": 1}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    with tempfile.TemporaryDirectory(prefix="qpm-bench-train-") as tmp:
        workdir = Path(tmp)
        prepare(workdir, args)
        results = {}
        base_cmd = [sys.executable, __file__, "--workdir", str(workdir), "--device", args.device,
                    "--workers", str(args.workers)] + (["--bf16"] if args.bf16 else [])
        base_cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}"
                     for k in ("n", "grid", "dim", "classes", "hidden", "features", "epochs", "batch_size")]
        for variant in ("baseline", "ours"):
            out = subprocess.run(base_cmd + ["--variant", variant], capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"{variant} failed")
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, base = results["ours"], results["baseline"]
    speed = ours["tokens_per_second"] / base["tokens_per_second"]
    mem = ours["peak_mb"] / base["peak_mb"]
    rows = [
        {"what": "training tokens/s (ours: token cache; baseline: one .pt per image + DataLoader)",
         "ours": round(ours["tokens_per_second"]), "baseline": round(base["tokens_per_second"]),
         "ratio": round(speed, 3), "target": ">= 1.0 (faster)", "met": speed >= 1.0},
        {"what": f"peak memory MB ({'GPU allocated' if args.device.startswith('cuda') else 'process RSS'})",
         "ours": round(ours["peak_mb"], 1), "baseline": round(base["peak_mb"], 1), "ratio": round(mem, 3),
         "target": "informational (ours holds the cache on the device)", "met": True},
        {"what": "BN recompute pass after the schedule-free swap (ours only), share of training time",
         "ours": round(ours["bn_recompute_seconds"], 3), "baseline": 0.0,
         "ratio": round(ours["bn_recompute_seconds"] / ours["seconds"], 3), "target": "informational", "met": True},
    ]
    notes = (f"device={args.device}, N={args.n}, tokens/image={1 + args.grid ** 2}, D={args.dim}, "
             f"MLP hidden={args.hidden}, n_f={args.features}, epochs={args.epochs}, batch={args.batch_size}, "
             f"bf16={args.bf16}, baseline workers={args.workers}, cache held on device={ours['held_on_device']}")
    doc = {"benchmark": "train" + ("-bf16" if args.bf16 else ""), "rows": rows, "notes": notes}
    for r in rows:
        print(f"{r['what']}: ours {r['ours']} vs baseline {r['baseline']} -> ratio {r['ratio']}")
    print(notes)
    write_result(args.json_out, doc, started=STARTED)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
