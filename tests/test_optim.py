"""The Muon + AdamW split, Muon itself, and the learning-rate schedules."""

import math
from collections import OrderedDict

import pytest
import torch
from conftest import ROOT
from torch import nn

from judge.config import ClassifierOptimConfig, ClassifierRunConfig
from llm.model import Decoder, DecoderConfig
from shared.config import load_config
from shared.contracts import ModelHooks
from shared.errors import ConfigError
from shared.muon import STACKED, Muon, orthogonalize
from shared.optim import OptimConfig, apply_schedule, build_optimizers, lr_multiplier, muon_momentum, split_params


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


class _HeadedNet(ModelHooks, nn.Sequential):
    ADAM_NAMES = HEAD_NAMES = ("head",)  # as the classifiers declare their head


def test_sgd_for_the_rest_gives_heads_their_rate_and_every_group_the_same_decay():
    model = _HeadedNet(OrderedDict(body=nn.Linear(4, 4), norm=nn.LayerNorm(4), head=nn.Linear(4, 2, bias=False)))
    cfg = ClassifierOptimConfig(other_optimizer="sgd", adam_lr=2.0, head_lr=8.0, adam_weight_decay=0.01, sgd_momentum=0.85)
    muon, sgd = build_optimizers(model, cfg)
    assert isinstance(muon, Muon) and isinstance(sgd, torch.optim.SGD)
    group = {id(p): g for g in sgd.param_groups for p in g["params"]}
    assert group[id(model.head.weight)]["lr"] == 8.0
    assert group[id(model.norm.weight)]["lr"] == group[id(model.body.bias)]["lr"] == 2.0
    for g in sgd.param_groups:  # torch.optim.SGD shrinks by lr * weight_decay per step
        assert g["lr"] * g["weight_decay"] == pytest.approx(0.02) and g["nesterov"] and g["momentum"] == 0.85
    # without head_lr the rest is one group, the layout of checkpoints saved before the option
    _, adam = build_optimizers(model, ClassifierOptimConfig())
    assert isinstance(adam, torch.optim.AdamW) and len(adam.param_groups) == 1
    with pytest.raises(ConfigError, match="other_optimizer"):
        ClassifierOptimConfig(other_optimizer="lion")
    with pytest.raises(ConfigError, match="sgd_momentum"):
        ClassifierOptimConfig(other_optimizer="sgd")  # no momentum given
    with pytest.raises(ConfigError, match="sgd_momentum"):
        ClassifierOptimConfig(sgd_momentum=0.9)  # would be ignored by AdamW


# ------------------------------------------------------------------ every model's split, as before
# Before the models declared ADAM_NAMES, the scripts passed split_kwargs and split_params matched
# module names against them, or against its default; this is that rule, copied as it was.
_DEFAULT_NAMES = ("lm_head", "head", "router")


def _split_before(model: nn.Module, adam_names: tuple[str, ...], conv: bool) -> tuple[list, list]:
    muon, adam, seen = [], [], set()
    for mod_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_head = mod_name.split(".")[-1] in adam_names
            matrix = p.ndim == 2 or (conv and p.ndim == 4 and isinstance(module, nn.Conv2d)) or getattr(p, STACKED, False)
            if matrix and not isinstance(module, (nn.Embedding,)) and not is_head:
                muon.append(p)
            else:
                adam.append(p)
    return muon, adam


def _llm(preset: str, *overrides: str):
    from llm.config import LLMRunConfig
    cfg = load_config(LLMRunConfig, ROOT / "configs" / "llm" / f"{preset}.toml", ["model.vocab_size=64", *overrides])
    return Decoder(cfg.model, cfg.data.seq_len), cfg.optim, _DEFAULT_NAMES


def _vqvae(*overrides: str):
    from vqvae.config import VQVAERunConfig
    from vqvae.model import VQVAE
    cfg = load_config(VQVAERunConfig, ROOT / "configs" / "vqvae" / "debug.toml", list(overrides))
    return VQVAE(cfg.model, cfg.discriminator()), cfg.optim, ("quantizer",)  # scripts/train_vqvae.py's


def _dit():
    from flow_matching.config import FlowMatchingRunConfig
    from flow_matching.dit import DiT2D
    cfg = load_config(FlowMatchingRunConfig, ROOT / "configs" / "flow_matching" / "debug.toml", ["model.num_classes=10"])
    return DiT2D(cfg.model), cfg.optim, ("patch_embed", "head")  # scripts/train_flow_matching.py's


def _multimodal():
    from multimodal.config import MultimodalRunConfig
    from multimodal.model import MultimodalDecoder
    from multimodal.vocab import Vocabulary
    cfg = load_config(MultimodalRunConfig, ROOT / "configs" / "multimodal" / "debug.toml", ["model.vocab_size=128"])
    return MultimodalDecoder(cfg.model, 40, Vocabulary(64, 32, (4, 4), "text", "vq")), cfg.optim, _DEFAULT_NAMES


def _classifier(preset: str):
    from judge.classifier import build_classifier
    cfg = load_config(ClassifierRunConfig, ROOT / "configs" / "classifier" / f"{preset}.toml", ["model.num_classes=10"])
    return build_classifier(cfg.model), cfg.optim, _DEFAULT_NAMES


MODELS = {
    "llm-dense": lambda: _llm("debug"),
    "llm-moe": lambda: _llm("moe-debug"),
    "llm-untied": lambda: _llm("debug", "model.tie_embeddings=false", "model.value_embeds=1"),
    "vqvae": lambda: _vqvae(),
    "vqvae-loss-codebook-gan": lambda: _vqvae("model.codebook_update=\"loss\"", "gan.weight=0.1"),
    "dit": _dit,
    "multimodal": _multimodal,
    "classifier-resnet9": lambda: _classifier("resnet9"),
    "classifier-airbench": lambda: _classifier("airbench"),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_model_splits_between_muon_and_adamw_as_its_script_did(name):
    """Each model's ADAM_NAMES gives the split that the scripts' split_kwargs (or the default
    names) gave, parameter for parameter, in the same order."""
    torch.manual_seed(0)
    model, optim, names_before = MODELS[name]()
    param_name = {id(p): n for n, p in model.named_parameters()}
    now = [[param_name[id(p)] for p in ps] for ps in split_params(model, conv=optim.muon_conv)]
    before = [[param_name[id(p)] for p in ps] for ps in _split_before(model, names_before, optim.muon_conv)]
    assert now[0] == before[0] and now[1] == before[1]
    assert now[0] and now[1]  # both optimisers have work: the comparison is not vacuous
    opts = build_optimizers(model, optim)
    assert [[param_name[id(p)] for g in o.param_groups for p in g["params"]] for o in opts] == now


def test_the_airbench_head_rate_reaches_the_modules_named_head():
    """The classifier's head group holds what the rule before held: every module whose name ends in "head"."""
    model, optim, _ = _classifier("airbench")
    _, sgd = build_optimizers(model, optim)
    before = {id(p) for name, m in model.named_modules() if name.endswith("head") for p in m.parameters()}
    assert isinstance(sgd, torch.optim.SGD) and [g["lr"] for g in sgd.param_groups] == [optim.adam_lr, optim.head_lr]
    assert {id(p) for p in sgd.param_groups[1]["params"]} == before


def test_runs_saved_with_the_classifier_keys_in_shared_optim_still_load(tmp_path):
    """Every run's config.toml held optim.other_optimizer, sgd_momentum and head_lr before they
    moved to the classifier's config: at their defaults they load, otherwise one line refuses them
    (head_lr is a shared setting again: the untied LLM head's rate)."""
    from llm.config import LLMRunConfig
    old = ["optim.other_optimizer=\"adamw\"", "optim.sgd_momentum=0.0", "optim.head_lr=0"]
    cfg = load_config(LLMRunConfig, ROOT / "configs" / "llm" / "debug.toml", old)
    assert cfg == load_config(LLMRunConfig, ROOT / "configs" / "llm" / "debug.toml")
    with pytest.raises(ConfigError, match=r"'optim.sgd_momentum' = 0.5 is retired; only its old default 0.0 still loads"):
        load_config(LLMRunConfig, ROOT / "configs" / "llm" / "debug.toml", ["optim.sgd_momentum=0.5"])
    with pytest.raises(ConfigError, match="unknown config key 'optim.head_rate'"):
        load_config(LLMRunConfig, ROOT / "configs" / "llm" / "debug.toml", ["optim.head_rate=5.0"])
    clf = load_config(ClassifierRunConfig, ROOT / "configs" / "classifier" / "airbench.toml").optim
    assert (clf.other_optimizer, clf.sgd_momentum, clf.head_lr) == ("sgd", 0.85, 1340.0)


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


@pytest.mark.parametrize("total", [20, 74, 114, 115, 245])
def test_a_long_warm_down_ends_the_warm_up_early_so_the_peak_is_reached(total):
    # the carried recipe (warm-up 40, the last 65% to 5%) at a few dozen steps: blueberry-88m's reduced run has 74
    cfg = OptimConfig(schedule="wsd", warmup_steps=40, cooldown_frac=0.65, min_lr_ratio=0.05)
    lrs = [lr_multiplier(s, total, cfg) for s in range(total)]
    start = total - round(0.65 * total)
    assert max(lrs) == 1.0 and lrs.index(1.0) == min(40, start) - 1  # at full rate the step before the decay
    assert all(a <= b for a, b in zip(lrs[:start], lrs[1:start])) and all(a >= b for a, b in zip(lrs[start - 1:], lrs[start:]))
    whole = OptimConfig(schedule="wsd", warmup_steps=10, cooldown_frac=1.0)  # a warm-down over the whole run keeps its warm-up
    assert lr_multiplier(0, 100, whole) == pytest.approx(0.1)


def test_no_warmup_still_starts_at_full_rate():
    assert lr_multiplier(0, 10, OptimConfig(warmup_steps=0, schedule="wsd")) == 1.0


def test_embedding_and_head_rates_take_their_own_groups_only_when_set():
    def groups(tied: bool, **kw) -> list[tuple[float, set]]:
        model = Decoder(DecoderConfig(vocab_size=64, d_model=32, n_heads=4, tie_embeddings=tied, value_embeds=1), 16)
        _, adam = build_optimizers(model, OptimConfig(adam_lr=1e-3, **kw))
        names = {id(p): n for n, p in model.named_parameters()}
        return [(g["lr"], {names[id(p)] for p in g["params"]}) for g in adam.param_groups]

    assert [lr for lr, _ in groups(False)] == [1e-3]  # unset: one group, as before (old optimiser states load)
    rest, embed, head = groups(False, embed_lr=0.3, head_lr=4e-3)
    assert embed == (0.3, {"tok_emb.weight", "value_embeds.0.weight"}) and head == (4e-3, {"lm_head.weight"})
    assert rest[0] == 1e-3 and "norm.weight" in rest[1]
    assert groups(True, embed_lr=0.3)[1] == (0.3, {"tok_emb.weight", "value_embeds.0.weight"})  # tied: the head is the embedding


def test_untied_head_rate_needs_an_untied_head():
    from llm.config import LLMRunConfig
    with pytest.raises(ConfigError, match="optim.head_lr.*tied"):
        load_config(LLMRunConfig, ROOT / "configs" / "llm" / "debug.toml", ["optim.head_lr=0.01"])
    assert load_config(LLMRunConfig, ROOT / "configs" / "llm" / "debug.toml",
                       ["optim.head_lr=0.01", "model.tie_embeddings=false"]).optim.head_lr == 0.01


def test_muon_momentum_warms_up_then_holds():
    cfg = OptimConfig(muon_momentum=0.95, muon_momentum_start=0.85, muon_momentum_warmup=10)
    assert [round(muon_momentum(s, cfg), 4) for s in (0, 5, 10, 50)] == [0.85, 0.9, 0.95, 0.95]
    assert muon_momentum(0, OptimConfig()) == OptimConfig().muon_momentum  # off by default
    model = Decoder(DecoderConfig(vocab_size=64, d_model=32, n_heads=4), 16)
    opts = build_optimizers(model, cfg)
    apply_schedule(opts, 5, 100, cfg)
    muon = [o for o in opts if isinstance(o, Muon)][0]
    assert muon.param_groups[0]["momentum"] == pytest.approx(0.9)
    assert all("momentum" not in g for o in opts if not isinstance(o, Muon) for g in o.param_groups)


def test_normuon_evens_the_rows_at_the_update_norm_and_keeps_its_moment():
    """NorMuon (optim.muon_beta2): each row of a tall update (each column of a wide one) divided by
    the root of its running mean square, then scaled back to the update's norm."""
    torch.manual_seed(0)
    for shape in ((48, 32), (32, 48)):
        p = nn.Parameter(torch.randn(*shape))
        q = nn.Parameter(p.detach().clone())
        plain, nor = Muon([p], lr=0.1, momentum=0.0), Muon([q], lr=0.1, momentum=0.0, beta2=0.5)
        g = torch.randn(*shape)
        p.grad, q.grad = g.clone(), g.clone()
        plain.step()
        nor.step()
        u = orthogonalize(g[None], 5)[0]  # momentum 0: the update is the orthogonalised gradient
        dim = -1 if shape[0] >= shape[1] else -2
        v = 0.5 * u.square().mean(dim=dim, keepdim=True)  # the moment after one step from zero
        want = u / v.sqrt() * (u.norm() / (u / v.sqrt()).norm())
        step = 0.1 * max(1.0, shape[0] / shape[1]) ** 0.5
        assert torch.allclose((p.detach() - q.detach()) / step, want - u, atol=1e-5)
        assert torch.allclose(nor.state[q][f"second_moment_{shape[0]}x{shape[1]}"][0], v, atol=1e-6)
        assert (want.norm() - u.norm()).abs() < 1e-4 and not torch.allclose(want, u, atol=1e-3)


def test_cautious_weight_decay_only_where_update_and_weight_agree():
    torch.manual_seed(0)
    q = nn.Parameter(torch.randn(16, 16))
    opt = Muon([q], lr=0.1, momentum=0.0, weight_decay=0.5, cautious_wd=True)
    g = torch.randn(16, 16)
    q.grad = g.clone()
    start = q.detach().clone()
    opt.step()
    u = orthogonalize(g[None], 5)[0]
    agree = (u * start) >= 0
    assert torch.allclose(q.detach(), start - 0.1 * u - 0.05 * start * agree, atol=1e-6)
    assert 0 < agree.float().mean() < 1  # some weights decay, others not


def test_normuon_and_cautious_decay_are_options_off_by_default():
    model = Decoder(DecoderConfig(vocab_size=64, d_model=32, n_heads=4), 16)
    muon = [o for o in build_optimizers(model, OptimConfig()) if isinstance(o, Muon)][0]
    assert muon.param_groups[0]["beta2"] == 0.0 and muon.param_groups[0]["cautious_wd"] is False
    cfg = OptimConfig(muon_beta2=0.9, muon_cautious_wd=True, muon_weight_decay=0.1)
    muon = [o for o in build_optimizers(model, cfg) if isinstance(o, Muon)][0]
    assert muon.param_groups[0]["beta2"] == 0.9 and muon.param_groups[0]["cautious_wd"] is True
    with pytest.raises(ConfigError, match="muon_beta2"):
        OptimConfig(muon_beta2=1.0)
    with pytest.raises(ConfigError, match="muon_beta2"):
        OptimConfig(muon_beta2=float("nan"))


def test_normuon_keeps_one_moment_per_expert_matrix():
    """Stacked experts [E, out, in] are E matrices: NorMuon on them equals NorMuon on each alone."""
    torch.manual_seed(0)
    stacked = nn.Parameter(torch.randn(3, 16, 8))
    setattr(stacked, STACKED, True)
    alone = [nn.Parameter(stacked.detach()[e].clone()) for e in range(3)]
    opts = [Muon([stacked], lr=0.1, beta2=0.9), *(Muon([a], lr=0.1, beta2=0.9) for a in alone)]
    for _ in range(3):
        g = torch.randn(3, 16, 8)
        stacked.grad = g.clone()
        for e, a in enumerate(alone):
            a.grad = g[e].clone()
        for opt in opts:
            opt.step()
    assert opts[0].state[stacked]["second_moment_16x8"].shape == (3, 16, 1)
    for e, a in enumerate(alone):
        assert torch.allclose(stacked.detach()[e], a.detach(), atol=1e-6)


def test_normuon_on_a_merged_group_also_steps_a_member_alone():
    """A merged group whose member has no gradient this step orthogonalises the others alone: each
    matrix shape keeps its own second moment."""
    torch.manual_seed(0)
    q, k = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))
    opt = Muon([q, k], lr=0.1, beta2=0.9, merged=[[q, k]])
    q.grad, k.grad = torch.randn(8, 8), torch.randn(8, 8)
    opt.step()
    q.grad, k.grad = torch.randn(8, 8), None
    opt.step()
    assert opt.state[q]["second_moment_16x8"].shape == (1, 16, 1) and opt.state[q]["second_moment_8x8"].shape == (1, 8, 1)
    assert torch.isfinite(q).all() and "second_moment_8x8" not in opt.state[k]
