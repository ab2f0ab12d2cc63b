"""Worker for test_train.py's DDP test: trains a tiny dense model (1 process or under torchrun) and saves it."""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import torch

from qpmcli.artifact import atomic_write_safetensors
from qpmcli.distributed import dist_info, init_distributed
from qpmcli.loop import DENSE_PHASE, TokenData, train_phase
from qpmcli.loop import collect_token_outputs as collect_outputs
from qpmcli.model import QPMModel


def train_tiny() -> dict[str, torch.Tensor]:
    """A tiny dense model trained for 2 epochs (global batch 16, last batch 2); its state and eval logits."""
    g = np.random.default_rng(0)
    labels = np.arange(50) % 4
    tokens = (g.normal(size=(50, 10, 16)) + g.normal(size=(4, 16))[labels][:, None]).astype(np.float16)
    torch.manual_seed(0)
    model = QPMModel(16, 4, (3, 3), n_layers=2, hidden_size=32, n_features=12, head_dropout=0.0)
    data = TokenData(tokens, labels)
    train_phase(model, data, replace(DENSE_PHASE, epochs=2, batch_size=16), phase="dense", seed=1, progress=False)
    return {**model.state_dict(), "logits": collect_outputs(model, data)["logits"]}


if __name__ == "__main__":
    init_distributed()
    state = train_tiny()
    if dist_info().is_main:
        atomic_write_safetensors(sys.argv[1], state)
