"""Training losses of DINO-QPM (METHOD.md §4, with §13 C8/C9): CE, feature diversity loss, L1 sparsity losses.

Phase weights (§4.6): dense ``CE + 0.5 FDL``; finetune ``CE + 1.0 FDL + 5 mean|F_sel| + 1 mean|f_sel|``.
CE and FDL are always summed; the L1 terms only when their weight exceeds 1e-6 (§13 C8). Nothing in the FDL is
detached (§13 C9): in the dense phase it also back-propagates into the head weight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

WEIGHT_EPS = 1e-6  # loss gate (§4 intro, B4)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms. ``norm_with_max`` divides each feature row by its max before the L1-FV term."""

    fdl: float = 0.0
    l1_maps: float = 0.0
    l1_features: float = 0.0
    norm_with_max: bool = False

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self)


DENSE_WEIGHTS = LossWeights(fdl=0.5)
FINETUNE_WEIGHTS = LossWeights(fdl=1.0, l1_maps=5.0, l1_features=1.0)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, no label smoothing (§4.1)."""
    return F.cross_entropy(logits, labels)


def feature_diversity_loss(maps: torch.Tensor, features: torch.Tensor, logits: torch.Tensor,
                           head_weight: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """L_FDL = -(beta/B) sum_b sum_p max_k [softmax_p(M_bk)(p) * a_bk * w_bk]  (METHOD.md §4.2).

    ``maps [B, K, H, W]``, ``features [B, K]`` (the head input after dropout), ``logits [B, C]``,
    ``head_weight [C, K]``. ``w_b = |W[argmax z_b]| / (||W[argmax z_b]||_2 + 1e-5)``,
    ``a_bk = f_bk / max(max_j f_bj, 1e-6)``.
    """
    b, k = maps.shape[:2]
    predicted = logits.argmax(1)  # predicted class, first index on ties (B5)
    rows = head_weight[predicted]  # [B, K]
    w = rows.abs() / (rows.norm(dim=1, keepdim=True) + 1e-5)
    soft = torch.softmax(maps.reshape(b, k, -1).float(), dim=-1)  # [B, K, HW]
    scale = features / features.amax(dim=1, keepdim=True).clamp_min(1e-6)
    weighted = soft * (scale * w).unsqueeze(-1)
    return -beta / b * weighted.amax(dim=1).sum()


def l1_maps(maps: torch.Tensor) -> torch.Tensor:
    """mean |M| over all entries of the returned maps (§4.3: 'minimise spatial scatter')."""
    return maps.abs().mean()


def l1_features(features: torch.Tensor, norm_with_max: bool = False) -> torch.Tensor:
    """mean |f| over the head's input features (§4.4); optionally each row divided by max(row max, 1e-10)."""
    if norm_with_max:
        features = features / features.amax(dim=1, keepdim=True).clamp_min(1e-10)
    return features.abs().mean()


def total_loss(logits: torch.Tensor, maps: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
               head_weight: torch.Tensor, weights: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The phase loss and its parts (detached scalars, for logging without a device sync per step)."""
    ce = cross_entropy(logits, labels)
    loss = ce
    parts = {"ce": ce.detach()}
    if weights.fdl != 0:  # beta = 0 contributes exactly 0 (the reference computes it anyway)
        fdl = feature_diversity_loss(maps, features, logits, head_weight, beta=weights.fdl)
        loss = loss + fdl
        parts["fdl"] = fdl.detach()
    if weights.l1_maps > WEIGHT_EPS:
        term = weights.l1_maps * l1_maps(maps)
        loss = loss + term
        parts["l1_maps"] = term.detach()
    if weights.l1_features > WEIGHT_EPS:
        term = weights.l1_features * l1_features(features, weights.norm_with_max)
        loss = loss + term
        parts["l1_features"] = term.detach()
    return loss, parts
