"""Inference speed of the exported classifier: ONNX Runtime vs PyTorch eager, and the adapter + head's cost.

Headline model: the real DINOv2 ViT-B/14-reg shape (random weights; 224x224, 16x16 grid, 4 registers) with the
default adapter (4 layers, 768 -> 2048 -> 2048 -> 2048 -> 512) and a QPM head (200 classes, 50 features, 5 per class),
saved as a run and exported with ``qpmcli.export.export_onnx`` (the code users run). Inputs are the same preprocessed
batch for every variant; preprocessing is not timed. Each measurement warms up first, each variant is timed in a block
of its own (``harness.time_blocks``: idle ONNX Runtime sessions' spinning threads would otherwise steal the cores) and
the median of the repeats is used.

Rows (ratios measured in this one process):
- CPU: images/s of ONNX Runtime (CPU EP, fp32) / PyTorch eager (fp32) per batch size (target >= 1.0);
- adapter + head share: time(adapter + head alone, on tokens) / time(backbone alone) in PyTorch eager (target: at
  most 1.2x the arithmetic share of the adapter's multiply-accumulates; whole/backbone is listed too), and in ONNX
  Runtime adapter graph / (full graph - adapter graph);
- CUDA (``--device cuda``): PyTorch eager fp16 (autocast) / fp32 images/s, the adapter + head share in fp32 and fp16,
  and ONNX Runtime CUDA (IO binding) fp32 / fp16 vs eager -- only when the CUDA EP is available.
- int8 (CPU; ``qpmcli.quantize``, the code ``qpm export --int8`` runs): ONNX Runtime int8 / fp32 images/s at each
  batch size for the headline model (target >= 2.0 at batch 8), the graph optimisation applied before quantizing
  (ONNX Runtime's transformer optimizer and none, each vs the default basic level), int8 / fp32 file size (about
  0.3); and on the demo model (``--demo-run RUN``, or the environment variable ``QPM_BENCH_DEMO_RUN``: a run of the
  ``qpm demo`` configuration): int8 / fp32 images/s, top-1 agreement on its test split (target >= 0.99), agreement of
  the explained class's top feature and the rank correlation of its feature contributions, the static-QDQ
  (``--calibrate train``) vs dynamic decision, and the size ratio. The notes say which int8 instructions the CPU
  offers (VNNI/AMX, from /proc/cpuinfo) and which int8 kernels ONNX Runtime ran (from its session profile).

    python benchmarks/bench_export.py [--quick] [--json-out PATH] [--device cpu|cuda] [--int8-only] [--demo-run RUN]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from harness import provenance, time_blocks, write_result

STARTED = provenance()

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def build_run(run_dir: Path, backbone: str, classes: int, selected: int, per_class: int, device: str):
    """Save a QPM run with random weights (valid binary W: every class ``per_class`` distinct features)."""
    import numpy as np
    import torch

    from qpmcli import artifact
    from qpmcli.backbone import load_backbone
    from qpmcli.model import QPMModel

    bb = load_backbone(backbone, weights="random", device="cpu")
    torch.manual_seed(0)
    model = QPMModel(bb.embed_dim, classes, bb.grid).eval()
    rng = np.random.default_rng(0)
    w = np.zeros((classes, selected), np.float32)
    seen: set[tuple[int, ...]] = set()
    for c in range(classes):
        while True:
            cols = tuple(sorted(rng.choice(selected, per_class, replace=False).tolist()))
            if cols not in seen:
                seen.add(cols)
                break
        w[c, list(cols)] = 1
    feats = np.sort(rng.choice(model.n_features, selected, replace=False))
    model.set_selection(feats, w, torch.rand(model.n_features) * 0.1, torch.rand(model.n_features) * 0.1 + 0.05)
    info = {"class_names": [f"class {i}" for i in range(classes)], "backbone": bb.name,
            "weights_digest": bb.weights_digest, "preprocess": bb.preprocess_config,
            "image_size": list(bb.image_size), "grid": list(bb.grid), "embed_dim": bb.embed_dim,
            "dataset": "benchmark", "head": "qpm", "backbone_options": {}, "seed": 0}
    artifact.save_model(model, run_dir, "final", info=info)
    return bb.to(device), model.to(device)


def row(what: str, ours: float, baseline: float, ratio: float, target: str, met: bool | None, **extra) -> dict:
    return {"what": what, "ours": round(ours, 4), "baseline": round(baseline, 4), "ratio": round(ratio, 4),
            "target": target, "met": met, **extra}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes and shorter timing")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--backbone", default="dinov2-vitb14-reg")
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default: cpu 1,8[,32]; cuda 1,32[,128])")
    ap.add_argument("--int8-only", action="store_true", help="CPU: only the int8 rows (skip eager/fp32 vs eager)")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 rows")
    ap.add_argument("--demo-only", action="store_true", help="only the demo model's int8 rows (needs --demo-run)")
    ap.add_argument("--demo-run", type=Path, default=os.environ.get("QPM_BENCH_DEMO_RUN") or None,
                    help="a run of the qpm demo configuration for the int8 accuracy rows")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from qpmcli.device import cuda_device_count
    from qpmcli.export import FullGraph, export_onnx
    from qpmcli.predict import make_session

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible to torch", file=sys.stderr)
        return 2
    if args.batch_sizes:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    elif dev == "cpu":
        batches = [1, 8] if args.quick else [1, 8, 32]
    else:
        batches = [1, 32] if args.quick else [1, 32, 128]
    min_s = 1.0 if args.quick else 3.0
    repeats = 3 if args.quick else 5
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    rows: list[dict] = []
    notes: list[str] = []
    if args.demo_only:
        if not args.demo_run:
            print("--demo-only needs --demo-run RUN", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory(prefix="qpm-bench-export-") as tmp:
            demo_int8_rows(Path(tmp), Path(args.demo_run), repeats, min_s, rows, notes)
        cpu = cpu_int8_features()
        notes.append(f"CPU {cpu['cpu']}: int8-relevant flags {', '.join(cpu['flags']) or 'none'} -> MLAS int8 path "
                     f"{cpu['mlas_int8_path']}; onnxruntime {ort.__version__}; load average at the end "
                     f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
        return _write(args, {"benchmark": "export", "device": dev, "rows": rows, "notes": "; ".join(notes)})

    with tempfile.TemporaryDirectory(prefix="qpm-bench-export-") as tmp:
        run = Path(tmp) / "run"
        t0 = time.perf_counter()
        bb, model = build_run(run, args.backbone, args.classes, 50, 5, dev)
        full = FullGraph(bb, model).eval()
        report = export_onnx(run, Path(tmp) / "model.onnx", fp16=dev == "cuda", adapter=True)
        notes.append(f"{args.backbone} (random weights) {bb.image_size[0]}x{bb.image_size[1]}, adapter 4x2048 -> 512, "
                     f"{args.classes} classes, 50 features; build + export {time.perf_counter() - t0:.0f} s")
        ort_device = "cpu"
        cuda_ep = dev == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers() and \
            cuda_device_count() > 0
        if cuda_ep:
            ort_device = "cuda"
        elif dev == "cuda":
            notes.append("ONNX Runtime CUDA EP not available: ORT rows skipped on this machine")
        sessions = {}
        if dev == "cpu" or cuda_ep:
            for key in ("full", "adapter", "full_fp16", "adapter_fp16"):
                if key in report["files"]:
                    sess, io = make_session(Path(report["files"][key]), ort_device)
                    sessions[key] = (sess, io)
            notes.append("ORT providers: " + ", ".join(f"{k}={s.get_providers()[0]}" for k, (s, _) in
                                                       sessions.items()))

        def ort_call(key: str, x_np):
            sess, io = sessions[key]
            name = sess.get_inputs()[0].name
            if not io:
                return lambda: sess.run(None, {name: x_np})
            binding = sess.io_binding()
            x_dev = ort.OrtValue.ortvalue_from_numpy(x_np, "cuda", 0)  # input already on the GPU (IO binding)
            binding.bind_ortvalue_input(name, x_dev)
            for o in sess.get_outputs():
                binding.bind_output(o.name, "cuda")

            def call():
                sess.run_with_iobinding(binding)
            return call

        # the arithmetic floor of the adapter's share (multiply-accumulates per image)
        n_tok = 1 + bb.grid[0] * bb.grid[1]
        adapter_macs = n_tok * sum(m.in_features * m.out_features for m in model.mlp if hasattr(m, "in_features"))
        from qpmcli.export import graph_model

        pruned = graph_model(model.cpu())
        pruned_macs = (n_tok - 1) * sum(m.in_features * m.out_features for m in pruned.mlp
                                        if hasattr(m, "in_features"))
        vit = bb.model
        d = bb.embed_dim
        n_all = n_tok + int(bb.info.get("registers", 0))
        block_macs = n_all * (4 * d * d + 2 * d * 4 * d) + 2 * n_all * n_all * d
        bb_macs = len(vit.blocks) * block_macs + bb.grid[0] * bb.grid[1] * 3 * 14 * 14 * d
        notes.append(f"arithmetic per image: backbone {bb_macs / 1e9:.2f} GMAC; adapter as trained "
                     f"{adapter_macs / 1e9:.2f} GMAC = {adapter_macs / bb_macs:.3f} of it, as exported (last layer cut "
                     f"to the selected features, no CLS) {pruned_macs / 1e9:.2f} GMAC = {pruned_macs / bb_macs:.3f}: "
                     f"the share any implementation pays at equal efficiency (targets: at most 1.2x that share)")
        floor_trained, floor_exported = adapter_macs / bb_macs, pruned_macs / bb_macs
        gen = torch.Generator().manual_seed(0)
        for b in ([] if args.int8_only else batches):
            first_row = len(rows)
            x = torch.randn(b, 3, *bb.image_size, generator=gen)
            x_np = x.numpy()
            xd = x.to(dev)
            with torch.inference_mode():
                tokens = full.tokens(xd)
            tok_np = tokens.float().cpu().numpy()

            def eager_full(xd=xd):
                with torch.inference_mode():
                    return full(xd)

            def eager_backbone(xd=xd):
                with torch.inference_mode():
                    return full.tokens(xd)

            def eager_adapter(tokens=tokens):
                with torch.inference_mode():
                    return model(tokens)

            fns = {"eager": eager_full, "eager_backbone": eager_backbone, "eager_adapter": eager_adapter}
            if dev == "cuda":
                def autocast(fn):
                    def call():
                        with torch.autocast("cuda", dtype=torch.float16):
                            return fn()
                    return call
                fns.update(eager_fp16=autocast(eager_full), eager_backbone_fp16=autocast(eager_backbone),
                           eager_adapter_fp16=autocast(eager_adapter))
            if "full" in sessions:
                fns["ort"] = ort_call("full", x_np)
                fns["ort_adapter"] = ort_call("adapter", tok_np)
            if "full_fp16" in sessions:
                fns["ort_fp16"] = ort_call("full_fp16", x_np)
            t = time_blocks(fns, repeats=repeats, min_seconds=min_s, sync=sync)
            ips = {k: b / v for k, v in t.items()}
            if "ort" in t:
                target = ">= 1.0" if dev == "cpu" else "report"
                rows.append(row(f"ORT {ort_device.upper()} fp32 vs torch eager fp32, images/s, batch {b}", ips["ort"],
                                ips["eager"], ips["ort"] / ips["eager"], target,
                                ips["ort"] >= ips["eager"] if dev == "cpu" else None))
            share = t["eager_adapter"] / t["eager_backbone"]  # both measured directly: robust on a busy machine
            rows.append(row(f"adapter + head share of backbone time, torch eager fp32 {dev}, batch {b}",
                            t["eager_adapter"], t["eager_backbone"], share, f"<= {1.2 * floor_trained:.3f}",
                            share <= 1.2 * floor_trained,
                            whole_over_backbone=round(t["eager"] / t["eager_backbone"], 4)))
            if "ort_adapter" in t:
                share_ort = t["ort_adapter"] / max(t["ort"] - t["ort_adapter"], 1e-12)
                rows.append(row(f"adapter + head share of backbone time, ORT fp32 {ort_device} (adapter graph), "
                                f"batch {b}", t["ort_adapter"], t["ort"] - t["ort_adapter"], share_ort,
                                f"<= {1.2 * floor_exported:.3f}", share_ort <= 1.2 * floor_exported))
            if dev == "cuda":
                rows.append(row(f"torch eager fp16 autocast vs fp32, images/s, batch {b}", ips["eager_fp16"],
                                ips["eager"], ips["eager_fp16"] / ips["eager"], "report", None))
                share16 = t["eager_adapter_fp16"] / t["eager_backbone_fp16"]
                rows.append(row(f"adapter + head share of backbone time, torch eager fp16 cuda, batch {b}",
                                t["eager_adapter_fp16"], t["eager_backbone_fp16"], share16,
                                f"<= {1.2 * floor_trained:.3f}", share16 <= 1.2 * floor_trained,
                                whole_over_backbone=round(t["eager_fp16"] / t["eager_backbone_fp16"], 4)))
                if "ort_fp16" in t:
                    rows.append(row(f"ORT CUDA fp16 graph vs torch eager fp16 autocast, images/s, batch {b}",
                                    ips["ort_fp16"], ips["eager_fp16"], ips["ort_fp16"] / ips["eager_fp16"],
                                    "report", None))
            for r in rows[first_row:]:
                print(f"{r['what']}: ratio {r['ratio']:.3f} (target {r['target']})", flush=True)
        if dev == "cpu" and not args.no_int8:
            int8_rows(Path(tmp), Path(report["files"]["full"]), args, batches, repeats, min_s, rows, notes)
        notes.append(f"torch threads {torch.get_num_threads()}, onnxruntime {ort.__version__}, "
                     f"torch {torch.__version__}; load average at the end {os.getloadavg()[0]:.1f} on "
                     f"{os.cpu_count()} cpus (ratios of alternatives timed in blocks, one after another)")
    return _write(args, {"benchmark": "export", "device": dev, "rows": rows, "notes": "; ".join(notes)})


def _write(args, result: dict) -> int:
    print(json.dumps(write_result(args.json_out, result, started=STARTED), indent=2))
    return 0


# ------------------------------------------------------------------------------------------------------------ int8
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_int8_features() -> dict:
    """The int8-relevant instruction sets this CPU reports (/proc/cpuinfo) and the MLAS kernel family they select.

    ONNX Runtime does not expose which MLAS GEMM kernel it dispatched; MLAS picks, in order, AMX, AVX512-VNNI,
    AVX-VNNI, AVX512BW, AVX2 u8s8/u8u8 kernels by these CPUID flags, so the flags determine the path.
    """
    flags: set[str] = set()
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []):  # no /proc: no flags to report
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        elif line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
    have = [f for f in INT8_FLAGS if f in flags]
    if {"amx_tile", "amx_int8"} <= flags:
        path = "AMX int8 tiles"
    elif "avx512_vnni" in flags:
        path = "AVX512-VNNI"
    elif "avx_vnni" in flags:
        path = "AVX-VNNI"
    elif "avx512bw" in flags:
        path = "AVX512BW (no VNNI)"
    elif "avx2" in flags:
        path = "AVX2 u8s8 via vpmaddubsw/vpmaddwd (no VNNI, no AMX)"
    else:
        path = "SSE/portable"
    return {"cpu": model, "flags": have, "mlas_int8_path": path}


def profiled_ops(path: Path, x) -> dict:
    """Op types ONNX Runtime ran for ``path`` (its session profile; node events only), with total microseconds."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, {sess.get_inputs()[0].name: x})
    prof = Path(sess.end_profiling())
    ops: dict[str, float] = {}
    providers: set[str] = set()
    for ev in json.loads(prof.read_text()):
        args_ = ev.get("args") or {}
        if ev.get("cat") == "Node" and "op_name" in args_ and ev.get("name", "").endswith("_kernel_time"):
            ops[args_["op_name"]] = ops.get(args_["op_name"], 0) + float(ev.get("dur", 0))
            providers.add(args_.get("provider", ""))
    prof.unlink(missing_ok=True)
    total = sum(ops.values()) or 1.0
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:6]
    return {"providers": sorted(p for p in providers if p), "top_ops": {k: round(v / total, 3) for k, v in top}}


def int8_rows(tmp: Path, fp32: Path, args, batches: list[int], repeats: int, min_s: float, rows: list[dict],
              notes: list[str]) -> None:
    """int8 rows: the headline model (speed, optimisation levels, size) and the demo model (speed, accuracy)."""
    import numpy as np

    from qpmcli.modelfile import read_onnx_metadata
    from qpmcli.quantize import (
        build_int8,
        cpu_session,
        optimize_for_quantization,
        preprocess_batch,
        quantize_dynamic_int8,
    )

    meta, _ = read_onnx_metadata(fp32)
    from qpmcli.images import synthetic_images

    x_all = preprocess_batch(synthetic_images(max(batches), meta.image_size), meta)
    t0 = time.perf_counter()
    rep = build_int8(fp32, tmp / "model.int8.onnx", x_all[:8], verify_source="8 synthetic images",
                     min_agreement=0.0)
    paths = {"fp32": fp32, "int8": tmp / "model.int8.onnx"}
    for level in ("transformer", "none"):  # the default is "basic"; the others are measured against it
        staged = tmp / f"opt-{level}.onnx"
        info = optimize_for_quantization(fp32, staged, level, num_heads=meta.embed_dim // 64,
                                         hidden_size=meta.embed_dim)
        quantize_dynamic_int8(staged, tmp / f"int8-{level}.onnx")
        staged.unlink()
        paths[f"int8_{level}"] = tmp / f"int8-{level}.onnx"
        if level == "transformer":
            notes.append(f"transformer optimizer fused {info.get('fused') or 'nothing'}")
    notes.append(f"int8 {args.backbone}: dynamic quantization of {rep['quantization']['quantized_nodes']} MatMul "
                 f"nodes in {time.perf_counter() - t0:.0f} s (with the two other optimisation levels); top-1 "
                 f"agreement with fp32 on 8 synthetic images {rep['verify']['top1_agreement']:.3f} (random weights: "
                 f"near-tied logits, so this is not the accuracy row)")
    sessions = {k: cpu_session(p) for k, p in paths.items()}
    for b in batches:
        x = np.ascontiguousarray(x_all[:b])
        fns = {k: (lambda s=s, x=x: s.run(None, {"image": x})) for k, s in sessions.items()}
        t = time_blocks(fns, repeats=repeats, min_seconds=min_s)
        ips = {k: b / v for k, v in t.items()}
        new = [row(f"ORT CPU int8 (dynamic, basic graph opt.) vs fp32, images/s, {args.backbone}, batch {b}",
                   ips["int8"], ips["fp32"], ips["int8"] / ips["fp32"], ">= 2.0" if b == 8 else "report",
                   ips["int8"] / ips["fp32"] >= 2.0 if b == 8 else None)]
        for level, label in (("transformer", "ORT transformer optimizer"), ("none", "no graph optimisation")):
            new.append(row(f"int8 with {label} before quantizing vs basic (default), images/s, batch {b}",
                           ips[f"int8_{level}"], ips["int8"], ips[f"int8_{level}"] / ips["int8"],
                           "report (default = the faster)", None))
        rows.extend(new)
        for r in new:
            print(f"{r['what']}: ratio {r['ratio']:.3f} (target {r['target']})", flush=True)
    size = paths["int8"].stat().st_size / fp32.stat().st_size
    rows.append(row(f"int8 / fp32 file size, {args.backbone}", paths["int8"].stat().st_size / 2**20,
                    fp32.stat().st_size / 2**20, size, "~0.3 (<= 0.35)", size <= 0.35))
    cpu = cpu_int8_features()
    prof = profiled_ops(paths["int8"], np.ascontiguousarray(x_all[:1]))
    notes.append(f"CPU {cpu['cpu']}: int8-relevant flags {', '.join(cpu['flags']) or 'none'} -> MLAS int8 GEMM path "
                 f"{cpu['mlas_int8_path']} (inferred from the CPUID flags; ORT does not report the kernel); ORT "
                 f"profile of the int8 graph (batch 1): providers {prof['providers']}, time share by op "
                 f"{prof['top_ops']}")
    del sessions
    if args.demo_run:
        demo_int8_rows(tmp, Path(args.demo_run), repeats, min_s, rows, notes)
    else:
        notes.append("demo-model int8 rows skipped: pass --demo-run RUN (or QPM_BENCH_DEMO_RUN)")


def demo_int8_rows(tmp: Path, run: Path, repeats: int, min_s: float, rows: list[dict], notes: list[str]) -> None:
    """The demo model: export fp32, quantize (with --calibrate train, so both methods are measured), compare."""
    import numpy as np

    from qpmcli.artifact import RunFolder
    from qpmcli.export import export_onnx
    from qpmcli.quantize import cpu_session, export_int8, preprocess_batch

    fp32 = tmp / "demo.onnx"
    export_onnx(run, fp32, adapter=False)
    rep = export_int8(run, fp32, tmp / "demo.int8.onnx", calibrate="train", min_agreement=0.0)
    v = rep["verify"]
    what = f"demo model ({run.name}: efficientnet-lite0, {rep['verify_set']})"
    rows.append(row(f"top-1 agreement int8 vs fp32, {what}", v["top1_agreement"], 1.0, v["top1_agreement"],
                    ">= 0.99", v["top1_agreement"] >= 0.99, method=rep["method"]))
    rows.append(row("explained class's top feature agreement int8 vs fp32, demo model", v["top_feature_agreement"],
                    1.0, v["top_feature_agreement"], "report", None))
    rows.append(row("explained class's contribution rank correlation (mean Spearman) int8 vs fp32, demo model",
                    v["contribution_rank_correlation"], 1.0, v["contribution_rank_correlation"], "report", None,
                    max_prob_diff=round(v["max_prob_diff"], 4)))
    cal = rep.get("calibration") or {}
    for k, c in (cal.get("candidates") or {}).items():
        notes.append(f"demo {k}: top-1 agreement {c['top1_agreement']:.3f}, top feature {c['top_feature_agreement']}, "
                     f"rank corr. {c['contribution_rank_correlation']}, max prob diff {c['max_prob_diff']:.3g}")
    if cal:
        notes.append(f"demo --calibrate train decision: {cal['decision']}")
    size = (tmp / "demo.int8.onnx").stat().st_size / fp32.stat().st_size
    rows.append(row("int8 / fp32 file size, demo model", (tmp / "demo.int8.onnx").stat().st_size / 2**20,
                    fp32.stat().st_size / 2**20, size, "report (convolutions stay fp32 with dynamic)", None))
    images, _ = RunFolder(run).sample_images("test", 8)
    from qpmcli.modelfile import read_onnx_metadata

    meta, _ = read_onnx_metadata(fp32)
    x_all = preprocess_batch(images, meta)
    sessions = {"fp32": cpu_session(fp32), "int8": cpu_session(tmp / "demo.int8.onnx")}
    for b in (1, 8):
        x = np.ascontiguousarray(x_all[:b])
        fns = {k: (lambda s=s, x=x: s.run(None, {"image": x})) for k, s in sessions.items()}
        t = time_blocks(fns, repeats=repeats, min_seconds=min_s)
        ips = {k: b / v for k, v in t.items()}
        rows.append(row(f"ORT CPU int8 ({rep['method']}) vs fp32, images/s, demo model, batch {b}", ips["int8"],
                        ips["fp32"], ips["int8"] / ips["fp32"], "report", None))
        print(f"{rows[-1]['what']}: ratio {rows[-1]['ratio']:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
