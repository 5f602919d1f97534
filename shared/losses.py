"""Cross-entropy over a large vocabulary without the full logits.

`linear_cross_entropy` computes the output layer and the loss together, a chunk of tokens at a
time, and works out the gradients in the same pass, so only one chunk of logits exists at once.
At 16 x 2048 tokens and 49,152 classes the full fp32 logits and their gradient are about 13 GB;
in chunks of 4,096 tokens the transient is under 1 GB (benchmarks/llm_throughput.py reports peak
memory both ways). Written here because the fused kernels (Liger, Apple's cut-cross-entropy) are
Triton-only and this must also run on the CPU.

What is compiled where. The chunk loop stays in Python, in an autograd.Function. Each chunk's
body (`_chunk`: logits matmul, fp32 logits, softcap, logsumexp, target logit, softmax gradient,
cast to the matmul dtype) is one function, torch.compile'd on CUDA: eager, the loss spends most of
its time in memory-bound passes over [chunk, vocab] fp32 tensors, which inductor fuses into a few
kernels that read the matmul's bf16 output and write the gradient into the same buffer; the
matmul stays cuBLAS. On the CPU the same function runs eagerly unless `compile=True` (the tests
use it to check what CUDA runs): CPU inductor needs a C++ compiler and seconds of compiling per
shape, and the CPU presets use the full logits anyway (with it, 512 x 4,096 classes on one thread
takes 5 instead of 23 ops per chunk; `benchmarks/llm_throughput.py --loss_report`). The compile is
static-shaped (dynamic=False): full chunks get one graph and a shorter last chunk one
dynamic-length graph for every length, so a run compiles at most twice, and twice more for
evaluation (no gradients), per dtype and softcap. The two gradient matmuls run eagerly after it,
cuBLAS either way.

Casts happen once per call, not per chunk: the weight and h are cast to the matmul dtype
(autocast's when it is on, h's otherwise) before the loop, with autocast off inside, and the
gradient is cast to that dtype once, in the fused pass, for both matmuls; grad_w accumulates in
fp32. The eager path gives the same bits as the code before (autocast cast the same tensors to
bf16, only more often); compiled, the same values within fp32 rounding (a bf16 gradient
entry may round the other way).

linear_cross_entropy stays a graph break (torch.compiler.disable) in a model that is itself
compiled: dynamo would otherwise unroll the chunk loop into the model's graph, where inductor may
schedule several chunks' logits to be alive at once. The break costs one exit from and re-entry
into compiled code per forward, the compiled chunk body runs from inside it, and neither
recompiles from step to step (checked on the CPU with a compiled Decoder).
"""

from __future__ import annotations

import functools

import torch


def _chunk(hc: torch.Tensor, w: torch.Tensor, tc: torch.Tensor, n: torch.Tensor, softcap: float,
           need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk of rows: the summed loss and, with need_grad, d(mean loss)/d(logits) = (softmax
    - one_hot) / n in w's dtype. Written so that eager mode makes few [chunk, V] temporaries and
    inductor can fuse it."""
    logits = (hc @ w.t()).float()
    if softcap:
        squashed = torch.tanh(logits / softcap)
        logits = squashed * softcap
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
    if not need_grad:
        return loss, None
    probs = logits.sub_(lse[:, None]).exp_()
    if torch.compiler.is_compiling():  # a compare fuses into the pass that writes the gradient
        probs = probs - (torch.arange(probs.shape[1], device=probs.device) == tc[:, None])
    else:  # eager: one write per row, not a [chunk, V] mask
        probs[torch.arange(len(tc), device=tc.device), tc] -= 1.0
    if softcap:  # through cap * tanh(z / cap): times 1 - tanh^2
        probs = probs.mul_(1 - squashed.square())
    return loss, probs.div_(n).to(w.dtype)


@functools.cache
def _compiled_chunk():
    return torch.compile(_chunk, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, softcap: float,
                compiled: bool, grad_mode: bool) -> torch.Tensor:
        n, device = h.shape[0], h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        # needs_input_grad is set under torch.no_grad too: evaluation would pay for gradients
        need_grad = grad_mode and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        body = _compiled_chunk() if compiled else _chunk
        with torch.autocast(device, enabled=False):  # cast once here rather than by autocast at every matmul
            hx, w = h.to(dtype), weight.to(dtype)
            grad_h = torch.empty_like(hx) if need_grad else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            count = torch.full((), n, dtype=torch.float32, device=h.device)  # a tensor: n is no compile constant
            for s in range(0, n, chunk):
                hc, tc = hx[s:s + chunk], targets[s:s + chunk]
                if compiled and 1 < len(tc) < chunk:  # the short last chunk: one graph for every length
                    torch._dynamo.mark_dynamic(hc, 0)
                    torch._dynamo.mark_dynamic(tc, 0)
                loss, g = body(hc, w, tc, count, softcap, need_grad)
                total += loss
                if need_grad:
                    torch.mm(g, w, out=grad_h[s:s + chunk])
                    if g.dtype == grad_w.dtype:
                        grad_w.addmm_(g.t(), hc)
                    else:  # a bf16 product added into fp32 (the add casts as it reads)
                        grad_w += g.t() @ hc
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.weight_dtype = h.dtype, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h.to(ctx.h_dtype) * grad_out.to(ctx.h_dtype), (grad_w * grad_out).to(ctx.weight_dtype),
                None, None, None, None, None)


@torch.compiler.disable  # the chunk loop stays out of a compiled model's graph (module docstring)
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 4096,
                         softcap: float = 0.0, compile: bool | None = None) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` [N, V] against targets [N], for h [N, D], in chunks of
    `chunk` rows; the same value and gradients as F.cross_entropy on the fp32 logits (soft-capped
    as softcap * tanh(logits / softcap) when softcap > 0). compile: torch.compile each chunk's
    body (default: on CUDA only)."""
    compiled = h.is_cuda if compile is None else compile
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, softcap, compiled, torch.is_grad_enabled())
