"""The adapter model: shapes, pooling, heads, selection (METHOD.md §3)."""

from __future__ import annotations

import pytest
import torch

from qpmcli.errors import ConfigError
from qpmcli.model import QPMModel, linear_probe_config


def _tokens(b=3, h=2, w=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1 + h * w, d, generator=g)


def test_default_mlp_has_the_reference_widths_and_parameter_count():
    m = QPMModel(768, 200, (16, 16))
    linears = [x for x in m.mlp if isinstance(x, torch.nn.Linear)]
    assert [(x.in_features, x.out_features) for x in linears] == [(768, 2048), (2048, 2048), (2048, 2048),
                                                                      (2048, 512)]
    mlp_params = sum(p.numel() for p in m.mlp.parameters())
    assert mlp_params == 768 * 2048 + 2048 + 2 * (2048 * 2048 + 2048) + 2048 * 512 + 512 + 2 * (3 * 2048 + 512)


def test_forward_shapes_and_avg_pooling_are_mean_of_patch_maps():
    m = QPMModel(8, 4, (2, 3), n_layers=2, hidden_size=16, n_features=5).eval()
    out = m(_tokens())
    assert out.logits.shape == (3, 4) and out.maps.shape == (3, 5, 2, 3) and out.features.shape == (3, 5)
    assert torch.allclose(out.features, out.maps.mean((2, 3)), atol=1e-6)
    assert (out.maps >= 0).all()  # ReLU after the last BN
    assert m.head_weight().shape == (4, 5)


def test_patch_maps_are_row_major_and_cls_is_first():
    m = QPMModel(4, 2, (2, 3), n_layers=0, pooling="cls").eval()
    x = _tokens(b=1, d=4)
    out = m(x)
    assert torch.equal(out.maps[0, :, 1, 2], x[0, 1 + 1 * 3 + 2])
    assert torch.equal(out.features[0], x[0, 0])


@pytest.mark.parametrize("pooling", ["max", "mean-avg"])
def test_max_is_a_real_max_and_mean_avg_averages_cls_and_patch_mean(pooling):
    m = QPMModel(4, 2, (2, 3), n_layers=0, pooling=pooling).eval()
    x = _tokens(b=2, d=4)
    f = m(x).features
    expected = x[:, 1:].amax(1) if pooling == "max" else 0.5 * (x[:, 0] + x[:, 1:].mean(1))
    assert torch.allclose(f, expected)


def test_batch_norm_statistics_include_every_token():
    m = QPMModel(4, 2, (1, 2), n_layers=1, n_features=3, activation="tanh").train()
    bn = m.mlp[1]
    x = _tokens(b=2, h=1, w=2, d=4)
    m(x)
    lin = m.mlp[0](x.reshape(-1, 4))
    assert torch.allclose(bn.running_mean, 0.1 * lin.mean(0), atol=1e-6)


def test_qpm_head_standardises_selected_features_with_binary_weight_and_no_bias():
    m = QPMModel(8, 3, (2, 3), n_layers=1, n_features=6).eval()
    x = _tokens(d=8)
    dense = m(x)
    sel = [1, 4]
    w = torch.tensor([[1.0, 0], [0, 1], [1, 1]])
    mu, sigma = torch.arange(6.0) / 10, torch.tensor([1.0, 2, 1, 1, 0, 1])  # sigma 0 is clamped to 1e-6
    m.set_selection(sel, w, mu, sigma)
    out = m(x)
    f = dense.features[:, sel]
    expected = ((f - mu[sel]) / sigma[sel].clamp_min(1e-6)) @ w.T
    assert torch.allclose(out.logits, expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(out.maps, dense.maps[:, sel]) and torch.equal(out.features, f)
    assert torch.equal(m.head_weight(), w)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mlp.") for n in trainable)


def test_sldd_head_has_bias_trainable_normalisation_and_dropout():
    m = QPMModel(8, 2, (2, 3), n_layers=1, n_features=4)
    m.set_selection([0, 2], torch.tensor([[0.5, -1.0], [2.0, 0.0]]), torch.zeros(2), torch.ones(2),
                    bias=torch.tensor([0.1, -0.2]), trainable_norm=True, dropout=0.1)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {"sel_mu", "sel_sigma"} <= names
    assert m.dropout.p == 0.1
    m.eval()
    out = m(_tokens(d=8))
    expected = out.features @ torch.tensor([[0.5, -1.0], [2.0, 0.0]]).T + torch.tensor([0.1, -0.2])
    assert torch.allclose(out.logits, expected, atol=1e-5)


def test_config_round_trip_rebuilds_the_same_function():
    m = QPMModel(8, 3, (2, 3), n_layers=3, hidden_size=16, n_features=6, pooling="max").eval()
    m.set_selection([0, 5], torch.ones(3, 2), torch.zeros(6), torch.ones(6))
    m2 = QPMModel.from_config(m.config)
    m2.load_state_dict(m.state_dict())
    m2.eval()
    x = _tokens(d=8)
    assert torch.equal(m(x).logits, m2(x).logits)


def test_linear_probe_has_only_a_head_and_uses_cls():
    m = QPMModel(**linear_probe_config(8, 3, (2, 3)))
    assert [n for n, _ in m.named_parameters()] == ["linear.weight", "linear.bias"]
    assert m.n_features == 8 and m.pooling == "cls"


@pytest.mark.parametrize("kwargs, msg", [
    (dict(pooling="median"), "unknown pooling"),
    (dict(activation="swish"), "unknown activation"),
    (dict(n_features=10**6), "cannot be trained"),
])
def test_bad_model_options_are_clear_errors(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        QPMModel(8, 3, (2, 3), n_layers=1, **kwargs)


def test_bad_selection_is_rejected():
    m = QPMModel(8, 3, (2, 3), n_layers=1, n_features=4)
    with pytest.raises(ConfigError, match="out of range"):
        m.set_selection([0, 9], torch.ones(3, 2), torch.zeros(2), torch.ones(2))
    with pytest.raises(ConfigError, match="shape"):
        m.set_selection([0, 1], torch.ones(2, 2), torch.zeros(2), torch.ones(2))
