"""The DINO-QPM adapter (METHOD.md §3): a token-wise MLP, pooling, and the heads of every row of the paper's table.

Token layout is **CLS first**: ``tokens [B, 1 + h*w, D]`` (the reference puts CLS last; BatchNorm statistics over all
tokens, CLS included, are the same either way). The model works on cached backbone tokens, never on images.

Heads:
- dense: ``Dropout(0.2) -> Linear(n_f, C)`` (dense phase, and the linear probe with ``n_layers=0, pooling="cls"``);
- sparse (after :meth:`QPMModel.set_selection`): ``logits = W @ ((f[:, sel] - mu) / max(sigma, 1e-6)) + bias`` with a
  frozen ``W [C, K]``. QPM: binary W, frozen mu/sigma, no bias, dropout 0. SLDD/Q-SENN: real/ternary W, frozen bias,
  trainable mu/sigma, dropout 0.1.

Unlike the reference, the selection, W, mu and sigma are buffers of the state dict, so a checkpoint is self-contained.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qpmcli.distributed import all_reduce, world_size
from qpmcli.errors import ConfigError
from qpmcli.modelfile import SIGMA_MIN

POOLINGS = ("avg", "max", "cls", "mean-avg")
ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}
MAX_FEATURES = 16384  # n_f above this does not fit a token-wise MLP on [B, T, n_f] activations in practice
MAX_HIDDEN = 16384  # hidden width: a hidden x hidden layer of this size already holds 1 GiB of float32 weights
MAX_LAYERS = 64  # adapter depth (the paper uses 4)


class ModelOutput(NamedTuple):
    """``logits [B, C]``, ``maps [B, K, h, w]`` (selected maps after set_selection), ``features [B, K]``.

    ``features`` are pooled and un-standardised; in train mode they are the head's dropout-perturbed input (the
    reference's ``final_features``, which the FDL and the L1-FV loss consume), in eval mode there is no dropout.
    """

    logits: torch.Tensor
    maps: torch.Tensor
    features: torch.Tensor


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over all B*T tokens per channel (the reference's ``BatchNorm1dPermuted``) on ``[B, T, C]``.

    Under ``torch.distributed`` with more than one process the batch statistics are synchronised across processes
    (differentiably), so a DDP run with the global batch split over ranks computes what one process computes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, C]
        flat = x.reshape(-1, x.shape[-1])
        if self.training and world_size() > 1:
            return _sync_batch_norm(self, flat).reshape(x.shape)
        return super().forward(flat).reshape(x.shape)


def _sync_batch_norm(bn: TokenBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Train-mode BN with sum / sum of squares / count all-reduced over ranks (gradients flow through the reduce)."""
    n_local = torch.tensor([float(x.shape[0])], device=x.device, dtype=x.dtype)
    stats = all_reduce(torch.cat([x.sum(0), (x * x).sum(0), n_local]), differentiable=True)
    c = x.shape[1]
    count = stats[-1]
    mean = stats[:c] / count
    var = (stats[c:2 * c] / count - mean * mean).clamp_min(0)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var * count / (count - 1).clamp_min(1)
            bn.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
            bn.running_var.mul_(1 - momentum).add_(momentum * unbiased.detach())
    y = (x - mean) / torch.sqrt(var + bn.eps)
    if bn.affine:
        y = y * bn.weight + bn.bias
    return y


def build_mlp(in_dim: int, *, n_layers: int, hidden_size: int, n_features: int, activation: str = "relu",
              batch_norm: bool = True) -> nn.Sequential:
    """Linear widths (L=1: D->n_f; L>=2: D->h, (L-2)x h->h, h->n_f), each followed by BN (tokens) and the activation."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    widths = [in_dim] + ([n_features] if n_layers == 1 else [hidden_size] * (n_layers - 1) + [n_features])
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if batch_norm:
            layers.append(TokenBatchNorm(widths[i + 1]))
        layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def pool_tokens(patches: torch.Tensor, cls_tok: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Pool adapted tokens [B, h*w, n_f] (+ CLS [B, n_f]) to [B, n_f]: avg, max (a real max), cls or mean-avg."""
    if pooling == "avg":
        return patches.mean(1)
    if pooling == "max":
        return patches.amax(1)
    if pooling == "cls":
        return cls_tok
    return 0.5 * (cls_tok + patches.mean(1))  # mean-avg


class QPMModel(nn.Module):
    """Adapter + head on cached tokens ``[B, 1 + h*w, D]`` (CLS first). See the module docstring."""

    def __init__(self, embed_dim: int, n_classes: int, grid: tuple[int, int] | list[int], *, n_layers: int = 4,
                 hidden_size: int = 2048, n_features: int = 512, activation: str = "relu", pooling: str = "avg",
                 batch_norm: bool = True, head_dropout: float = 0.2) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if n_layers < 0:
            raise ConfigError(f"n_layers must be >= 0, not {n_layers}")
        if n_layers == 0:
            n_features = embed_dim  # METHOD.md §3.1: no MLP -> the maps are the raw backbone tokens
        if not 1 <= n_features <= MAX_FEATURES:
            raise ConfigError(f"n_features={n_features} cannot be trained (allowed 1..{MAX_FEATURES})")
        if n_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.embed_dim = int(embed_dim)
        self.n_classes = int(n_classes)
        self.grid = (int(grid[0]), int(grid[1]))
        self.n_features = int(n_features)
        self.pooling = pooling
        self._init_config = dict(embed_dim=self.embed_dim, n_classes=self.n_classes, grid=list(self.grid),
                                 n_layers=int(n_layers), hidden_size=int(hidden_size), n_features=self.n_features,
                                 activation=activation, pooling=pooling, batch_norm=bool(batch_norm),
                                 head_dropout=float(head_dropout))
        self.mlp = build_mlp(embed_dim, n_layers=n_layers, hidden_size=hidden_size, n_features=n_features,
                             activation=activation, batch_norm=batch_norm) if n_layers > 0 else nn.Identity()
        self.dropout = nn.Dropout(head_dropout)
        self.linear = nn.Linear(self.n_features, self.n_classes)
        self.selection_info: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------------------- config
    @property
    def config(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_config` rebuilds this model (state dict loaded separately)."""
        cfg = copy.deepcopy(self._init_config)
        cfg["selection"] = copy.deepcopy(self.selection_info)
        return cfg

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QPMModel:
        """Rebuild the architecture (and an empty sparse head of the right shape) from :attr:`config`."""
        cfg = dict(config)
        sel = cfg.pop("selection", None)
        model = cls(**cfg)
        if sel:
            k = len(sel["features"])
            model.set_selection(sel["features"], torch.zeros(model.n_classes, k), torch.zeros(k), torch.ones(k),
                                bias=torch.zeros(model.n_classes) if sel.get("has_bias") else None,
                                trainable_norm=bool(sel.get("trainable_norm")), dropout=float(sel.get("dropout", 0.0)))
        return model

    @property
    def is_sparse(self) -> bool:
        return self.selection_info is not None

    # ----------------------------------------------------------------------------------------------------- heads
    def set_selection(self, features: Any, weight: Any, mu: Any, sigma: Any, bias: Any = None,
                      trainable_norm: bool = False, dropout: float = 0.0) -> None:
        """Replace the dense head with the sparse head on ``features`` (sorted indices into the n_f dense features).

        ``weight [C, K]`` and ``bias [C]`` are frozen; ``mu``/``sigma`` [K] (or [n_f], then indexed by ``features``)
        are frozen for QPM and trainable for SLDD/Q-SENN (``trainable_norm``).
        """
        device = self.linear.weight.device
        idx = torch.as_tensor(features, dtype=torch.long).flatten().to(device)
        k = int(idx.numel())
        if k == 0:
            raise ConfigError("the selection is empty")
        if int(idx.min()) < 0 or int(idx.max()) >= self.n_features:
            raise ConfigError(f"selected feature index out of range 0..{self.n_features - 1}")
        if torch.unique(idx).numel() != k:
            raise ConfigError("selected features contain duplicates")
        w = torch.as_tensor(weight, dtype=torch.float32).to(device)
        if tuple(w.shape) != (self.n_classes, k):
            raise ConfigError(f"selection weight has shape {tuple(w.shape)}, expected ({self.n_classes}, {k})")
        mu_t = torch.as_tensor(mu, dtype=torch.float32).flatten().to(device)
        sigma_t = torch.as_tensor(sigma, dtype=torch.float32).flatten().to(device)
        if mu_t.numel() == self.n_features and k != self.n_features:
            mu_t, sigma_t = mu_t[idx], sigma_t[idx]
        if mu_t.numel() != k or sigma_t.numel() != k:
            raise ConfigError(f"mu/sigma must have {k} (or {self.n_features}) entries")
        for name in ("sel_index", "sel_weight", "sel_bias", "sel_mu", "sel_sigma"):
            if name in self._buffers:
                del self._buffers[name]
            if name in self._parameters:
                del self._parameters[name]
        self.register_buffer("sel_index", idx)
        self.register_buffer("sel_weight", w)
        if bias is not None:
            self.register_buffer("sel_bias", torch.as_tensor(bias, dtype=torch.float32).flatten().to(device))
        if trainable_norm:
            self.sel_mu = nn.Parameter(mu_t.clone())
            self.sel_sigma = nn.Parameter(sigma_t.clone())
        else:
            self.register_buffer("sel_mu", mu_t.clone())
            self.register_buffer("sel_sigma", sigma_t.clone())
        self.dropout = nn.Dropout(dropout)
        self.linear.requires_grad_(False)  # the dense head is kept (for reference) but no longer used or trained
        self.selection_info = {"features": [int(i) for i in idx.tolist()], "has_bias": bias is not None,
                               "trainable_norm": bool(trainable_norm), "dropout": float(dropout)}

    def head_weight(self) -> torch.Tensor:
        """The effective class-feature matrix ``[C, K]``: the dense Linear weight, or the sparse W."""
        return self.sel_weight if self.is_sparse else self.linear.weight

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --------------------------------------------------------------------------------------------------- forward
    def adapt(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``n_f`` feature maps ``[B, n_f, h, w]`` and pooled features ``[B, n_f]`` (before selection/dropout)."""
        b, t, _ = tokens.shape
        h, w = self.grid
        if t != 1 + h * w:
            raise ValueError(f"expected {1 + h * w} tokens (CLS + {h}x{w} patches), got {t}")
        z = self.mlp(tokens)  # [B, T, n_f]
        cls_tok, patches = z[:, 0], z[:, 1:]
        maps = patches.transpose(1, 2).reshape(b, z.shape[-1], h, w)
        return maps, pool_tokens(patches, cls_tok, self.pooling)

    def forward(self, tokens: torch.Tensor) -> ModelOutput:
        maps, f = self.adapt(tokens)
        if not self.is_sparse:
            f = self.dropout(f)
            return ModelOutput(self.linear(f), maps, f)
        idx = self.sel_index
        f = self.dropout(f.index_select(1, idx))
        maps = maps.index_select(1, idx)
        return ModelOutput(sparse_logits(f, self.sel_mu, self.sel_sigma, self.sel_weight,
                                         getattr(self, "sel_bias", None)), maps, f)


def sparse_logits(features: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """The sparse head: ``W @ ((f - mu) / max(sigma, SIGMA_MIN)) + bias`` on selected features ``[B, K]``."""
    return F.linear((features - mu) / sigma.clamp_min(SIGMA_MIN), weight, bias)


class SelectedFeaturesModel(nn.Module):
    """A sparse :class:`QPMModel` with its last adapter layer cut to the selected features (for export and serving).

    BatchNorm and the activation act per channel, so computing only the K selected output channels of the last
    Linear gives exactly ``F[:, sel]``; the other n_f - K channels (462 of 512 by default) are never used by a
    QPM model. With patch-only pooling (avg/max) the CLS token is not run through the MLP either. Outputs equal the
    full model's in eval mode (``qpm export --verify`` checks this against the unpruned model).
    """

    def __init__(self, model: QPMModel) -> None:
        super().__init__()
        layers = list(model.mlp)
        last = max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear))
        sel = model.sel_index.cpu()
        old = layers[last]
        lin = nn.Linear(old.in_features, int(sel.numel()))
        with torch.no_grad():
            lin.weight.copy_(old.weight[sel])
            lin.bias.copy_(old.bias[sel])
        tail: list[nn.Module] = []
        for layer in layers[last + 1:]:
            if isinstance(layer, nn.BatchNorm1d):
                bn = copy.deepcopy(layer)
                bn.num_features = int(sel.numel())
                with torch.no_grad():
                    for name in ("weight", "bias"):
                        setattr(bn, name, nn.Parameter(getattr(layer, name)[sel].clone(), requires_grad=False))
                    for name in ("running_mean", "running_var"):
                        setattr(bn, name, getattr(layer, name)[sel].clone())
                tail.append(bn)
            else:  # an elementwise activation
                tail.append(copy.deepcopy(layer))
        self.mlp = nn.Sequential(*[copy.deepcopy(m) for m in layers[:last]], lin, *tail).eval()
        self.grid = model.grid
        self.pooling = model.pooling
        self.register_buffer("mu", model.sel_mu.detach().clone())
        self.register_buffer("sigma", model.sel_sigma.detach().clone())
        self.register_buffer("weight", model.sel_weight.detach().clone())
        bias = getattr(model, "sel_bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @staticmethod
    def applies_to(model: Any) -> bool:
        """Only sparse models with an MLP whose layers after the last Linear act per channel."""
        if not getattr(model, "is_sparse", False) or not isinstance(model.mlp, nn.Sequential):
            return False
        layers = list(model.mlp)
        linears = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)]
        if not linears:
            return False
        elementwise = (nn.BatchNorm1d, nn.ReLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Identity)
        return all(isinstance(layer, elementwise) for layer in layers[linears[-1] + 1:])

    def forward(self, tokens: torch.Tensor) -> ModelOutput:
        b = tokens.shape[0]
        h, w = self.grid
        patch_only = self.pooling in ("avg", "max")
        z = self.mlp(tokens[:, 1:] if patch_only else tokens)
        patches = z if patch_only else z[:, 1:]
        maps = patches.transpose(1, 2).reshape(b, patches.shape[-1], h, w)
        f = pool_tokens(patches, None if patch_only else z[:, 0], self.pooling)
        return ModelOutput(sparse_logits(f, self.mu, self.sigma, self.weight, self.bias), maps, f)


def pruned(model: QPMModel) -> nn.Module:
    """:class:`SelectedFeaturesModel` of ``model`` where it applies (a sparse model), else ``model`` itself."""
    return SelectedFeaturesModel(model).eval() if SelectedFeaturesModel.applies_to(model) else model


def linear_probe_config(embed_dim: int, n_classes: int, grid: tuple[int, int]) -> dict[str, Any]:
    """The paper's "DINOv2 f_CLS linear probe" row: no MLP, CLS feature, dense head (METHOD.md §3.2, §3.6)."""
    return dict(embed_dim=embed_dim, n_classes=n_classes, grid=list(grid), n_layers=0, hidden_size=0,
                n_features=embed_dim, activation="relu", pooling="cls", batch_norm=False, head_dropout=0.2)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
