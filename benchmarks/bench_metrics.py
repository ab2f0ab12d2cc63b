"""All interpretability metrics on a CUB-sized problem: ``qpmcli.metrics.compute_metrics`` vs a per-sample baseline.

Problem (CUB-200 shapes): 5994 train images x 50 selected features, 5794 test images x 50 maps of 16 x 16 stored as
fp16 in an on-disk ``np.memmap``, 200 classes with 5 binary features each, object masks, 312 attributes.
The baseline is the straightforward implementation of the same definitions (METHOD.md §8): a Python loop over the
test images (one image's maps at a time, torch ops), per-class / per-attribute loops for the train metrics, and
sklearn's ``GaussianMixture(random_state=seed)`` per feature for Contrastiveness. Both run in this process.

    python benchmarks/bench_metrics.py [--quick] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import provenance, write_result

from qpmcli import metrics as M  # noqa: E402

STARTED = provenance()


def make_problem(n_train: int, n_test: int, tmp: Path, seed: int = 0) -> dict:
    """Class-structured features and maps, so every metric sees realistic (not degenerate) inputs."""
    rng = np.random.default_rng(seed)
    c, k, h, w, a = 200, 50, 16, 16, 312
    weight = np.zeros((c, k), np.float32)
    for i in range(c):
        weight[i, rng.choice(k, 5, replace=False)] = 1.0
    y_train = np.arange(n_train) % c
    y_test = rng.integers(0, c, n_test)
    train = np.abs(rng.normal(size=(n_train, k))) * 0.3 + 2.0 * weight[y_train] * rng.random((n_train, k))
    maps = np.lib.format.open_memmap(tmp / "maps.npy", mode="w+", dtype=np.float16, shape=(n_test, k, h, w))
    yy, xx = np.mgrid[:h, :w]
    for s in range(0, n_test, 512):
        e = min(s + 512, n_test)
        cy, cx = rng.uniform(2, 14, (2, e - s, k))
        blob = np.exp(-((yy - cy[..., None, None]) ** 2 + (xx - cx[..., None, None]) ** 2) / 6.0)
        maps[s:e] = (blob * (0.2 + weight[y_test[s:e]])[..., None, None] + 0.05 * rng.random((e - s, k, h, w)))
    maps.flush()
    cy, cx = rng.uniform(4, 12, (2, n_test))
    masks = ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) < rng.uniform(9, 30, n_test)[:, None, None]
    pooled = np.asarray(maps, dtype=np.float32).mean(axis=(2, 3))
    logits = (pooled - pooled.mean(0)) / pooled.std(0) @ weight.T + rng.normal(0, 0.5, (n_test, c))
    class_attr = rng.random((c, a)) * (rng.random((c, a)) < 0.2)
    image_attr = rng.random((n_train, a)) < 0.1
    known = rng.random((n_train, a)) < 0.85  # CUB: a certainty >= 3 for most labels
    return dict(train_features=train.astype(np.float32), train_labels=y_train, test_logits=logits.astype(np.float32),
                test_labels=y_test, test_maps=np.load(tmp / "maps.npy", mmap_mode="r"), weight=weight,
                test_masks=masks, class_attributes=class_attr, image_attributes=image_attr,
                image_attribute_known=known)


# ------------------------------------------------------------------------------------------- per-sample baseline
def baseline(p: dict, seed: int = 0) -> dict:
    """The definitions of METHOD.md §8 written the obvious way: one test image at a time."""
    import warnings
    from statistics import NormalDist

    import torch
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    w = p["weight"]
    wt = torch.from_numpy(w)
    c, k = w.shape
    rel = np.flatnonzero(np.any(w != 0, axis=0))
    f = p["train_features"][:, rel].astype(np.float64)
    y = p["train_labels"]
    out: dict = {}
    logits, labels = p["test_logits"], p["test_labels"]
    pred = logits.argmax(1)
    out["Accuracy"] = float(np.mean(pred == labels))
    # test maps, per image
    sid_vals, seg = [], {v: [] for v in M.SEG_VARIANTS}
    avg_ok = max_ok = 0
    for i in range(len(labels)):
        m = torch.from_numpy(np.asarray(p["test_maps"][i], dtype=np.float32))
        row = wt[pred[i]]
        nz = torch.nonzero(row).flatten()
        if len(nz) >= 5:
            top = torch.topk(row, 5).indices
            x = m[top].flatten(1)
            x = x / x.abs().mean(1, keepdim=True).clamp_min(1e-5)
            sid_vals.append(float(torch.softmax(x, 1).max(0).values.sum() / 5))
        mask = torch.from_numpy(p["test_masks"][i]).float()
        dil = torch.nn.functional.max_pool2d(mask[None, None], 3, 1, 1)[0, 0]
        g = (row[:, None, None] * m).sum(0)
        g = g - g.min()
        for name, mk in (("", mask), ("_dilated", dil)):
            seg["gradcam" + name].append(float((g * mk).sum() / g.sum()) if g.sum() > 0 else 0.0)
            seg["gradcam_max" + name].append(float((g * mk).max() / g.max()) if g.max() > 0 else 0.0)
            ratios = []
            for j in nz.tolist():
                peak = m[j].max()
                ratios.append(float((m[j] * mk).max() / peak) if peak > 0 else 0.0)
            seg["max" + name].append(float(np.mean(ratios)) if ratios else 0.0)
        avg_ok += int(torch.argmax(wt @ m.mean((1, 2)))) == labels[i]
        max_ok += int(torch.argmax(wt @ m.amax((1, 2)))) == labels[i]
    out["SID@5"] = float(np.mean(sid_vals)) if sid_vals else 0.0
    for v in M.SEG_VARIANTS:
        out[f"SegOverlap-{v}"] = float(np.mean(seg[v]))
    out["Plausibility"] = out["SegOverlap-gradcam_dilated"]
    out["Pooling-Avg-Accuracy"] = avg_ok / len(labels)
    out["Pooling-Max-Accuracy"] = max_ok / len(labels)
    out["Pooling-Ratio"] = max(avg_ok, max_ok) / len(labels) / out["Accuracy"]
    # train features
    g = f - f.min(0)
    per_class = np.stack([g[y == ci].sum(0) for ci in range(c)])
    out["Class-Independence"] = float(1 - (per_class / np.maximum(g.sum(0), 1e-8)).max(0).mean())
    ovl = []
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in range(f.shape[1]):
            gm = GaussianMixture(n_components=2, random_state=seed).fit(f[:, j:j + 1])
            mu, var = gm.means_.ravel(), gm.covariances_.ravel()
            ovl.append(NormalDist(mu[0], var[0] ** 0.5).overlap(NormalDist(mu[1], var[1] ** 0.5)))
    out["Contrastiveness"] = float(1 - np.mean(ovl))
    unit = f / np.maximum(np.linalg.norm(f, axis=0), 1e-8)
    s = unit.T @ unit
    np.fill_diagonal(s, 0)
    out["Correlation"] = float(s.max(1).mean())
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    an = p["class_attributes"] / np.linalg.norm(p["class_attributes"], axis=1, keepdims=True)
    sw, sa = wn @ wn.T, an @ an.T
    np.fill_diagonal(sw, 0)
    np.fill_diagonal(sa, 0)
    top = np.argsort(-sa.ravel(), kind="stable")[:50]
    out["Structural-Grounding"] = float(sw.ravel()[top].sum() / sa.ravel()[top].sum())
    att, known = p["image_attributes"], p["image_attribute_known"]
    scale = (f - f.min(0)).mean(0)
    best = np.full(f.shape[1], -np.inf)
    for ai in range(att.shape[1]):  # the reference: known labels only, an empty group's mean is 0
        with_a, without_a = att[:, ai] & known[:, ai], ~att[:, ai] & known[:, ai]
        mean_with = f[with_a].mean(0) if with_a.any() else 0.0
        mean_without = f[without_a].mean(0) if without_a.any() else 0.0
        best = np.maximum(best, (mean_with - mean_without) / scale)
    out["Alignment"] = float(best.mean())
    out["NFeatures"] = float(len(rel))
    out["PerClass"] = float((w != 0).sum() / c)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1000 test / 2000 train images instead of CUB's sizes")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    n_train, n_test = (2000, 1000) if args.quick else (5994, 5794)
    with tempfile.TemporaryDirectory() as tmp:
        p = make_problem(n_train, n_test, Path(tmp))
        M.compute_metrics(**{**p, "test_maps": p["test_maps"][:64], "test_logits": p["test_logits"][:64],
                             "test_labels": p["test_labels"][:64], "test_masks": p["test_masks"][:64]},
                          which="sid")  # warm-up (torch kernels)
        t0 = time.perf_counter()
        ours = M.compute_metrics(**p, which="all")
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        base = baseline(p)
        t_base = time.perf_counter() - t0
    diffs = {k: abs(ours[k] - base[k]) for k in M.ALL_KEYS if ours[k] is not None}
    worst = max(diffs, key=diffs.get)
    exact = {k: v for k, v in diffs.items() if k != "Contrastiveness"}
    ratio = t_base / t_ours
    rows = [{"what": f"all {len(M.ALL_KEYS)} metrics, {n_test} test x 50 maps 16x16 fp16 memmap, {n_train} train",
             "ours": f"{t_ours:.2f} s", "baseline": f"{t_base:.2f} s (per-sample loop + per-feature sklearn GMM)",
             "ratio": round(ratio, 2), "target": ">= 10x", "met": ratio >= 10},
            {"what": "max |ours - baseline| over metrics except Contrastiveness", "ours": f"{max(exact.values()):.2e}",
             "baseline": "0", "ratio": 1.0, "target": "<= 1e-4", "met": max(exact.values()) <= 1e-4},
            {"what": "|Contrastiveness ours (exact 2-means init) - sklearn seed 0|",
             "ours": f"{ours['Contrastiveness']:.5f}", "baseline": f"{base['Contrastiveness']:.5f}",
             "ratio": round(ours["Contrastiveness"] / base["Contrastiveness"], 5), "target": "within 0.01",
             "met": diffs["Contrastiveness"] <= 0.01}]
    notes = (f"largest difference: {worst} {diffs[worst]:.2e}; quick={args.quick}. Both sides run in one process on "
             f"this machine; torch threads={torch.get_num_threads()}.")
    for r in rows:
        print(f"{r['what']}: ours {r['ours']}, baseline {r['baseline']}, ratio {r['ratio']} "
              f"(target {r['target']}, {'met' if r['met'] else 'NOT met'})")
    print(notes)
    write_result(args.json_out, {"benchmark": "metrics", "rows": rows, "notes": notes}, started=STARTED)


if __name__ == "__main__":
    main()
