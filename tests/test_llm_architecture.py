"""The architecture options: each keeps causality and cached decoding, and changes nothing when off."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from llm.model import Decoder, DecoderConfig
from shared.errors import ConfigError
from shared.losses import linear_cross_entropy
from shared.moe import MoEConfig

BASE = dict(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden=64, vocab_size=64)
OPTIONS = {
    "pyramid": dict(mlp_hidden_last=192),
    "depth_init": dict(depth_init=True, zero_init_out=False),
    "gated_attn": dict(gated_attn=True),
    "sandwich_norm": dict(sandwich_norm=True),
    "embed_scale": dict(embed_scale=True),
    "value_embeds": dict(value_embeds=2),
    "residual_scalars": dict(residual_scalars=True),
    "logit_softcap": dict(logit_softcap=5.0),
    "untied_head": dict(tie_embeddings=False),
    "embed_norm": dict(embed_norm=True),
    "qk_scale": dict(qk_scale=1.2),
    "smear": dict(smear=True),
    "value_gate": dict(value_embeds=2, value_gate=True),
    "init_nanochat": dict(init="nanochat", value_embeds=1),
    "residual_init_nanochat": dict(residual_scalars=True, residual_init="nanochat"),
    "moe": dict(moe=MoEConfig(experts=4, top_k=2, hidden=32)),
}
OFF_VALUES = {"qk_scale": 1.0, "init": "normal", "residual_init": "identity"}  # the rest are off when falsy


def model(**kw) -> Decoder:
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(**{**BASE, "zero_init_out": False, **kw}), 24)
    return m.eval()


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_is_causal_and_decodes_with_the_cache(name):
    m = model(**OPTIONS[name])
    if name == "smear":  # it starts off (lambda = 0): switch it on to test it
        m.smear_lambda.data.fill_(0.7)
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        a, b = m(x), m(y)
        assert torch.allclose(a[:, :9], b[:, :9], atol=1e-5)  # the past never sees the future
        assert not torch.allclose(a[:, 9:], b[:, 9:])
        cache = m.new_cache(2)
        steps = [m(x[:, :5], cache)] + [m(x[:, t:t + 1], cache) for t in range(5, 16)]
        assert torch.allclose(torch.cat(steps, 1), a, atol=1e-4)  # prompt then token by token = one pass


@pytest.mark.parametrize("name", ["residual_scalars", "sandwich_norm", "smear"])
def test_identity_at_start_options_change_nothing_at_initialisation(name):
    """Residual scalars start at (1, 0); a sandwich norm of a zero-initialised output is zero; the
    smear's mix starts at lambda = 0."""
    kw = dict(zero_init_out=True)
    x = torch.randint(0, 64, (2, 16))
    plain, with_option = model(**kw), model(**kw, **OPTIONS[name])
    with_option.load_state_dict(plain.state_dict(), strict=False)  # the same weights (building the gate drew random numbers)
    with torch.no_grad():
        assert torch.equal(plain(x), with_option(x))


def test_options_off_leave_the_default_model():
    defaults = DecoderConfig(**BASE)
    for field in dataclasses.fields(DecoderConfig):
        if any(field.name in o for o in OPTIONS.values()) and field.name not in ("zero_init_out", "tie_embeddings"):
            default = getattr(defaults, field.name)
            off = default == OFF_VALUES[field.name] if field.name in OFF_VALUES else not default
            assert off, field.name  # every option is off unless asked for
    m = model()
    assert set(m.state_dict()) == {k for k in m.state_dict() if k.startswith(("tok_emb", "blocks", "norm", "lm_head"))}
    assert not any("gate" in k or "post_norm1.weight" in k for k in m.state_dict())


def test_softcap_in_the_chunked_loss_matches_the_full_logits():
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (40,))
    loss = linear_cross_entropy(h, w, t, chunk=16, softcap=3.0)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(3.0 * torch.tanh((h @ w.t()) / 3.0), t)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-5)
    assert torch.allclose(gh, h.grad, atol=1e-5) and torch.allclose(gw, w.grad, atol=1e-5)


def test_pyramid_widths_and_depth_init_scales():
    m = model(mlp_hidden_last=192, depth_init=True, zero_init_out=False)
    widths = [b.mlp.up.out_features for b in m.blocks]
    assert widths[0] == 64 and widths[-1] == 192 and widths == sorted(widths)
    stds = [b.attn.o.weight.std().item() for b in m.blocks]
    assert all(s > 0 for s in stds) and stds[0] > stds[-1]  # never a zero-std layer; deeper is smaller
    with pytest.raises(ConfigError, match="zero_init_out"):
        DecoderConfig(**BASE, depth_init=True)
    with pytest.raises(ConfigError, match="value_embeds"):
        DecoderConfig(**BASE, value_embeds=5)


def test_qk_scale_is_a_scale_of_the_normed_queries_and_keys():
    """q and k times s after QK-norm (RoPE is linear, so before or after it) is the QK-norm gains times s."""
    x = torch.randint(0, 64, (2, 16))
    scaled, plain = model(qk_scale=1.2), model()
    with torch.no_grad():
        for block in plain.blocks:
            block.attn.q_norm.weight.mul_(1.2)
            block.attn.k_norm.weight.mul_(1.2)
        assert torch.allclose(scaled(x), plain(x), atol=1e-5)
        doc_ids = torch.zeros_like(x)  # the masked path (document masks) scales the same way
        assert torch.allclose(scaled(x, targets=x, doc_ids=doc_ids), plain(x, targets=x, doc_ids=doc_ids), atol=1e-5)


def test_smear_mixes_the_previous_embedding_and_value_gates_start_open():
    m = model(smear=True)
    m.smear_lambda.data.fill_(1.0)
    x = torch.tensor([[1, 2, 3]])
    e = m.tok_emb(x)
    gate = torch.sigmoid(m.smear_gate(e[:, 1:, :24]))
    assert torch.allclose(m.smear(e, None), torch.cat([e[:, :1], e[:, 1:] + gate * e[:, :-1]], 1))
    cache = m.new_cache(1)
    cache.prev = e[:, :1]
    assert torch.allclose(m.smear(e[:, 1:2], cache), e[:, 1:2] + gate[:, :1] * e[:, :1])  # decoding reads the cache
    assert torch.equal(cache.prev, e[:, 1:2]) and torch.equal(cache.repeat_rows(3).prev, e[:, 1:2].repeat(3, 1, 1))
    gated = model(value_embeds=1, value_gate=True)
    assert [b.attn.value_gate is not None for b in gated.blocks] == [True, False, False, True]
    with pytest.raises(ConfigError, match="value_gate"):
        DecoderConfig(**BASE, value_gate=True)
    with pytest.raises(ConfigError, match="qk_scale"):
        DecoderConfig(**BASE, qk_scale=0.0)


def test_nanochat_inits_are_uniform_at_its_scales_and_start_the_scalars_where_it_does():
    wide = dict(BASE, d_model=256, mlp_hidden=1024, n_layers=4)
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(**wide, init="nanochat", value_embeds=1, mlp="swiglu"), 24)
    bound = 3 ** 0.5 / 256 ** 0.5
    for w in (m.blocks[0].attn.q.weight, m.blocks[3].attn.v.weight, m.value_embeds[0].weight):
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(1 / 16, rel=0.05)  # uniform, std 1/sqrt(d)
    for w in (m.blocks[1].mlp.up.weight, m.blocks[1].mlp.gate.weight):
        assert w.abs().max() <= 0.4 * bound and w.std().item() == pytest.approx(0.4 / 16, rel=0.05)
    assert m.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)  # a tied embedding keeps init_std
    untied = Decoder(DecoderConfig(**wide, init="nanochat", tie_embeddings=False), 24)
    assert untied.tok_emb.weight.std().item() == pytest.approx(0.8, rel=0.05)
    assert untied.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert not m.blocks[0].attn.o.weight.any() and not m.blocks[0].mlp.down.weight.any()  # outputs still zero
    s = Decoder(DecoderConfig(**BASE, residual_scalars=True, residual_init="nanochat"), 24)
    assert torch.allclose(s.resid_scale, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    assert torch.allclose(s.x0_scale, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    with pytest.raises(ConfigError, match="residual_scalars"):
        DecoderConfig(**BASE, residual_init="nanochat")
    # a mixture: its experts' input matrices (stacked) and its shared expert's, as a dense MLP's
    moe = Decoder(DecoderConfig(**wide, init="nanochat", moe=MoEConfig(experts=4, top_k=2, hidden=256,
                                                                       shared_experts=1)), 24)
    for w in (moe.blocks[2].mlp.up, moe.blocks[2].mlp.shared.up.weight):
        assert w.abs().max() <= 0.4 * bound and w.std().item() == pytest.approx(0.4 / 16, rel=0.05)
