"""Mixture of experts: routing, the dense limit, balancing, Muon per expert, exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script
from llm.model import Decoder, DecoderConfig, active_params
from shared.blocks import MLPS
from shared.errors import ConfigError
from shared.moe import MoE
from shared.muon import Muon


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
    cfg = DecoderConfig(vocab_size=64, moe_experts=8, moe_top_k=2, moe_hidden=128, moe_dense_layers=1)
    model = Decoder(cfg, 16)
    assert len(model.moe_layers()) == 3
    expert_params = 3 * 8 * 2 * 128 * 128
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert total - active_params(model) == expert_params * 6 // 8
    with pytest.raises(ConfigError, match="moe_top_k"):
        DecoderConfig(moe_experts=2, moe_top_k=3)
    with pytest.raises(ConfigError, match="moe_capacity_factor"):
        DecoderConfig(moe_experts=2, moe_capacity_factor=0.5)
    with pytest.raises(ConfigError, match="moe_aux_weight"):
        DecoderConfig(moe_experts=2, moe_aux_weight=float("nan"))


def test_moe_debug_trains_logs_and_resumes_exactly(tmp_path):
    args = ["--config", "moe-debug", "data.builtin_docs=300", 'data.tokenizer="bpe:400"', "data.seq_len=32",
            "train.batch_size=4", "train.budget=2048", "train.eval_every=1024", "train.ckpt_every=1024", "train.log_every=2",
            "model.moe_bias_rate=0.01", "sample.max_new_tokens=4"]
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
