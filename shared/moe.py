"""Mixture-of-experts MLP: token-choice top-k routing over N expert MLPs.

- The router runs in fp32 (bf16 logits pick different experts for near ties and drift).
- Dropless by default: every token reaches its k experts. The experts run as one grouped matmul
  (`torch._grouped_mm`: fp32 or bf16 on the CPU, bf16 on CUDA from SM90) over tokens sorted by
  expert; elsewhere a loop over experts gives the same result. `capacity_factor > 0` drops the
  assignments beyond ceil(factor x N k / E) per expert, in token order, instead.
- No host sync and one static-shaped graph on the grouped path (what torch.compile and a queued
  GPU need): counts by `scatter_add_`, and the sorted tokens go to a buffer of fixed size in which
  each expert's rows start at a multiple of ALIGN (as torchtitan pads them), zero rows between.
  The loop reads the group sizes on the host: one sync per layer and micro-batch.
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
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .errors import ConfigError
from .muon import STACKED


ALIGN = 16  # each expert's rows start at a multiple of this, as torchtitan pads bf16 groups for _grouped_mm
N_FIGURES = 5  # after the counts in the statistics row: dropped, entropy, switch, z, forward passes


@dataclass
class MoEConfig:
    """A model's `[model.moe]` table; a model without one is dense. `experts = 0` is dense too (old
    runs' config.toml wrote `moe_experts = 0` for a dense model)."""

    experts: int = 8
    top_k: int = 2
    hidden: int = 0  # each expert's hidden width; 0 = the model's dense MLP width
    shared_experts: int = 0  # dense experts every token passes through, beside the routed ones
    dense_layers: int = 0  # the first layers keep a dense MLP
    capacity_factor: float = 0.0  # 0 = dropless
    aux_weight: float = 0.01  # Switch load-balancing loss
    z_weight: float = 1e-3  # router z-loss
    bias_rate: float = 0.0  # auxiliary-loss-free balancing step (1e-3 as in DeepSeek-V3); 0 = off

    def __post_init__(self):
        if self.experts == 0:
            return
        if not 1 <= self.top_k <= self.experts:
            raise ConfigError(f"model.moe.top_k must be in [1, experts={self.experts}], got {self.top_k}")
        if min(self.hidden, self.shared_experts, self.dense_layers) < 0 or self.experts < 0:
            raise ConfigError("model.moe: experts, hidden, shared_experts and dense_layers must not be negative")
        for name in ("capacity_factor", "aux_weight", "z_weight", "bias_rate"):
            if not 0.0 <= getattr(self, name) < float("inf"):  # NaN fails too
                raise ConfigError(f"model.moe.{name} must be a finite number >= 0, got {getattr(self, name)}")
        if 0 < self.capacity_factor < 1:
            raise ConfigError(f"model.moe.capacity_factor must be 0 (dropless) or at least 1, got {self.capacity_factor}")


def _stacked(*shape: int) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape))
    setattr(p, STACKED, True)
    return p


def grouped_supported(device: torch.device) -> bool:
    """Whether torch._grouped_mm runs on `device`: the CPU, and CUDA from Hopper (SM90) on. Asked
    when the module is built or moved, never inside the forward, which torch.compile traces."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu"


def buffer_rows(assignments: int, n_experts: int) -> int:
    """Rows of the expert buffer: every assignment, up to ALIGN padding rows per expert, and one row
    always left zero (what a dropped assignment reads); a multiple of ALIGN. It depends on the
    shapes only, so the graph is static."""
    need = assignments + n_experts * ALIGN + 1
    return -(-need // ALIGN) * ALIGN


class Routing(NamedTuple):
    row: torch.Tensor  # [N k] buffer row of each assignment (the zero last row if dropped)
    src: torch.Tensor  # [rows] token of each buffer row, N for a zero row
    ends: torch.Tensor  # [E] int32 group ends; the last expert also takes the zero rows after the
    # others, so that no output row is left unwritten (_grouped_mm leaves rows past the end empty)
    counts: torch.Tensor  # [E] assignments per expert
    kept: torch.Tensor  # [E] of them kept: at most the capacity, the first in token order
    keep: torch.Tensor | None  # [N k] whether each assignment is kept; None when dropless


def route(flat_e: torch.Tensor, n_experts: int, k: int, cap: int | None) -> Routing:
    """Places the assignments (flat_e [N k], the expert of each) in the expert buffer, on the device."""
    a, dev = flat_e.numel(), flat_e.device
    rows, blank = buffer_rows(a, n_experts), a // k  # blank: the zero row after the N tokens
    counts = torch.zeros(n_experts, dtype=torch.long, device=dev).scatter_add_(0, flat_e, torch.ones_like(flat_e))
    order = flat_e.argsort(stable=True)  # assignments grouped by expert, in token order within each
    place = torch.empty_like(order).scatter_(0, order, torch.arange(a, device=dev))
    slot = place - (counts.cumsum(0) - counts)[flat_e]  # position within its expert
    kept = counts if cap is None else counts.clamp(max=cap)
    # no empty group either (as torchtitan): some grouped kernels mishandle zero-size groups
    padded = ((kept + ALIGN - 1) // ALIGN).clamp(min=1) * ALIGN
    row = (padded.cumsum(0) - padded)[flat_e] + slot
    token = torch.arange(a, device=dev) // k
    keep = None if cap is None else slot < cap
    if keep is not None:  # a dropped assignment reads the last row, which every write keeps zero
        row, token = torch.where(keep, row, rows - 1), torch.where(keep, token, blank)
    src = torch.full((rows,), blank, dtype=torch.long, device=dev).scatter_(0, row, token)
    ends = padded.cumsum(0)
    ends[-1] = rows
    return Routing(row, src, ends.to(torch.int32), counts, kept, keep)


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
        # summed on the device, read and zeroed at logging points; always a tensor so that a compiled
        # forward is traced once, and not saved, so checkpoints are unchanged
        self.register_buffer("_stats", torch.zeros(n_experts + N_FIGURES), persistent=False)
        self.grouped = grouped_supported(self.up.device)
        for p in self.expert_weights():
            nn.init.normal_(p, std=0.02)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.grouped = grouped_supported(self.up.device)  # moved: ask the new device, outside any trace
        return out

    # ------------------------------------------------------------------ experts
    def expert_weights(self) -> list[nn.Parameter]:
        return [p for p in (self.up, self.gate, self.down) if p is not None]

    def _mlp(self, x: torch.Tensor, mm) -> torch.Tensor:
        """The expert MLP with `mm(x, weight)` as its matrix product (grouped, or one expert's)."""
        h = mm(x, self.up)
        h = F.silu(mm(x, self.gate)) * h if self.gated else F.relu(h).square()
        return mm(h, self.down)

    def _experts(self, xs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Expert MLPs over the buffer xs [rows, D]: expert e takes rows ends[e-1]:ends[e]."""
        device = xs.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else xs.dtype
        # the CUDA kernel is bf16 only; the CPU one takes fp32 too, but only in eager (under
        # torch.compile the shape function, like CUDA, accepts bf16 alone)
        eager_cpu = not xs.is_cuda and not torch.compiler.is_compiling()
        if self.grouped and (dtype == torch.bfloat16 or (eager_cpu and dtype == torch.float32)):
            return self._mlp(xs.to(dtype), lambda x, w: torch._grouped_mm(x, w.to(dtype).transpose(-2, -1), offs=ends))
        out, start = [], 0
        for e, end in enumerate(ends.tolist()):  # one host sync: the loop needs the sizes
            out.append(self._mlp(xs[start:end], lambda x, w: x @ w[e].t()))
            start = end
        return torch.cat(out)

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
        cap = math.ceil(self.capacity_factor * n * k / e) if self.capacity_factor > 0 else None
        r = route(experts.flatten(), e, k, cap)
        if r.keep is not None:
            gates = torch.where(r.keep.view(n, k), gates, 0.0)  # a dropped assignment adds nothing
        ys = self._experts(F.pad(flat, (0, 0, 0, 1))[r.src], r.ends)  # token N: the zero row
        out = (ys[r.row].view(n, k, -1) * gates[..., None]).sum(1).to(flat.dtype)
        if self.shared is not None:
            out = out + self.shared(flat)

        counts = r.counts.float()
        frac = counts / (n * k)
        switch = e * (frac * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).square().mean()
        self.aux_loss = self.aux_weight * switch + self.z_weight * z
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.load += counts
                entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
                dropped = 1.0 - r.kept.sum().float() / (n * k)
                calls = torch.ones((), device=flat.device)
                figures = torch.stack([dropped, entropy, switch.detach(), z.detach(), calls])
                self._stats += torch.cat([counts, figures])
        return out.view(shape)

    # ------------------------------------------------------------------ after each step, and logging
    @torch.no_grad()
    def update_bias(self) -> None:
        """The auxiliary-loss-free step: experts above the mean load lose bias, those below gain,
        then the biases are re-centred. Every process uses the load summed over all of them. No
        test of the load on the host (a sync per step): a zero load moves no bias anyway."""
        if self.bias_rate > 0:
            load = distributed.sum_across(self.load)
            self.expert_bias += self.bias_rate * torch.sign(load.mean() - load)
            self.expert_bias -= self.expert_bias.mean()
        self.load.zero_()

    def pop_stats(self) -> dict[str, float | list[int]]:
        """Figures since the last call (one host sync): tokens per expert, max/mean load, dropped
        fraction, router entropy, the Switch auxiliary and z losses (means over forward passes)."""
        s = self._stats.tolist()
        self._stats.zero_()
        counts, (dropped, entropy, switch, z, calls) = s[:self.n_experts], s[self.n_experts:]
        if not calls:  # no training forward pass since the last call
            return {}
        mean = sum(counts) / self.n_experts
        return {"tokens_per_expert": [int(c) for c in counts], "max_over_mean_load": max(counts) / mean if mean else 0.0,
                "dropped": dropped / calls, "router_entropy": entropy / calls, "aux_switch": switch / calls,
                "aux_z": z / calls}
