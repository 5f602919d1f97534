"""Document masking and the chunked output-layer loss: exact, causal, and what the model trains with."""

import pytest
import torch
import torch.nn.functional as F

from llm.model import Decoder, DecoderConfig
from llm.task import LanguageModelTask
from shared.blocks import _masked_attention, document_causal_mask
from shared.losses import linear_cross_entropy
from shared.optim import OptimConfig, build_optimizers

pytestmark = pytest.mark.gpu_paths

EOS = 0


def tiny(**kw) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64, vocab_size=64,
                        zero_init_out=False, **kw)
    return Decoder(cfg, max_seq_len=64).eval()


def packed_row() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Three documents, each opened by EOS as in the token cache: [EOS a...] [EOS b...] [EOS c...]."""
    g = torch.Generator().manual_seed(1)
    docs = [torch.cat([torch.tensor([EOS]), torch.randint(1, 64, (n,), generator=g)]) for n in (9, 14, 6)]
    return torch.cat(docs)[None], docs


def test_loss_chunks_give_the_same_value_and_gradients():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (300,), generator=g)
    ref = F.cross_entropy(h @ w.t(), y)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, y, chunk=64)  # 300 is not a multiple: the last chunk is short
    (2 * out).backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(h.grad, 2 * gh, atol=1e-6) and torch.allclose(w.grad, 2 * gw, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, w, y, 64), ref, atol=1e-5)


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_compiled_loss_chunks_match_the_full_logits_and_compile_once(softcap):
    """The CUDA path (the per-chunk body under torch.compile), run by CPU inductor: the same value
    and gradients as the full fp32 logits, and no recompile for a second call or another length
    of the short last chunk."""
    torch._dynamo.reset()  # this test's graphs only, within the recompile limit
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 32, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(500, 32, generator=g)).requires_grad_()
    y = torch.randint(0, 500, (300,), generator=g)

    def full(h, w, y):
        logits = h @ w.t()
        return F.cross_entropy(softcap * torch.tanh(logits / softcap) if softcap else logits, y)

    def check(n):  # n tokens in chunks of 128: the last chunk is short
        ref = full(h[:n], w, y[:n])
        gh, gw = torch.autograd.grad(ref, (h, w))
        out = linear_cross_entropy(h[:n], w, y[:n], chunk=128, softcap=softcap, compile=True)
        oh, ow = torch.autograd.grad(2 * out, (h, w))
        assert torch.allclose(out, ref, atol=1e-5)
        assert torch.allclose(oh, 2 * gh, atol=1e-6) and torch.allclose(ow, 2 * gw, atol=1e-6)
        with torch.no_grad():
            assert torch.allclose(linear_cross_entropy(h[:n], w, y[:n], 128, softcap, compile=True), ref, atol=1e-5)

    check(300)
    with torch._dynamo.config.patch(error_on_recompile=True):  # config.patch: monkeypatch's undo breaks torch 2.11's
        check(300)
        check(290)


def test_loss_under_autocast_casts_once_and_returns_gradients_in_the_inputs_dtype():
    """bf16 autocast (what a GPU trains with): matmuls in bf16, fp32 gradients for fp32 h and
    weight, eager and compiled alike, close to the full logits under the same autocast."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(200, 32, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(100, 32, generator=g)).requires_grad_()
    y = torch.randint(0, 100, (200,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ w.t()).float(), y)
        eager = linear_cross_entropy(h, w, y, chunk=64)
        compiled = linear_cross_entropy(h, w, y, chunk=64, compile=True)
    grads = [torch.autograd.grad(loss, (h, w)) for loss in (ref, eager, compiled)]
    assert all(gh.dtype == gw.dtype == torch.float32 for gh, gw in grads)
    assert torch.allclose(eager, ref, atol=1e-4) and torch.allclose(compiled, eager, atol=1e-5)
    for gh, gw in grads[1:]:  # bf16 matmuls on both sides: agreement to bf16's precision
        assert torch.allclose(gh, grads[0][0], rtol=2e-2, atol=2e-4)
        assert torch.allclose(gw, grads[0][1], rtol=2e-2, atol=2e-4)


def test_loss_without_grad_mode_computes_no_gradients(monkeypatch):
    """Evaluation runs under torch.no_grad, where autograd still marks the inputs as needing
    gradients: the chunks must not pay for them."""
    import shared.losses as losses
    asked = []
    chunk = losses._chunk
    monkeypatch.setattr(losses, "_chunk", lambda *a: (asked.append(a[-1]), chunk(*a))[1])
    h, w = torch.randn(30, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    y = torch.randint(0, 20, (30,))
    with torch.no_grad():
        value = linear_cross_entropy(h, w, y, chunk=16)
    assert asked == [False, False] and torch.allclose(value, F.cross_entropy(h @ w.t(), y), atol=1e-5)


def test_model_loss_is_the_same_chunked_or_not_and_trains():
    x = torch.randint(0, 64, (3, 20))
    y = torch.randint(0, 64, (3, 20))
    full, chunked = tiny(loss_chunk=0), tiny(loss_chunk=7)
    assert torch.allclose(full(x, targets=y), chunked(x, targets=y), atol=1e-5)
    assert torch.allclose(full(x, targets=y), F.cross_entropy(full(x).flatten(0, 1), y.flatten()), atol=1e-5)
    model = tiny(loss_chunk=16).train()
    opts = build_optimizers(model, OptimConfig(adam_lr=1e-2, muon_lr=0.02))
    first = model(x, targets=y).item()
    for _ in range(30):
        loss = model(x, targets=y)
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
    assert model(x, targets=y).item() < first - 1.0  # tied weights get both gradients


def test_document_mask_is_causal_and_each_document_is_alone():
    model = tiny()
    row, docs = packed_row()
    task = LanguageModelTask(torch.zeros(1, 2, dtype=torch.long), tokenizer=None, doc_mask=True, eos_id=EOS)
    ids = task.doc_ids(row)
    assert ids[0].tolist() == [1] * 10 + [2] * 15 + [3] * 7
    mask = document_causal_mask(ids)[0, 0]
    assert not mask.triu(1).any()  # never the future
    assert not mask[10:, :10].any() and not mask[25:, 10:25].any()  # never another document
    with torch.no_grad():
        packed = model(row, doc_ids=ids)[0]
        start = 0
        for d in docs:  # RoPE is relative, so a document alone at position 0 gives the same logits
            alone = model(d[None])[0]
            assert torch.allclose(packed[start:start + len(d)], alone, atol=1e-4)
            start += len(d)
        unmasked = model(row)[0]
    assert not torch.allclose(unmasked[10:], packed[10:], atol=1e-3)  # without the mask, documents leak


def test_flex_attention_block_mask_matches_the_dense_mask():
    """The GPU path: a FlexAttention block mask, compiled. On the CPU FlexAttention runs forward
    only, which is enough to check that its mask is the dense one."""
    row, _ = packed_row()
    ids = (row == EOS).cumsum(1).repeat(2, 1)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, ids.shape[1], 8, generator=g)
    k, v = torch.randn(2, 2, ids.shape[1], 8, generator=g), torch.randn(2, 2, ids.shape[1], 8, generator=g)

    def attend(q, k, v, ids):
        return _masked_attention(q, k, v, document_causal_mask(ids, flex=True))

    with torch.no_grad():
        flex = torch.compile(attend)(q, k, v, ids)
        dense = _masked_attention(q, k, v, document_causal_mask(ids, flex=False))
    assert torch.allclose(flex, dense, atol=1e-5)
