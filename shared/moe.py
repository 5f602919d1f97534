"""Mixture-of-experts MLP: token-choice top-k routing over N expert MLPs.

- The router runs in fp32 (bf16 logits pick different experts for near ties and drift).
- Dropless by default: every token reaches its k experts. The experts run as one grouped matmul
  (`torch._grouped_mm`: fp32 on the CPU, bf16 on the GPU) over tokens sorted by expert; where it
  is missing a loop over experts gives the same result. `capacity_factor > 0` drops the
  assignments beyond ceil(factor x N k / E) per expert, in token order, instead.
- Load balancing, any combination: the Switch auxiliary loss E * sum_e f_e P_e (`aux_weight`,
  minimal for a uniform router), the auxiliary-loss-free bias (`bias_rate`: a per-expert bias
  added to the scores only to choose experts, moved by rate x sign(mean load - load) after each
  optimiser step from the training tokens counted since, never from evaluation), and the router
  z-loss mean(logsumexp(logits)^2) (`z_weight`).
- Expert weights are stacked [E, out, in] and flagged so that Muon orthogonalises each expert's
  matrix on its own (shared/muon.py); the router goes to AdamW.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .muon import STACKED


def _stacked(*shape: int) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape))
    setattr(p, STACKED, True)
    return p


class MoE(nn.Module):
    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int, *, mlp: str = "swiglu", n_shared: int = 0,
                 capacity_factor: float = 0.0, aux_weight: float = 0.01, z_weight: float = 1e-3, bias_rate: float = 0.0,
                 shared_mlp: nn.Module | None = None):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, {n_experts}], got {top_k}")
        self.n_experts, self.top_k, self.gated = n_experts, top_k, mlp == "swiglu"
        self.capacity_factor, self.aux_weight, self.z_weight, self.bias_rate = capacity_factor, aux_weight, z_weight, bias_rate
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.up = _stacked(n_experts, hidden, dim)
        self.gate = _stacked(n_experts, hidden, dim) if self.gated else None
        self.down = _stacked(n_experts, dim, hidden)
        self.shared = shared_mlp  # dense expert(s) every token passes through
        self.register_buffer("expert_bias", torch.zeros(n_experts))  # used only to choose experts
        self.register_buffer("load", torch.zeros(n_experts))  # training assignments since the last bias update
        self.aux_loss = torch.zeros(())
        self._stats: torch.Tensor | None = None  # summed on the device, read at logging points
        for p in self.expert_weights():
            nn.init.normal_(p, std=0.02)

    # ------------------------------------------------------------------ experts
    def expert_weights(self) -> list[nn.Parameter]:
        return [p for p in (self.up, self.gate, self.down) if p is not None]

    def _mlp(self, x: torch.Tensor, mm) -> torch.Tensor:
        """The expert MLP with `mm(x, weight)` as its matrix product (grouped, or one expert's)."""
        h = mm(x, self.up)
        h = F.silu(mm(x, self.gate)) * h if self.gated else F.relu(h).square()
        return mm(h, self.down)

    def _experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert MLPs over rows xs [M, D] sorted by expert, `counts` [E] rows each."""
        grouped = hasattr(torch, "_grouped_mm") and (not xs.is_cuda or torch.cuda.get_device_capability(xs.device) >= (9, 0))
        dtype = torch.get_autocast_dtype("cuda") if xs.is_cuda and torch.is_autocast_enabled("cuda") else xs.dtype
        if grouped and not (xs.is_cuda and dtype != torch.bfloat16):  # the CUDA kernel is bf16 only
            offs = counts.cumsum(0).to(torch.int32)
            return self._mlp(xs.to(dtype), lambda x, w: torch._grouped_mm(x, w.to(dtype).transpose(-2, -1), offs=offs))
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):  # one host sync: the loop needs the sizes
            out.append(self._mlp(xs[start:start + n], lambda x, w: x @ w[e].t()))
            start += n
        return torch.cat(out) if out else xs.new_zeros(0, xs.shape[1])

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        n, e, k = flat.shape[0], self.n_experts, self.top_k
        with torch.autocast(flat.device.type, enabled=False):
            logits = F.linear(flat.float(), self.router.weight.float())
        probs = logits.softmax(-1)
        choice = probs + self.expert_bias if self.bias_rate > 0 else probs
        experts = choice.topk(k, dim=-1).indices  # [N, k]
        gates = probs.gather(1, experts)
        if k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        flat_e = experts.flatten()  # assignment a = token a // k
        order = flat_e.argsort(stable=True)  # assignments grouped by expert, in token order within each
        counts = torch.bincount(flat_e, minlength=e)
        kept = counts
        if self.capacity_factor > 0:
            cap = math.ceil(self.capacity_factor * n * k / e)
            starts = counts.cumsum(0) - counts
            slot = torch.arange(n * k, device=flat.device) - starts[flat_e[order]]  # position within its expert
            keep = slot < cap
            order = order[keep]
            kept = counts.clamp(max=cap)
        token = order // k
        ys = self._experts(flat[token], kept)
        out = torch.zeros_like(flat).index_add_(0, token, (ys * gates.flatten()[order, None]).to(flat.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)

        frac = counts.float() / (n * k)
        switch = e * (frac * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).square().mean()
        self.aux_loss = self.aux_weight * switch + self.z_weight * z
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.load += counts.float()
                entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
                dropped = 1.0 - kept.sum().float() / (n * k)
                row = torch.cat([counts.float(), torch.stack([dropped, entropy, switch.detach(), z.detach(),
                                                              torch.ones((), device=flat.device)])])
                self._stats = row if self._stats is None else self._stats + row
        return out.view(shape)

    # ------------------------------------------------------------------ after each step, and logging
    @torch.no_grad()
    def update_bias(self) -> None:
        """The auxiliary-loss-free step: experts above the mean load lose bias, those below gain,
        then the biases are re-centred. Every process uses the load summed over all of them."""
        if self.bias_rate > 0 and self.load.sum() > 0:
            load = distributed.sum_across(self.load)
            self.expert_bias += self.bias_rate * torch.sign(load.mean() - load)
            self.expert_bias -= self.expert_bias.mean()
        self.load.zero_()

    def pop_stats(self) -> dict[str, float | list[int]]:
        """Figures since the last call (one host sync): tokens per expert, max/mean load, dropped
        fraction, router entropy, the Switch auxiliary and z losses (means over forward passes)."""
        if self._stats is None:
            return {}
        s = self._stats.tolist()
        self._stats = None
        counts, (dropped, entropy, switch, z, calls) = s[:self.n_experts], s[self.n_experts:]
        mean = sum(counts) / self.n_experts
        return {"tokens_per_expert": [int(c) for c in counts], "max_over_mean_load": max(counts) / mean if mean else 0.0,
                "dropped": dropped / calls, "router_entropy": entropy / calls, "aux_switch": switch / calls,
                "aux_z": z / calls}
