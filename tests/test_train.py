"""Training loops on in-memory tokens: learning, determinism, exact resume, BN recompute, DDP equivalence."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from qpmcli.loop import (
    DENSE_PHASE,
    FINETUNE_PHASE,
    PhaseOptions,
    TokenData,
    feature_stats,
    recompute_bn_stats,
    train_phase,
)
from qpmcli.loop import collect_token_outputs as collect_outputs
from qpmcli.model import QPMModel

N, H, W, D, C = 96, 3, 3, 16, 4


def _data(n=N, seed=0, hold="auto"):
    g = np.random.default_rng(seed)
    labels = np.arange(n) % C
    centers = g.normal(size=(C, D)) * 1.5
    tokens = (g.normal(size=(n, 1 + H * W, D)) + centers[labels][:, None]).astype(np.float16)
    return TokenData(tokens, labels, hold=hold)


def _model(seed=0):
    torch.manual_seed(seed)
    return QPMModel(D, C, (H, W), n_layers=2, hidden_size=32, n_features=12)


OPTS = replace(DENSE_PHASE, epochs=3, batch_size=16)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_phase_defaults_are_the_papers():
    dense = DENSE_PHASE
    assert (dense.epochs, dense.lr, dense.weight_decay, dense.batch_size) == (25, 1e-3, 7e-4, 32)
    assert (FINETUNE_PHASE.epochs, FINETUNE_PHASE.lr, FINETUNE_PHASE.weight_decay, FINETUNE_PHASE.batch_size) == (
        25, 5e-3, 8e-4, 16)
    assert PhaseOptions.from_dict(DENSE_PHASE.to_dict()) == DENSE_PHASE


def test_dense_training_learns_separable_tokens_and_logs_every_epoch():
    data = _data()
    model = _model()
    records = []
    res = train_phase(model, data, replace(OPTS, epochs=5, lr=1e-2), phase="dense", seed=1, test_data=data,
                      on_epoch=records.append, progress=False)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5] and records == res.history
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["test_acc"] > 0.8  # chance is 0.25
    assert {"ce", "fdl", "train_acc", "seconds"} <= set(records[0])
    assert not model.training and res.tokens_per_second > 0


def test_training_is_deterministic_for_a_seed_and_depends_on_it():
    data = _data()
    a, b, c = _model(), _model(), _model()
    train_phase(a, data, OPTS, phase="dense", seed=1, progress=False)
    train_phase(b, data, OPTS, phase="dense", seed=1, progress=False)
    train_phase(c, data, OPTS, phase="dense", seed=2, progress=False)
    assert _same_state(a, b)
    assert not _same_state(a, c)


def test_streamed_and_held_token_data_train_identically():
    a, b = _model(), _model()
    train_phase(a, _data(hold=True), OPTS, phase="dense", seed=1, progress=False)
    train_phase(b, _data(hold=False), OPTS, phase="dense", seed=1, progress=False)
    assert _same_state(a, b)


@pytest.mark.parametrize("stop", [4, 6])  # mid-epoch and exactly at an epoch boundary
def test_interrupted_phase_resumes_to_the_uninterrupted_result(tmp_path, stop):
    data = _data()
    ref = _model()
    ref_res = train_phase(ref, data, OPTS, phase="dense", seed=1, progress=False)
    model = _model()

    def ctrl_c(steps_done):  # the user presses Ctrl-C after `stop` steps, right after that step's checkpoint
        if steps_done == stop:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_phase(model, data, replace(OPTS, checkpoint_steps=stop), phase="dense", seed=1,
                    checkpoint_dir=tmp_path, progress=False, on_step=ctrl_c)
    assert (tmp_path / "dense.json").is_file()
    torch.manual_seed(123)  # a fresh process: other RNG state, other init -- the checkpoint must restore everything
    resumed = QPMModel(D, C, (H, W), n_layers=2, hidden_size=32, n_features=12)
    res = train_phase(resumed, data, OPTS, phase="dense", seed=1, checkpoint_dir=tmp_path, progress=False)
    assert res.resumed_from is not None
    assert _same_state(ref, resumed)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in res.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in ref_res.history]


def test_bn_statistics_are_recomputed_for_the_evaluated_weights():
    data = _data()
    model = _model()
    train_phase(model, data, OPTS, phase="dense", seed=1, progress=False)
    bn = model.mlp[1]
    # the running mean must equal the mean of per-batch token means of the first Linear under the saved (x) weights
    with torch.no_grad():
        means = [model.mlp[0](data.batch(torch.arange(i, min(i + 16, N)))[0]).reshape(-1, 32).mean(0)
                 for i in range(0, N, 16)]
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    no_fix = _model()
    train_phase(no_fix, data, replace(OPTS, recompute_bn=False), phase="dense", seed=1, progress=False)
    assert not torch.allclose(no_fix.mlp[1].running_mean, bn.running_mean, atol=1e-3)
    recompute_bn_stats(no_fix, data, 16)
    assert torch.allclose(no_fix.mlp[1].running_mean, bn.running_mean, atol=1e-5)


def test_finetune_trains_only_the_mlp_with_the_frozen_binary_head():
    data = _data()
    model = _model()
    train_phase(model, data, OPTS, phase="dense", seed=1, progress=False)
    feats = collect_outputs(model, data)["features"]
    mu, sigma = feature_stats(feats)
    assert torch.allclose(sigma, feats.double().std(0, unbiased=False).float())
    weight = torch.zeros(C, 4)
    for c in range(C):
        weight[c, [c, (c + 1) % 4]] = 1
    model.set_selection([0, 3, 5, 7], weight, mu, sigma)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("sel_") or k.startswith("linear")}
    res = train_phase(model, data, replace(FINETUNE_PHASE, epochs=2), phase="finetune", seed=1, test_data=data,
                      progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    assert {"l1_maps", "l1_features", "fdl"} <= set(res.history[0])
    assert res.history[-1]["test_acc"] > 0.5


@pytest.mark.distributed
def test_two_process_ddp_matches_one_process(tmp_path):
    script = Path(__file__).with_name("_ddp_train_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent)}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29500 + os.getpid() % 1000), str(script), str(tmp_path / "two.safetensors")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    sys.path.insert(0, str(script.parent))
    try:
        from _ddp_train_worker import train_tiny
    finally:
        sys.path.remove(str(script.parent))
    from safetensors.torch import load_file

    one, two = {k: v.contiguous() for k, v in train_tiny().items()}, load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    # Linear biases in front of a BatchNorm get an analytically zero gradient; Adam normalises float noise there, so
    # they are not comparable (and cancel in the BN anyway). Everything else must agree.
    # (nor is the BN running mean that absorbs them); the eval-mode outputs, which they cancel out of, are compared.
    pre_bn = {"mlp.0.bias", "mlp.3.bias", "mlp.1.running_mean", "mlp.4.running_mean"}
    assert torch.allclose(one["logits"], two["logits"], atol=1e-3, rtol=1e-3)
    for k in one.keys() - pre_bn:
        assert torch.allclose(one[k], two[k], atol=2e-4, rtol=1e-3), k


def test_phase_presets_follow_the_papers_rows():
    """`--selector sldd/qsenn` trains the baselines with their own settings (METHOD.md §3.6), qpm with DINO-QPM's."""
    from qpmcli.train import phase_presets

    dense, ft = phase_presets("qpm", "qpm")
    assert (dense.epochs, dense.losses.fdl, ft.epochs, ft.losses.fdl, ft.losses.l1_maps, ft.losses.l1_features) == (
        25, 0.5, 25, 1.0, 5.0, 1.0)
    dense, ft = phase_presets("qpm", "sldd")
    assert (dense.epochs, dense.losses.fdl, ft.epochs, ft.losses.fdl, ft.losses.l1_maps, ft.losses.l1_features) == (
        40, 0.196, 50, 0.196, 0.0, 0.0)
    dense, ft = phase_presets("qpm", "qsenn")
    assert (dense.epochs, dense.losses.fdl, ft.epochs, ft.losses.fdl, ft.losses.l1_maps) == (40, 0.196, 25, 0.196, 0.0)
    assert (dense.lr, ft.lr, dense.batch_size, ft.batch_size) == (1e-3, 5e-3, 32, 16)
    dense, _ = phase_presets("linear-probe", "qpm")
    assert (dense.epochs, dense.losses.fdl) == (40, 0.0)
