"""Attention, RoPE and the decoder: the properties the rest of the project relies on."""

import torch

from llm.generate import generate, real_tokens
from llm.model import Decoder, DecoderConfig
from shared.blocks import Attention, apply_rope, rope_1d, rope_2d


def tiny_decoder(**kw) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=128, vocab_size=97,
                        zero_init_out=False, **kw)
    return Decoder(cfg, max_seq_len=64).eval()


def test_changing_a_future_token_never_changes_earlier_logits():
    model = tiny_decoder()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def reference_attention(attn: Attention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """Plain multi-head attention written out, each query head with its own K/V head."""
    b, t, _ = x.shape
    h, d = attn.n_heads, attn.head_dim
    q = attn.q_norm(attn.q(x).view(b, t, h, d).transpose(1, 2))
    k = attn.k_norm(attn.k(x).view(b, t, attn.n_kv_heads, d).transpose(1, 2))
    v = attn.v(x).view(b, t, attn.n_kv_heads, d).transpose(1, 2)
    rep = h // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / d**0.5
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return attn.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


def test_gqa_with_all_kv_heads_is_plain_multi_head_attention():
    torch.manual_seed(0)
    for causal in (True, False):
        attn = Attention(64, 8, 8, qk_norm=True, causal=causal)
        x = torch.randn(2, 10, 64)
        torch.testing.assert_close(attn(x), reference_attention(attn, x, causal), atol=1e-5, rtol=1e-5)


def test_gqa_shares_each_kv_head_across_its_query_group():
    torch.manual_seed(0)
    gqa = Attention(64, 8, 2, qk_norm=False, causal=True)
    mha = Attention(64, 8, 8, qk_norm=False, causal=True)
    with torch.no_grad():  # MHA whose K/V heads are the GQA heads repeated for each group
        mha.q.weight.copy_(gqa.q.weight)
        mha.o.weight.copy_(gqa.o.weight)
        for name in ("k", "v"):
            w = getattr(gqa, name).weight.view(2, 8, 64).repeat_interleave(4, 0).reshape(64, 64)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(3, 9, 64)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    d = 32
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    cos, sin = rope_1d(256, d)

    def score(i, j):
        qi = apply_rope(q, cos[i:i + 1], sin[i:i + 1])
        kj = apply_rope(k, cos[j:j + 1], sin[j:j + 1])
        return (qi * kj).sum().item()

    for shift in (1, 17, 100):
        assert abs(score(5, 2) - score(5 + shift, 2 + shift)) < 1e-4
    assert abs(score(5, 2) - score(9, 2)) > 1e-3  # and it does depend on the offset


def test_rope_2d_is_relative_in_rows_and_columns():
    torch.manual_seed(0)
    d, h, w = 16, 6, 6
    cos, sin = rope_2d(h, w, d)
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(a, b):
        ia, ib = a[0] * w + a[1], b[0] * w + b[1]
        return (apply_rope(q, cos[ia:ia + 1], sin[ia:ia + 1]) * apply_rope(k, cos[ib:ib + 1], sin[ib:ib + 1])).sum().item()

    assert abs(score((1, 1), (0, 2)) - score((4, 3), (3, 4))) < 1e-4
    assert abs(score((1, 1), (0, 2)) - score((1, 1), (0, 3))) > 1e-3  # the column offset matters
    assert abs(score((1, 1), (0, 2)) - score((2, 1), (0, 2))) > 1e-3  # and so does the row offset


def test_cached_greedy_decoding_equals_uncached():
    model = tiny_decoder()
    prompt = torch.randint(0, 97, (2, 7))
    cached = torch.stack(list(generate(model, prompt, 20, temperature=0, use_cache=True)), 1)
    plain = torch.stack(list(generate(model, prompt, 20, temperature=0, use_cache=False)), 1)
    assert torch.equal(cached, plain)


def test_generation_stops_per_row_and_never_samples_padded_rows():
    model = tiny_decoder()
    vocab = model.cfg.vocab_size
    eos, real = 5, vocab - 10  # the last 10 rows stand for the padding a tokenizer never produces
    bias = torch.zeros(vocab)
    bias[real:] = 50.0  # unmasked, every step would draw a padded row
    model.register_forward_hook(lambda m, i, out: out + bias)
    prompt = torch.randint(0, real, (2, 4))
    allowed = real_tokens(vocab, real)
    for temperature in (0.0, 1.0):
        steps = torch.stack(list(generate(model, prompt, 12, temperature=temperature, allowed=allowed,
                                          generator=torch.Generator().manual_seed(0))), 1)
        assert steps.shape == (2, 12) and (steps < real).all()
    bias[real:] = 0.0

    def push(m, i, out):  # row 0 ends with its first token, then would go on writing token 7; row 1 never ends
        extra = torch.zeros_like(out)
        extra[0, :, eos if out.shape[1] > 1 else 7] = 100.0
        extra[1, :, eos] = -100.0
        return out + extra

    model.register_forward_hook(push)
    steps = torch.stack(list(generate(model, torch.randint(0, real, (2, 4)), 6, temperature=0, eos_id=eos,
                                      allowed=allowed)), 1)
    assert steps.shape == (2, 6) and (steps[0] == eos).all() and (steps[1] != eos).all()


def test_cache_chunked_prefill_matches_full_forward():
    model = tiny_decoder()
    x = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(1, 24)
        parts = [model(x[:, :10], cache), model(x[:, 10:17], cache), model(x[:, 17:], cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_zero_init_blocks_start_as_identity_and_tied_head_shares_embedding():
    torch.manual_seed(0)
    cfg = DecoderConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden=64, vocab_size=50)
    model = Decoder(cfg, 16)
    assert model.lm_head.weight is model.tok_emb.weight
    x = torch.randint(0, 50, (1, 8))
    h = model.tok_emb(x)
    for block in model.blocks:
        torch.testing.assert_close(block(h, (model.rope_cos[:8], model.rope_sin[:8])), h)
    expected = model.lm_head(model.norm(h))
    torch.testing.assert_close(model(x), expected)
