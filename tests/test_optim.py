"""The Muon + AdamW split, Muon itself, and the learning-rate schedules."""

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from llm.model import Decoder, DecoderConfig
from shared.errors import ConfigError
from shared.muon import Muon, orthogonalize
from shared.optim import OptimConfig, build_optimizers, lr_multiplier, split_params


@pytest.mark.parametrize("tied", [True, False])
def test_every_parameter_goes_to_exactly_one_optimiser(tied):
    model = Decoder(DecoderConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden=64, vocab_size=40,
                                  tie_embeddings=tied), 16)
    muon, adam = split_params(model)
    ids_m, ids_a = {id(p) for p in muon}, {id(p) for p in adam}
    assert not ids_m & ids_a
    assert ids_m | ids_a == {id(p) for p in model.parameters()}
    assert len(muon) + len(adam) == len({id(p) for p in model.parameters()})
    assert all(p.ndim == 2 for p in muon)
    assert id(model.tok_emb.weight) in ids_a and id(model.lm_head.weight) in ids_a
    assert id(model.blocks[0].attn.q.weight) in ids_m and id(model.blocks[1].mlp.down.weight) in ids_m
    assert id(model.norm.weight) in ids_a and id(model.blocks[0].attn.q_norm.weight) in ids_a
    opts = build_optimizers(model, OptimConfig())
    in_opts = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
    assert sorted(in_opts) == sorted(ids_m | ids_a) and len(in_opts) == len(set(in_opts))


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 96)])
def test_orthogonalisation_brings_singular_values_near_one(shape):
    torch.manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k))
    g = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # condition number 100
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.5, s


def test_muon_step_matches_torch_muon_in_bf16():
    """Our Muon (fp32 Newton-Schulz on CPUs) is torch.optim.Muon's update; in bf16 they agree."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(48, 32)), nn.Parameter(torch.randn(32, 48)), nn.Parameter(torch.randn(48, 32))]
    start = [p.detach().clone() for p in params]
    ours = [nn.Parameter(p.detach().clone()) for p in params]
    ref_opt = torch.optim.Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1, adjust_lr_fn="original")
    our_opt = Muon(ours, lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype=torch.bfloat16)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, ours, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref_opt.step()
        our_opt.step()
    for p, q, p0 in zip(params, ours, start):  # bf16 rounding differs by op order: about 2% here
        assert ((q - p).norm() / (p - p0).norm()).item() < 0.05


def test_conv_filters_go_to_muon_only_when_asked_and_step_as_flattened_matrices():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3))
    assert split_params(model)[0] == []
    muon, adam = split_params(model, conv=True)
    assert [p.shape for p in muon] == [(8, 3, 3, 3), (16, 8, 3, 3)] and all(p.ndim == 1 for p in adam)
    conv = nn.Parameter(torch.randn(16, 8, 3, 3))
    flat = nn.Parameter(conv.detach().reshape(16, 72).clone())
    opts = [Muon([conv], lr=0.05, weight_decay=0.1), Muon([flat], lr=0.05, weight_decay=0.1)]
    for _ in range(2):
        g = torch.randn(16, 8, 3, 3)
        conv.grad, flat.grad = g.clone(), g.reshape(16, 72).clone()
        for o in opts:
            o.step()
    torch.testing.assert_close(conv.detach().reshape(16, 72), flat.detach())


def test_sgd_for_the_rest_gives_heads_their_rate_and_every_group_the_same_decay():
    model = nn.Sequential(OrderedDict(body=nn.Linear(4, 4), norm=nn.LayerNorm(4), head=nn.Linear(4, 2, bias=False)))
    cfg = OptimConfig(other_optimizer="sgd", adam_lr=2.0, head_lr=8.0, adam_weight_decay=0.01, sgd_momentum=0.85)
    muon, sgd = build_optimizers(model, cfg)
    assert isinstance(muon, Muon) and isinstance(sgd, torch.optim.SGD)
    group = {id(p): g for g in sgd.param_groups for p in g["params"]}
    assert group[id(model.head.weight)]["lr"] == 8.0
    assert group[id(model.norm.weight)]["lr"] == group[id(model.body.bias)]["lr"] == 2.0
    for g in sgd.param_groups:  # torch.optim.SGD shrinks by lr * weight_decay per step
        assert g["lr"] * g["weight_decay"] == pytest.approx(0.02) and g["nesterov"] and g["momentum"] == 0.85
    # without head_lr the rest is one group, the layout of checkpoints saved before the option
    _, adam = build_optimizers(model, OptimConfig())
    assert isinstance(adam, torch.optim.AdamW) and len(adam.param_groups) == 1
    with pytest.raises(ConfigError, match="other_optimizer"):
        OptimConfig(other_optimizer="lion")
    with pytest.raises(ConfigError, match="sgd_momentum"):
        OptimConfig(other_optimizer="sgd")  # no momentum given
    with pytest.raises(ConfigError, match="sgd_momentum"):
        OptimConfig(sgd_momentum=0.9)  # would be ignored by AdamW


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError):
        Muon([nn.Parameter(torch.zeros(3))])


@pytest.mark.parametrize("schedule", ["constant", "cosine", "wsd"])
def test_schedules_warm_up_from_a_nonzero_first_step(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, cooldown_frac=0.2, min_lr_ratio=0.1)
    lrs = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[0] > 0
    assert lrs[9] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:10], lrs[1:10]))
    if schedule == "constant":
        assert lrs[-1] == 1.0
    elif schedule == "wsd":
        assert lrs[79] == 1.0 and lrs[81] < 1.0 and lrs[-1] == pytest.approx(0.1 + 0.9 / 20)
    else:
        assert lrs[-1] < 0.2 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert min(lrs) > 0


@pytest.mark.parametrize("schedule", ["constant", "cosine", "wsd"])
@pytest.mark.parametrize("total", [3, 7, 30, 62, 122])
def test_short_runs_warm_up_then_decay_without_a_jump(schedule, total):
    # the 88M preset at 8M tokens: 62 steps, warm-up 50, cool-down over the last 30%
    cfg = OptimConfig(schedule=schedule, warmup_steps=50, cooldown_frac=0.3, min_lr_ratio=0.0)
    lrs = [lr_multiplier(s, total, cfg) for s in range(total)]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1.0)  # the run reaches its full rate (warm-up is at most half of it)
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rises to the peak ...
    if schedule != "constant":
        assert all(a >= b - 1e-12 for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # ... then only falls
    # no jump: no step changes the rate by more than the steeper of the two ramps does
    warm, cooldown = max(1, min(50, total // 2)), max(1, round(0.3 * total))
    slope = max(1 / warm, 1 / cooldown, math.pi / 2 / max(1, total - warm))
    assert all(x > 0 for x in lrs) and all(abs(a - b) <= slope + 1e-9 for a, b in zip(lrs, lrs[1:])), lrs


def test_no_warmup_still_starts_at_full_rate():
    assert lr_multiplier(0, 10, OptimConfig(warmup_steps=0, schedule="wsd")) == 1.0
