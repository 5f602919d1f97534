"""The GPU smoke test, for the first minutes of a GPU: `pytest -m gpu` (skipped without CUDA).

What the CPU tests cannot show: compiled bf16 training of every model on CUDA with no host sync
in a step (SyncCounter for syncing ops and blocking copies, CUDA's own sync check for what
kernels' host code waits on, compiled code included), FlexAttention document masks forward and
backward, the bf16 grouped-matmul MoE against its loop, fused optimisers, and a resume that is
exact on CUDA. Each test prints its peak memory; with BLUEBERRY_GPU_REPORT=FILE the figures are
written there as JSON too. Runs with only what the GPU machine has (no `datasets`): every model
is built from tests/trainers.py on generated data. Under three minutes on one H100/H200.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings

import pytest
import torch

from shared.syncs import SyncCounter
from trainers import MOE, classifier_trainer, flow_matching_trainer, llm_trainer, multimodal_trainer, vqvae_trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu)")]

CUDA = 'train.device="cuda"'
BUILDERS = {
    "llm": lambda d, *o: llm_trainer(d, *o),
    "llm-doc-mask": lambda d, *o: llm_trainer(d, "data.doc_mask=true", *o),
    "llm-chunked-loss": lambda d, *o: llm_trainer(d, "model.loss_chunk=64", *o),
    "llm-moe": lambda d, *o: llm_trainer(d, *MOE, "model.moe.bias_rate=0.001", *o),
    "flow_matching": flow_matching_trainer,
    "vqvae": lambda d, *o: vqvae_trainer(d, "model.dead_threshold=4.0", *o),
    "vqvae-gan": lambda d, *o: vqvae_trainer(d, "gan.weight=0.1", "gan.start=1", "gan.adaptive=true", "gan.channels=8", *o),
    "multimodal": multimodal_trainer,
    "classifier": lambda d, *o: classifier_trainer(d, "debug", *o),
}
REPORT: dict[str, dict] = {}


@pytest.fixture(autouse=True)
def _peak_memory(request):
    torch.cuda.reset_peak_memory_stats()
    yield
    peak = torch.cuda.max_memory_allocated() / 2**20
    REPORT.setdefault(request.node.name, {})["peak_memory_mib"] = round(peak, 1)
    print(f"\n{request.node.name}: peak memory {peak:.1f} MiB")
    if os.environ.get("BLUEBERRY_GPU_REPORT"):
        with open(os.environ["BLUEBERRY_GPU_REPORT"], "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tests": REPORT}, f, indent=2)


def steps_without_syncs(trainer, steps: int = 2) -> tuple[list[float], list[str], dict]:
    """Losses of `steps` training steps, the CUDA sync warnings they raised and SyncCounter's counts."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, SyncCounter() as counter:
            warnings.simplefilter("always")
            out = [trainer.train_step()[0] for _ in range(steps)]
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    synced = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    return [x.item() for x in out], synced, dict(counter.counts)


COMPILED = ["llm", "llm-doc-mask", "llm-moe", "flow_matching", "vqvae", "multimodal", "classifier"]  # a compile each


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_bf16_training_without_host_syncs(tmp_path, name):
    import torch._dynamo

    torch._dynamo.reset()
    trainer = BUILDERS[name](tmp_path, CUDA, "train.compile=true")
    assert trainer.dtype == torch.bfloat16
    trainer.model.train()
    start = time.perf_counter()
    first = trainer.train_step()[0].item()
    compile_s = time.perf_counter() - start
    with torch._dynamo.config.patch(error_on_recompile=True):  # not monkeypatch: its undo breaks torch 2.11's config
        later, synced, counts = steps_without_syncs(trainer)
    REPORT.setdefault(f"test_compiled_bf16_training_without_host_syncs[{name}]", {}).update(
        first_step_s=round(compile_s, 1), losses=[first, *later], cuda_syncs=len(synced), counted_syncs=counts)
    assert all(math.isfinite(x) for x in [first, *later])
    assert not counts, counts
    assert not synced, synced[:3]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_eager_bf16_step_without_host_syncs(tmp_path, name):
    trainer = BUILDERS[name](tmp_path, CUDA)
    trainer.model.train()
    trainer.train_step()
    _, synced, counts = steps_without_syncs(trainer)
    assert not counts, counts
    assert not synced, synced[:3]


def test_flex_attention_document_mask_forward_and_backward():
    from shared.blocks import _masked_attention, document_causal_mask

    g = torch.Generator(device="cuda").manual_seed(0)
    b, t = 2, 256
    ids = (torch.rand(b, t, device="cuda", generator=g) < 0.02).cumsum(1)
    q = torch.randn(b, 4, t, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, 2, t, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, 2, t, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)

    def flex(q, k, v, ids):
        return _masked_attention(q, k, v, document_causal_mask(ids))  # the block mask: CUDA and compiling

    out = torch.compile(flex)(q, k, v, ids)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = _masked_attention(q, k, v, document_causal_mask(ids, flex=False))
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    assert torch.allclose(out.float(), ref.float(), atol=2e-2)
    for a, r in zip(grads, ref_grads):
        assert torch.allclose(a.float(), r.float(), atol=5e-2, rtol=5e-2)


def test_grouped_matmul_moe_equals_the_loop_on_cuda():
    from shared.moe import MoE

    torch.manual_seed(0)
    m = MoE(64, 96, 5, 2, mlp="swiglu").cuda()
    assert m.grouped == (torch.cuda.get_device_capability() >= (9, 0))
    if not m.grouped:
        pytest.skip("torch._grouped_mm needs SM90+")
    x = torch.randn(37, 64, device="cuda", requires_grad=True)
    results = []
    for grouped in (True, False):
        m.grouped = grouped
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        results.append((y.float(), *torch.autograd.grad(y.float().square().sum(), (x, m.up, m.gate, m.down, m.router.weight))))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=2e-2, rtol=2e-2)


def test_optimisers_are_fused_and_resume_is_exact_on_cuda(tmp_path):
    """Two steps, a checkpoint, a third step; a new trainer resumed from the checkpoint takes the
    same third step to the bit (deterministic kernels, CUBLAS_WORKSPACE_CONFIG set by conftest:
    embedding backward otherwise adds atomically)."""
    torch.use_deterministic_algorithms(True)
    try:
        first = llm_trainer(tmp_path / "a", CUDA)
        assert all(o.defaults.get("fused") for o in first.optimizers if isinstance(o, torch.optim.AdamW))
        first.model.train()
        for _ in range(2):
            first.train_step()
        ckpt = first.save()
        third = first.train_step()[0].item()
        resumed = llm_trainer(tmp_path / "b", CUDA)
        resumed._restore(ckpt)
        resumed.model.train()
        assert resumed.train_step()[0].item() == third
        for a, b in zip(first.model.state_dict().values(), resumed.model.state_dict().values()):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)
