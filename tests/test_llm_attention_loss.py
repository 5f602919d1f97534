"""Document masking and the chunked output-layer loss: exact, causal, and what the model trains with."""

import torch
import torch.nn.functional as F

from llm.model import Decoder, DecoderConfig
from llm.task import LanguageModelTask
from shared.blocks import _masked_attention, document_causal_mask
from shared.losses import linear_cross_entropy
from shared.optim import OptimConfig, build_optimizers

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
