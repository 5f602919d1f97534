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
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate

STACKED = "stacked_matrices"  # set on [E, out, in] parameters (shared/moe.py): E separate matrices

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # Keller Jordan's quintic, as in torch.optim.Muon


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T ([..., m, n], batched), singular values near 1."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype or g.dtype, copy=True)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon takes matrices or conv filters, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, params in by_shape.items():
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
                if getattr(params[0], STACKED, False):  # [E, out, in]: E matrices, each on its own
                    rows, cols = shape[-2], shape[-1]
                else:
                    rows = shape[0]
                    cols = params[0].numel() // rows  # conv filters: [out, in*kh*kw]
                sharded = isinstance(params[0], DTensor)
                if sharded:  # FSDP: Newton-Schulz needs whole matrices; every rank orthogonalises them all
                    updates = [u.full_tensor() for u in updates]
                stacked = torch.stack(updates).reshape(-1, rows, cols)
                ortho = orthogonalize(stacked, group["ns_steps"], dtype=dtype).reshape(len(params), *shape)
                ortho = list(ortho.to(params[0].dtype).unbind(0))
                if sharded:  # back to each parameter's layout: keeping this rank's rows is local, no communication
                    ortho = [DTensor.from_local(o, p.device_mesh, [Replicate()], run_check=False)
                             .redistribute(p.device_mesh, p.placements) for o, p in zip(ortho, params)]
                scale = group["lr"] * max(1.0, rows / cols) ** 0.5
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, ortho, alpha=-scale)
        return loss
