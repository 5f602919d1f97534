"""What a GPU run depends on, checked on the CPU: dtypes at the attention call under autocast,
the precision a GPU is given, contiguous batches, DDP's buffers, and imports that a GPU machine
without `datasets` can take."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import shared.blocks as blocks
from llm.data import PackedBatches
from llm.model import Decoder, DecoderConfig
from shared import parallel, trainer
from shared.errors import UserError

from conftest import ROOT

pytestmark = pytest.mark.gpu_paths


def test_attention_sees_one_dtype_when_qk_norm_comes_out_fp32(monkeypatch):
    """CUDA autocast runs rms_norm in fp32 (CPU autocast keeps bf16), so force that here: q and k
    must reach SDPA and FlexAttention in v's dtype."""
    seen = []

    def fp32_norm(self, x):  # what CUDA autocast's fp32 policy for rms_norm returns
        return torch.nn.functional.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps)

    def spy(name, fn):
        def wrapped(q, k, v, *a, **kw):
            seen.append((name, q.dtype, k.dtype, v.dtype))
            return fn(q, k, v, *a, **kw)
        return wrapped

    monkeypatch.setattr(blocks.RMSNorm, "forward", fp32_norm)
    monkeypatch.setattr(blocks.F, "scaled_dot_product_attention", spy("sdpa", blocks.F.scaled_dot_product_attention))
    monkeypatch.setattr(blocks, "_masked_attention", spy("masked", blocks._masked_attention))
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=64, vocab_size=64), 16)
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        model(x, doc_ids=(x == 3).cumsum(1))
    assert {name for name, *_ in seen} == {"sdpa", "masked"}
    assert all(q == k == v == torch.bfloat16 for _, q, k, v in seen), seen


def test_bf16_needs_native_support_and_fp32_gets_tf32(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert trainer.pick_dtype("auto", cuda) == torch.float32  # a GPU that only emulates bf16 (pre-Ampere)
    with pytest.raises(UserError, match="no bf16 support"):
        trainer.pick_dtype("bf16", cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert trainer.pick_dtype("auto", cuda) == torch.bfloat16
    assert trainer.pick_dtype("auto", torch.device("cpu")) == torch.float32

    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        assert not trainer.enable_tf32(torch.device("cpu"))
        assert trainer.enable_tf32(cuda)  # setting the flags needs no GPU
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def test_batches_reach_the_device_contiguous():
    """A strided view (x and y as shifted halves of one row) would be pinned through a pageable
    temporary on the way to the GPU."""
    import numpy as np
    x, y = PackedBatches(np.arange(2000, dtype=np.uint16), 16, 4, seed=0).next_batch()
    assert x.is_contiguous() and y.is_contiguous() and torch.equal(x[:, 1:], y[:, :-1])


def test_ddp_does_not_broadcast_buffers(monkeypatch):
    """DDP's default sends rank 0's buffers before every forward: RoPE tables each step, and MoE
    load counts overwritten on the other ranks before they are summed."""
    made = {}

    class Recorder:
        def __init__(self, module, **kw):
            made.update(kw)

    monkeypatch.setattr(parallel, "DDP", Recorder)
    parallel.wrap_ddp(torch.nn.Linear(2, 2), torch.device("cpu"))
    assert made["broadcast_buffers"] is False


def test_nothing_imports_datasets_or_transformers_unless_asked():
    """The GPU machine has no `datasets`: training on built-in or local text must not import it."""
    code = ("import sys, llm.data, llm.model, llm.task, llm.downstream, multimodal.task, flow_matching.task, "
            "vqvae.task, shared.trainer; print(sorted(m for m in ('datasets', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
