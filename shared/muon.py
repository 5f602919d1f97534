"""Muon with the orthogonalisation precision chosen per device.

Why not torch.optim.Muon as it is: it always runs Newton-Schulz in bf16, and a CPU without native
bf16 matmuls emulates them. Measured on the 2-core development CPU with the `debug` LLM preset:
torch.optim.Muon took 0.73 s per step against 0.13 s for forward + backward; this version, in fp32
on the CPU and batched over same-shape matrices, takes about 0.03 s. On a GPU it runs in bf16 like
torch's. The update is the same as torch.optim.Muon's (tests/test_optim.py checks them against
each other): Nesterov momentum, quintic Newton-Schulz, lr scaled by sqrt(max(1, rows/cols)),
decoupled weight decay.

Unlike torch.optim.Muon it also takes convolution filters [out, in, kh, kw], orthogonalised as
[out, in*kh*kw] matrices (as in Keller Jordan's CIFAR-10 speedruns); split_params sends them here
only when asked (OptimConfig.muon_conv). Mixture-of-experts weights [E, out, in] (flagged
`stacked_matrices`) are E matrices, orthogonalised in one batched call.

Under FSDP2 the parameters are row shards (DTensors): each step gathers the whole updates, every
rank orthogonalises all of them (redundant but simple; the matrices here are at most 2048 x 512),
and each keeps its own rows. tests/test_distributed.py checks that the step equals one process's.

Two options reproduce 5-dollar-llm's Muon: `ns="polar_express"` (the Polar Express iteration of
Amsel et al. 2025, five steps with their own coefficients, after a norm with a 1% safety margin),
and `merged`: groups of matrices of one width orthogonalised as a single matrix stacked by rows,
with the step size of the stack (their attention keeps q, k, v and o in one [q + 2 kv + o, d]
parameter, so its Muon orthogonalises that). The momentum is elementwise, so merging changes only
the orthogonalisation and the step size.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate

STACKED = "stacked_matrices"  # set on [E, out, in] parameters (shared/moe.py): E separate matrices

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # Keller Jordan's quintic, as in torch.optim.Muon
# Polar Express (Amsel et al. 2025), one (a, b, c) per step, as 5-dollar-llm and modded-nanogpt use them
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
NS_METHODS = ("quintic", "polar_express")


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None,
                  method: str = "quintic") -> torch.Tensor:
    """Approximately U V^T for g = U S V^T ([..., m, n], batched), singular values near 1."""
    x = g.to(dtype or g.dtype, copy=True)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    if method == "polar_express":
        if steps > len(POLAR_EXPRESS):
            raise ValueError(f"Polar Express has coefficients for {len(POLAR_EXPRESS)} steps, not {steps}")
        coefficients = POLAR_EXPRESS[:steps]
        x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + eps)  # the margin keeps every singular value below 1
    else:
        coefficients = (NS_COEFFICIENTS,) * steps
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for a, b, c in coefficients:
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.mT if tall else x


def normalise_second_moment(x: torch.Tensor, second: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (Li et al. 2025): orthogonalised updates x [N, m, n] rescaled per row (tall, m >= n) or
    per column (wide) by an EMA of their mean square, `second` [N, m, 1] or [N, 1, n], updated in
    place, then scaled back to each matrix's norm before: Muon's step size, evener across neurons."""
    dim = -1 if x.size(-2) >= x.size(-1) else -2
    mean_sq = x.float().square().mean(dim=dim, keepdim=True)
    second.lerp_(mean_sq.to(second.dtype), 1 - beta2)
    scale = second.clamp_min(1e-10).rsqrt()
    before = (mean_sq.sum(dim=(-2, -1), keepdim=True) * x.size(dim)).sqrt()
    after = (mean_sq * x.size(dim) * scale.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return x * (scale * before / after.clamp_min(1e-10)).to(x.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: torch.dtype | None = None,
                 ns: str = "quintic", merged: list[list[torch.nn.Parameter]] = (), beta2: float = 0.0,
                 cautious_wd: bool = False):
        """`merged`: groups of 2-D parameters (all in `params`, of one width) orthogonalised as one
        matrix, their rows stacked in the order given. `beta2` > 0: NorMuon's second-moment
        normalisation (normalise_second_moment). `cautious_wd`: weight decay only where the update
        and the weight have the same sign (it would shrink the weight anyway), at the update's
        shape-scaled rate, as nanochat decays (plain decay runs at lr)."""
        if ns not in NS_METHODS:
            raise ValueError(f"unknown orthogonalisation {ns!r}; choose one of {NS_METHODS}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        beta2=beta2, cautious_wd=cautious_wd)
        super().__init__(params, defaults)
        self.ns_dtype, self.ns = ns_dtype, ns
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon takes matrices or conv filters, got a parameter of shape {tuple(p.shape)}")
        self.merged = self._check_merged(merged)

    def _check_merged(self, merged) -> dict[int, tuple]:
        """{id of each parameter in a merged group: the whole group}."""
        mine = {id(p) for group in self.param_groups for p in group["params"]}
        out: dict[int, tuple] = {}
        for members in merged:
            members = tuple(members)
            if any(id(p) not in mine or id(p) in out or p.ndim != 2 or getattr(p, STACKED, False) for p in members) \
                    or len({p.shape[1] for p in members}) != 1:
                raise ValueError("a merged group holds distinct 2-D parameters of this optimiser, all of one width")
            out.update((id(p), members) for p in members)
        return out

    def _units(self, params: list) -> dict[tuple, list[tuple]]:
        """The matrices to orthogonalise, by shape: each a tuple of parameters (one, or a merged
        group whose members all have gradients), keyed by (rows, cols) or, for stacked experts,
        their [E, out, in] shape."""
        by_shape: dict[tuple, list[tuple]] = {}
        have = {id(p) for p in params}
        done: set[int] = set()
        for p in params:
            if id(p) in done:
                continue
            unit = self.merged.get(id(p), (p,))
            if not all(id(q) in have for q in unit):
                unit = (p,)  # a member without a gradient: this step the others go alone
            done.update(id(q) for q in unit)
            if getattr(p, STACKED, False):  # [E, out, in]: E matrices, each on its own
                key = tuple(p.shape)
            else:
                key = (sum(q.shape[0] for q in unit), p.numel() // p.shape[0])  # conv filters: [out, in*kh*kw]
            by_shape.setdefault(key, []).append(unit)
        return by_shape

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            for shape, units in self._units(with_grad).items():
                params = [p for unit in units for p in unit]
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(state["momentum_buffer"])
                grads = [p.grad for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
                if group["nesterov"]:
                    updates = [g.lerp(b, group["momentum"]) for g, b in zip(grads, bufs)]
                else:
                    updates = bufs
                dtype = self.ns_dtype or (torch.bfloat16 if params[0].is_cuda else torch.float32)
                rows, cols = shape[-2], shape[-1]
                sharded = isinstance(params[0], DTensor)
                if sharded:  # FSDP: Newton-Schulz needs whole matrices; every rank orthogonalises them all
                    updates = [u.full_tensor() for u in updates]
                flat = [u.reshape(u.shape[0], -1) if not getattr(p, STACKED, False) else u for u, p in zip(updates, params)]
                pieces = iter(flat)  # in unit order: a merged group's members stack by rows
                stacked = torch.stack([torch.cat([next(pieces) for _ in unit]) if len(unit) > 1 else next(pieces)
                                       for unit in units])
                ortho = orthogonalize(stacked.reshape(-1, rows, cols), group["ns_steps"], dtype=dtype, method=self.ns)
                if group["beta2"]:
                    ortho = self._normalised(ortho, units, group["beta2"])
                ortho = ortho.reshape(stacked.shape).to(params[0].dtype)
                ortho = [piece.reshape(p.shape) for m, unit in zip(ortho.unbind(0), units)
                         for piece, p in zip(m.split([q.shape[0] for q in unit]), unit)]
                if sharded:  # back to each parameter's layout: keeping this rank's rows is local, no communication
                    ortho = [DTensor.from_local(o, p.device_mesh, [Replicate()], run_check=False)
                             .redistribute(p.device_mesh, p.placements) for o, p in zip(ortho, params)]
                scale = group["lr"] * max(1.0, rows / cols) ** 0.5
                if group["weight_decay"] and group["cautious_wd"]:  # at the update's rate where it and p agree in sign
                    decay = [p * ((o * p) >= 0) for p, o in zip(params, ortho)]
                    torch._foreach_add_(params, decay, alpha=-scale * group["weight_decay"])
                elif group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, ortho, alpha=-scale)
        return loss

    def _normalised(self, ortho: torch.Tensor, units: list[tuple], beta2: float) -> torch.Tensor:
        """ortho [N, m, n] (the units' matrices in order) through NorMuon, with each unit's second
        moment kept in its first parameter's state."""
        m, n = ortho.shape[-2:]
        counts = [ortho.shape[0] // len(units)] * len(units)  # stacked experts: E matrices per unit
        seconds = []
        for unit, k in zip(units, counts):  # keyed by shape: a merged group also steps alone when a member lacks a grad
            key = f"second_moment_{m}x{n}"
            state = self.state[unit[0]]
            if key not in state:
                state[key] = torch.zeros((k, m, 1) if m >= n else (k, 1, n), device=ortho.device)
            seconds.append(state[key])
        second = torch.cat(seconds) if len(seconds) > 1 else seconds[0]
        out = normalise_second_moment(ortho, second, beta2)
        if len(seconds) > 1:  # cat made a copy: write each unit's moment back
            for s, part in zip(seconds, second.split(counts)):
                s.copy_(part)
        return out

