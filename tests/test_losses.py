"""Loss terms against hand-computed values (METHOD.md §4)."""

from __future__ import annotations

import math

import torch

from qpmcli.losses import (
    DENSE_WEIGHTS,
    FINETUNE_WEIGHTS,
    LossWeights,
    feature_diversity_loss,
    l1_features,
    l1_maps,
    total_loss,
)


def test_fdl_matches_a_hand_computed_value():
    # B=1, K=2, 1x2 maps. Predicted class 1 (logit 2 > 1); W[1] = [3, -4] -> w = [3, 4] / (5 + 1e-5).
    maps = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # softmax: [1/4, 3/4] and [1/2, 1/2]
    f = torch.tensor([[2.0, 1.0]])  # a = [1, 0.5]
    logits = torch.tensor([[1.0, 2.0]])
    weight = torch.tensor([[1.0, 1.0], [3.0, -4.0]])
    w = torch.tensor([3.0, 4.0]) / (5 + 1e-5)
    # position 0: max(0.25*1*w0, 0.5*0.5*w1); position 1: max(0.75*1*w0, 0.5*0.5*w1)
    expected = -0.5 * (max(0.25 * w[0], 0.25 * w[1]) + max(0.75 * w[0], 0.25 * w[1]))
    got = feature_diversity_loss(maps, f, logits, weight, beta=0.5)
    assert torch.isclose(got, torch.as_tensor(expected), atol=1e-7)


def test_fdl_averages_over_the_batch_and_is_minus_beta_for_one_hot_maps():
    # Each feature fires on its own position with huge margin: softmax is one-hot, a=1, w=1/sqrt(K) per row.
    maps = torch.full((2, 2, 1, 2), -1e4)
    maps[:, 0, 0, 0] = 0
    maps[:, 1, 0, 1] = 0
    f = torch.ones(2, 2)
    weight = torch.ones(3, 2)
    got = feature_diversity_loss(maps, f, torch.zeros(2, 3), weight, beta=1.0)
    assert torch.isclose(got, torch.tensor(-2 / (math.sqrt(2) + 1e-5)), atol=1e-6)


def test_fdl_gradient_reaches_maps_features_and_head_weight():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 2, 2, generator=g)
    maps[:, 1, 0, 0] += 5  # feature 1 (not the largest f) wins position 0, so the gradient reaches f through a
    maps.requires_grad_(True)
    f = torch.tensor([[1.0, 0.9, 0.2], [0.5, 0.4, 1.0]], requires_grad=True)
    weight = torch.randn(4, 3, generator=g, requires_grad=True)
    feature_diversity_loss(maps, f, torch.randn(2, 4, generator=g), weight).backward()
    assert maps.grad.abs().sum() > 0 and f.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


def test_l1_terms():
    maps = torch.tensor([[[[1.0, -3.0]]]])
    assert l1_maps(maps).item() == 2.0
    f = torch.tensor([[2.0, -4.0], [1.0, 1.0]])
    assert l1_features(f).item() == 2.0
    assert math.isclose(l1_features(f, norm_with_max=True).item(), (1 + 2 + 1 + 1) / 4)


def test_phase_defaults_follow_the_paper():
    assert DENSE_WEIGHTS == LossWeights(fdl=0.5)
    assert FINETUNE_WEIGHTS == LossWeights(fdl=1.0, l1_maps=5.0, l1_features=1.0)


def test_total_loss_sums_the_weighted_terms():
    g = torch.Generator().manual_seed(0)
    maps, f = torch.rand(3, 2, 2, 2, generator=g), torch.rand(3, 2, generator=g)
    logits, y, w = torch.randn(3, 4, generator=g), torch.tensor([0, 1, 3]), torch.ones(4, 2)
    loss, parts = total_loss(logits, maps, f, y, w, FINETUNE_WEIGHTS)
    expected = (torch.nn.functional.cross_entropy(logits, y) + feature_diversity_loss(maps, f, logits, w, 1.0)
                + 5 * maps.abs().mean() + f.abs().mean())
    assert torch.isclose(loss, expected)
    assert set(parts) == {"ce", "fdl", "l1_maps", "l1_features"}
    loss0, parts0 = total_loss(logits, maps, f, y, w, LossWeights())
    assert set(parts0) == {"ce"} and torch.isclose(loss0, parts0["ce"])
