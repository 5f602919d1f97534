"""Cross-entropy over a large vocabulary without the full logits.

`linear_cross_entropy` computes the output layer and the loss together, a chunk of tokens at a
time, and works out the gradients in the same pass, so only one chunk of logits exists at once.
At 16 x 2048 tokens and 49,152 classes the full fp32 logits and their gradient are about 13 GB;
in chunks of 4,096 tokens the transient is under 1 GB (benchmarks/llm_throughput.py reports peak
memory both ways). Written here because the fused kernels (Liger, Apple's cut-cross-entropy) are
Triton-only and this must also run on the CPU.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, softcap: float) -> torch.Tensor:
        n = h.shape[0]
        w = weight.to(h.dtype)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            logits = (hc @ w.t()).float()
            if softcap:
                squashed = torch.tanh(logits / softcap)
                logits = squashed * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if need_grad:  # d(mean loss)/d(logits) = (softmax - one_hot) / n, turned into h and W gradients now
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(tc), device=tc.device), tc] -= 1.0
                if softcap:  # through cap * tanh(z / cap): times 1 - tanh^2
                    probs.mul_(1 - squashed.square())
                g = probs.div_(n).to(h.dtype)
                grad_h[s:s + chunk] = g @ w
                grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.weight_dtype), None, None, None


@torch.compiler.disable  # a few large matmuls in eager mode; keeps the compiled graph free of the loop
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 4096,
                         softcap: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` [N, V] against targets [N], for h [N, D], in chunks of
    `chunk` rows; the same value and gradients as F.cross_entropy on the fp32 logits (soft-capped
    as softcap * tanh(logits / softcap) when softcap > 0)."""
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, softcap)
