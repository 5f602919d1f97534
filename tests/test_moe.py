"""Mixture of experts: routing, the dense limit, balancing, Muon per expert, exact resume, and the
GPU promises: no host sync, one graph compiled once, grouped matmul equal to the loop."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from conftest import run_script
from llm.data import PackedBatches
from llm.model import Decoder, DecoderConfig, active_params
from llm.task import LanguageModelTask
from shared.blocks import MLPS
from shared.errors import ConfigError
from shared.moe import ALIGN, MoE, MoEConfig
from shared.muon import Muon
from shared.optim import OptimConfig
from shared.syncs import SyncCounter
from shared.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.gpu_paths


def moe(mlp="relu2", e=4, k=2, **kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(16, 24, e, k, mlp=mlp, **kw)
    torch.nn.init.normal_(m.router.weight, std=0.5)
    return m


def expert(m: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    h = x @ m.up[e].t()
    h = F.silu(x @ m.gate[e].t()) * h if m.gated else F.relu(h).square()
    return h @ m.down[e].t()


@pytest.mark.parametrize("mlp", ["relu2", "swiglu"])
@pytest.mark.parametrize("grouped", [True, False])
def test_each_token_reaches_exactly_its_k_experts(mlp, grouped, monkeypatch):
    if not grouped:
        monkeypatch.delattr(torch, "_grouped_mm", raising=False)  # the loop over experts
    m = moe(mlp)
    x = torch.randn(3, 5, 16)
    out = m(x).view(-1, 16)
    flat = x.view(-1, 16)
    probs = F.linear(flat, m.router.weight).softmax(-1)
    top = probs.topk(2, -1)
    for t in range(len(flat)):  # token by token: the gate-weighted sum of its two experts, no others
        gates = top.values[t] / top.values[t].sum()
        want = sum(g * expert(m, int(e), flat[t:t + 1]) for g, e in zip(gates, top.indices[t]))
        assert torch.allclose(out[t], want[0], atol=1e-5)
    stats = m.pop_stats()
    assert sum(stats["tokens_per_expert"]) == 15 * 2 and stats["dropped"] == 0


@pytest.mark.parametrize("mlp", ["relu2", "swiglu"])
def test_one_expert_top_1_is_the_dense_mlp(mlp):
    dense = MLPS[mlp](16, 24)
    m = MoE(16, 24, 1, 1, mlp=mlp)
    with torch.no_grad():
        m.up[0].copy_(dense.up.weight)
        m.down[0].copy_(dense.down.weight)
        if mlp == "swiglu":
            m.gate[0].copy_(dense.gate.weight)
    x = torch.randn(2, 7, 16)
    assert torch.allclose(m(x), dense(x), atol=1e-6)


def test_switch_loss_is_minimal_for_a_uniform_router():
    m = moe(aux_weight=1.0, z_weight=0.0)
    x = torch.randn(64, 16).abs()
    torch.nn.init.zeros_(m.router.weight)  # every expert equally likely
    m(x)
    assert torch.isclose(m.aux_loss, torch.tensor(1.0))
    for scale in (0.1, 1.0):  # more and more tokens prefer expert 0: the loss grows
        with torch.no_grad():
            m.router.weight[0] = scale
        m(x)
        assert m.aux_loss > 1.0


def test_bias_update_moves_load_toward_balance():
    m = moe(k=1, bias_rate=0.05, aux_weight=0.0, z_weight=0.0)
    x = torch.randn(256, 16)
    x[:, 0] = 1.0
    with torch.no_grad():
        m.router.weight[:, 0] = torch.tensor([2.5, 0.0, 0.0, 0.0])  # every token leans to expert 0
    loads = []
    for _ in range(30):
        with torch.enable_grad():
            m(x)
        loads.append(m.pop_stats()["max_over_mean_load"])
        m.update_bias()
    assert loads[0] > 2.5 and loads[-1] < 1.5, loads
    assert torch.isclose(m.expert_bias.mean(), torch.tensor(0.0), atol=1e-6) and m.load.sum() == 0
    m.eval()
    with torch.no_grad():
        m(x)  # evaluation batches are never counted
    assert m.load.sum() == 0


def test_capacity_factor_drops_beyond_capacity():
    m = moe(k=1, capacity_factor=1.0)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 1.0
    x = torch.randn(64, 16).abs()
    with torch.enable_grad():
        m(x)
    stats = m.pop_stats()
    assert stats["dropped"] > 0.3  # expert 0 takes at most 64 / 4 = 16 of its ~all tokens


def test_muon_orthogonalises_each_expert_on_its_own():
    m = moe()
    batched = [m.up.detach().clone().requires_grad_()]
    setattr(batched[0], "stacked_matrices", True)
    single = [m.up[e].detach().clone().requires_grad_() for e in range(4)]
    grad = torch.randn_like(batched[0])
    batched[0].grad = grad.clone()
    for e, p in enumerate(single):
        p.grad = grad[e].clone()
    Muon(batched, lr=0.1).step()
    Muon(single, lr=0.1).step()
    assert torch.allclose(batched[0], torch.stack(single), atol=1e-6)


def test_config_counts_and_refusals():
    cfg = DecoderConfig(vocab_size=64, moe=MoEConfig(experts=8, top_k=2, hidden=128, dense_layers=1))
    model = Decoder(cfg, 16)
    assert len(model.moe_layers()) == 3
    expert_params = 3 * 8 * 2 * 128 * 128
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert total - active_params(model) == expert_params * 6 // 8
    with pytest.raises(ConfigError, match=r"moe\.top_k"):
        MoEConfig(experts=2, top_k=3)
    with pytest.raises(ConfigError, match=r"moe\.capacity_factor"):
        MoEConfig(experts=2, capacity_factor=0.5)
    with pytest.raises(ConfigError, match=r"moe\.aux_weight"):
        MoEConfig(experts=2, aux_weight=float("nan"))


@pytest.mark.slow
def test_moe_debug_trains_logs_and_resumes_exactly(tmp_path):
    args = ["--config", "moe-debug", "data.builtin_docs=300", 'data.tokenizer="bpe:400"', "data.seq_len=32",
            "train.batch_size=4", "train.budget=2048", "train.eval_every=1024", "train.ckpt_every=1024", "train.log_every=2",
            "model.moe.bias_rate=0.01", "sample.max_new_tokens=4"]
    proc = run_script("train_llm.py", *args, "--experiment_name", "moe", cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mixture of 8 experts, top-2" in proc.stdout and "M active" in proc.stdout
    run = tmp_path / "runs" / "moe"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert sum(train[-1]["moe/layer1/tokens_per_expert"]) == 2 * 4 * 32 * 2  # 2 steps x 128 tokens x top-2
    assert "moe/layer3/router_entropy" in train[-1] and "moe/layer0/dropped" not in train[-1]  # layer 0 is dense

    shutil.copytree(run, tmp_path / "runs" / "again")
    again = tmp_path / "runs" / "again"
    shutil.rmtree(again / "checkpoints" / "step_000016")
    (again / "checkpoints" / "latest").write_text("step_000008\n")
    proc = run_script("train_llm.py", "--experiment_name", "again", "--resume", cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    def figures(path):  # everything but the speed
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in path.read_text().splitlines()]
    assert figures(again / "metrics.jsonl") == figures(run / "metrics.jsonl")  # losses, loads, biases' effect: bit for bit


def test_shared_expert_adds_a_dense_path_every_token_takes():
    torch.manual_seed(0)
    dense = MLPS["relu2"](16, 24)
    routed, both = moe(), moe(shared_mlp=dense)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(both(x), routed(x) + dense(x), atol=1e-6)


# ---------------------------------------------------------------------- the GPU promises, held on the CPU
def odd_moe(capacity_factor=0.0) -> tuple[MoE, torch.Tensor]:
    """37 tokens over 5 experts, top-2: group sizes that are odd and not multiples of ALIGN."""
    torch.manual_seed(0)
    m = MoE(16, 24, 5, 2, mlp="swiglu", capacity_factor=capacity_factor)
    torch.nn.init.normal_(m.router.weight, std=0.5)
    return m, torch.randn(37, 16)


def reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert over every token, weighted by its gate (zero where not chosen or dropped)."""
    probs = F.linear(x.float(), m.router.weight.float()).softmax(-1)
    top = probs.topk(m.top_k, -1)
    gates = top.values / top.values.sum(-1, keepdim=True)
    if m.capacity_factor > 0:  # each expert keeps its first `cap` assignments in token order
        flat_e = top.indices.flatten()
        slot = (F.one_hot(flat_e, m.n_experts).cumsum(0) - 1).gather(1, flat_e[:, None]).view_as(gates)
        gates = gates * (slot < math.ceil(m.capacity_factor * x.shape[0] * m.top_k / m.n_experts))
    weight = torch.zeros_like(probs).scatter(1, top.indices, gates)
    return sum(weight[:, e, None] * expert(m, e, x) for e in range(m.n_experts))


def forward_backward(m: MoE, x: torch.Tensor, grouped: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    m.grouped = grouped
    m.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = m(x)
    out.float().mul(torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return {"out": out.float(), "x": x.grad, "router": m.router.weight.grad,
            **{name: p.grad for name, p in (("up", m.up), ("gate", m.gate), ("down", m.down))}}


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return bool((a - b).norm() <= tol * b.norm())


def grouped_bf16_on_cpu() -> bool:
    try:
        w = torch.zeros(2, 16, 16, dtype=torch.bfloat16)
        torch._grouped_mm(torch.zeros(32, 16, dtype=torch.bfloat16), w, offs=torch.tensor([16, 32], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matmul_equals_the_loop_forward_and_backward(dtype, capacity_factor):
    if dtype == torch.bfloat16 and not grouped_bf16_on_cpu():
        pytest.skip("this torch has no bf16 torch._grouped_mm on the CPU")
    m, x = odd_moe(capacity_factor)
    grouped = forward_backward(m, x, True, dtype)
    counts = m.pop_stats()["tokens_per_expert"]
    loop = forward_backward(m, x, False, dtype)
    assert any(c % 2 for c in counts) and any(c % ALIGN for c in counts), counts
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the kernels round in their own order
    for name, want in loop.items():
        assert close(grouped[name], want, tol), name
    if dtype == torch.float32:  # both against every expert over every token
        assert torch.allclose(grouped["out"], reference(m, x), atol=1e-5)


@pytest.mark.parametrize("grouped", [True, False])
def test_an_expert_without_tokens_gets_no_gradient(grouped):
    m, x = odd_moe()
    m.bias_rate = 1.0
    m.expert_bias[2] = -10.0  # never chosen: its group is padding alone
    grads = forward_backward(m, x, grouped, torch.float32)
    assert m.pop_stats()["tokens_per_expert"][2] == 0
    assert all(grads[name][2].abs().max() == 0 for name in ("up", "gate", "down"))


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_forward_and_backward_never_wait_for_the_host(capacity_factor):
    m, x = odd_moe(capacity_factor)
    with SyncCounter() as c:
        m(x.requires_grad_()).square().sum().backward()
    assert c.total == 0, dict(c.counts)
    m.grouped = False  # the loop reads its group sizes: its one sync
    with SyncCounter() as c:
        m(x).square().sum().backward()
    assert c.total == 1, dict(c.counts)


def test_moe_decoder_training_step_issues_no_host_sync(tmp_path):
    torch.manual_seed(0)
    cfg = DecoderConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden=64, vocab_size=64, moe=MoEConfig(experts=4))
    tokens = np.tile(np.arange(50, dtype=np.uint16), 200)
    train = TrainConfig(budget=10_000, batch_size=4, grad_accum=2, log_every=100)
    trainer = Trainer(Decoder(cfg, 32), LanguageModelTask(torch.zeros(2, 33, dtype=torch.long), None),
                      PackedBatches(tokens, 32, 4, seed=0), train, OptimConfig(), tmp_path, quiet=True)
    trainer.train_step()  # the first step builds the optimiser state
    with SyncCounter() as c:
        trainer.train_step()
    assert c.total == 0, dict(c.counts)
    stats = trainer.task.train_metrics(trainer.model)  # the one sync, at a logging point
    assert sum(stats["moe/layer1/tokens_per_expert"]) == 2 * 2 * 4 * 32 * 2  # steps x micro-batches x tokens x top-2
    assert trainer.task.train_metrics(trainer.model) == {}  # nothing since


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_forward_is_one_graph(capacity_factor):
    if not grouped_bf16_on_cpu():
        pytest.skip("this torch has no bf16 torch._grouped_mm on the CPU")
    m, x = odd_moe(capacity_factor)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(m)(x.requires_grad_())
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_compiled_training_compiles_once():
    if not grouped_bf16_on_cpu():
        pytest.skip("this torch has no bf16 torch._grouped_mm on the CPU")
    m, x = odd_moe()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(m, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):  # config.patch: monkeypatch's undo breaks torch 2.11's
        for step in range(3):
            for micro in range(2):  # gradient accumulation: the statistics add up between logging points
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = compiled((x + step + micro).requires_grad_())
                out.float().square().sum().backward()
            assert sum(m.pop_stats()["tokens_per_expert"]) == 2 * 37 * 2  # read and zeroed between the steps
    assert counters["stats"]["unique_graphs"] == 1  # (a graph break's resumed half escapes error_on_recompile)
    m.eval()
    with torch.no_grad():
        m(x)  # evaluation in eager: nothing counted
    assert m.pop_stats() == {} and "_stats" not in m.state_dict()
    torch._dynamo.reset()
