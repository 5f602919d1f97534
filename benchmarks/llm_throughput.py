"""Training throughput of an LLM preset: tokens/s for forward + backward + optimiser steps of the
shared trainer, model FLOPs utilisation on a GPU, and peak memory. Prints one JSON object.

    python benchmarks/llm_throughput.py --preset blueberry-88m --compile
    python benchmarks/llm_throughput.py --preset blueberry-88m --compile --loss_chunk 0   # full fp32 logits
    python benchmarks/llm_throughput.py --preset debug --steps 10          # a CPU smoke run
    torchrun --standalone --nproc_per_node 1 benchmarks/llm_throughput.py --preset blueberry-88m --compile   # DDP path

FLOPs per token (llm.model.matmul_flops_per_token): 6 x every matmul weight, the output layer
included and the embedding lookup not, plus 12 x layers x width x sequence for attention (PaLM's
accounting; the causal half is not subtracted). MFU = tokens/s x that / the GPU's dense bf16 peak.
Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak resident set.

--loss_report measures the output layer + loss alone instead (shared/losses.py), forward and
backward of one chunk's tokens (--loss_chunk, the preset's by default) three ways: the eager
chunked code before its body was compiled (`_OldLinearCrossEntropy` below, kept here only for
this comparison), the chunked loss as the package runs it (its chunk body compiled on CUDA, eager
on the CPU; on the CPU also compiled, as CUDA runs it), and the full logits + F.cross_entropy
under torch.compile. For each: ms per call, peak memory above the inputs, and kernels per call
and per added chunk (two chunks' count less one's). Kernels are what the profiler records: on a
GPU the CUDA kernels (memsets and copies apart); on the CPU, labelled so, the aten ops dispatched
that do the work (the lowest in each call tree, less views and allocations) plus inductor's fused
C++ kernels. Precision as in training (--precision; bf16 autocast on a GPU):

    python benchmarks/llm_throughput.py --preset blueberry-88m --loss_report        # a GPU: 4,096 x 49,152
    python benchmarks/llm_throughput.py --preset debug --loss_report --vocab_size 4096 --loss_chunk 512   # CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from llm.config import LLMRunConfig
from llm.model import Decoder, matmul_flops_per_token
from llm.task import LanguageModelTask
from shared.config import load_config
from shared.contracts import BatchSource
from shared.errors import UserError, run_main
from shared.losses import linear_cross_entropy
from shared.trainer import Trainer, count_params, hardware_info, pick_device, pick_dtype

ROOT = Path(__file__).resolve().parent.parent
# dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a fragment of torch.cuda.get_device_name;
# the more specific fragments come first (an H100 PCIe is not an H100 SXM)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12))


class RandomTokens(BatchSource):
    def __init__(self, vocab: int, batch: int, seq: int):
        self.vocab, self.batch, self.seq = vocab, batch, seq
        self.units_per_batch = batch * seq
        self.g = torch.Generator().manual_seed(0)

    def next_batch(self):
        x = torch.randint(1, self.vocab, (self.batch, self.seq + 1), generator=self.g)
        x[torch.rand(x.shape, generator=self.g) < 1 / 500] = 0  # id 0 stands for EOS: documents of ~500 tokens
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()  # as llm.data hands them: contiguous, pinned fast

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class _OldLinearCrossEntropy(torch.autograd.Function):
    """shared/losses.py before its per-chunk body was compiled, for --loss_report only: eager, the
    weight cast (by autocast) at each chunk's matmuls, fp32 gradients cast again for each."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, softcap):
        n = h.shape[0]
        w = weight.to(h.dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            logits = (hc @ w.t()).float()
            if softcap:
                squashed = torch.tanh(logits / softcap)
                logits = squashed * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(tc), device=tc.device), tc] -= 1.0
            if softcap:
                probs.mul_(1 - squashed.square())
            g = probs.div_(n).to(h.dtype)
            grad_h[s:s + chunk] = g @ w
            grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.weight_dtype), None, None, None


# leaf aten ops that move no data (views, allocations, no-op casts): not counted as work on the CPU
_NO_WORK = {"as_strided", "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "slice", "select", "squeeze",
            "unsqueeze", "expand", "alias", "detach", "resolve_conj", "resolve_neg", "real", "to", "lift_fresh",
            "empty", "empty_strided", "empty_like"}


def _launches(prof, device: torch.device) -> dict:
    """What ran. CUDA: the GPU's kernels, and its memsets and copies apart. CPU: the aten ops
    dispatched that do the work (the lowest ones that are not views, allocations or no-op casts)
    and inductor's fused C++ kernels."""
    if device.type == "cuda":
        names = [e.name() for e in prof.profiler.kineto_results.events()
                 if e.device_type() == torch.autograd.DeviceType.CUDA]
        copies = sum(n.startswith(("Memcpy", "Memset")) for n in names)
        return {"kernels": len(names) - copies, "memsets_copies": copies}

    def work(e):  # an op counts unless ops under it do the work
        below = sum(work(c) for c in e.cpu_children)
        return below or int(e.name.startswith("aten::") and e.name[6:] not in _NO_WORK or "cpp_fused" in e.name)

    return {"kernels": sum(work(e) for e in prof.events() if e.cpu_parent is None)}


def _peak_above(run, device: torch.device) -> int:
    """Bytes allocated by `run` at its peak, beyond what was held before: the CUDA allocator's
    counter, or on the CPU the running sum of the profiler's allocation records."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch._C._profiler import _EventType
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    allocs, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        e = todo.pop()
        todo += e.children
        if e.tag == _EventType.Allocation:
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
    held = peak = 0
    for _, size in sorted(allocs):
        held += size
        peak = max(peak, held)
    return peak


def loss_report(cfg, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """--loss_report: per path, at one chunk's tokens, milliseconds, peak memory above the inputs and
    kernels per call, and for the chunked paths the kernels that one more chunk adds."""
    chunk, vocab, dim, cap = cfg.model.loss_chunk, cfg.model.vocab_size, cfg.model.d_model, cfg.model.logit_softcap
    if chunk < 1:
        raise UserError("--loss_report compares chunked losses: --loss_chunk must be positive")
    if device.type == "cpu":  # inductor's C++ kernels appear in the profiler only when asked before compiling
        import torch._inductor.config
        torch._inductor.config.cpp.enable_kernel_profile = True
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2 * chunk, dim, generator=g).to(device).requires_grad_()  # fp32: what the final norm gives
    w = (torch.randn(vocab, dim, generator=g) / dim ** 0.5).to(device).requires_grad_()
    y = torch.randint(0, vocab, (2 * chunk,), generator=g).to(device)

    @torch.compile(dynamic=False)
    def full(h, w, y):  # what Decoder.forward does with loss_chunk = 0
        logits = F.linear(h, w)
        logits = cap * torch.tanh(logits.float() / cap) if cap else logits
        return F.cross_entropy(logits.float(), y)

    paths = {"old_eager": lambda h, w, y: _OldLinearCrossEntropy.apply(h, w, y, chunk, cap),
             "new": lambda h, w, y: linear_cross_entropy(h, w, y, chunk, cap)}
    if device.type == "cpu":  # what CUDA runs, here by CPU inductor
        paths["new_compiled"] = lambda h, w, y: linear_cross_entropy(h, w, y, chunk, cap, compile=True)
    paths["full_logits_compiled"] = full
    activities = [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(loss, n):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = loss(h[:n], w, y[:n])
        out.backward()
        h.grad = w.grad = None
        sync()

    result = {}
    for name, loss in paths.items():
        for n in (chunk, 2 * chunk, chunk):  # compile both shapes, warm the allocator
            step(loss, n)
        counts = []
        for n in (chunk, 2 * chunk):
            with torch.profiler.profile(activities=activities) as prof:
                step(loss, n)
            counts.append(_launches(prof, device))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(loss, chunk)
            times.append(time.perf_counter() - t0)
        row = {"ms_per_call": round(1e3 * sorted(times)[len(times) // 2], 3),
               "peak_memory_mib": round(_peak_above(lambda: step(loss, chunk), device) / 2**20, 1)}
        row.update({f"{k}_per_call": v for k, v in counts[0].items()})
        if name != "full_logits_compiled":
            row.update({f"{k}_per_added_chunk": counts[1][k] - v for k, v in counts[0].items()})
        result[name] = row
    return {"report": "loss", "tokens": chunk, "vocab_size": vocab, "d_model": dim, "softcap": cap,
            "precision": str(dtype).removeprefix("torch."),
            "counted": ("CUDA kernels, and memsets + copies apart (torch.profiler)" if device.type == "cuda" else
                        "CPU, not GPU kernels: leaf aten ops dispatched less views and allocations, plus inductor's "
                        "fused C++ kernels (torch.profiler)"),
            "peak_memory": ("torch.cuda.max_memory_allocated above the inputs" if device.type == "cuda" else
                            "CPU: the peak of the profiler's allocation records above the inputs"),
            "paths": result, "hardware": hardware_info(device)}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16 if k in name), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="blueberry-88m", help="a name in configs/llm/ or a TOML path")
    p.add_argument("--batch_size", type=int, help="micro-batch (default: the preset's)")
    p.add_argument("--seq_len", type=int, help="default: the preset's")
    p.add_argument("--vocab_size", type=int, default=49152, help="the preset's tokenizer size (SmolLM2: 49152)")
    p.add_argument("--steps", type=int, default=20, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--loss_chunk", type=int, help="tokens per output-layer chunk (default: the preset's; 0 = full logits)")
    p.add_argument("--doc_mask", action="store_true", help="attention inside documents (a synthetic EOS every ~500 tokens)")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="under torchrun: the data-parallel mode (torchrun --nproc_per_node 1 measures its overhead)")
    p.add_argument("--loss_report", action="store_true",
                   help="measure the output layer + loss alone, old and new chunked paths and the compiled full logits")
    p.add_argument("--repeats", type=int, default=5, help="--loss_report: timed calls per path (the median is kept)")
    args = p.parse_args()
    path = Path(args.preset) if args.preset.endswith(".toml") else ROOT / "configs" / "llm" / f"{args.preset}.toml"
    overrides = [f"model.vocab_size={args.vocab_size}", f"train.compile={str(args.compile).lower()}",
                 f"train.precision=\"{args.precision}\"", f"train.device=\"{args.device}\"", "train.grad_accum=1",
                 f"train.parallel=\"{args.parallel}\""]
    overrides += [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    overrides += [f"data.seq_len={args.seq_len}"] if args.seq_len else []
    overrides += [f"model.loss_chunk={args.loss_chunk}"] if args.loss_chunk is not None else []
    cfg = load_config(LLMRunConfig, path, overrides)
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    if args.loss_report:
        device = pick_device(args.device)
        print(json.dumps(loss_report(cfg, device, pick_dtype(args.precision, device), max(1, args.repeats)), indent=2))
        return
    seq, batch = cfg.data.seq_len, cfg.train.batch_size
    torch.manual_seed(0)
    model = Decoder(cfg.model, seq)
    cfg.train.budget = (args.steps + args.warmup) * batch * seq
    task = LanguageModelTask(torch.zeros(1, seq + 1, dtype=torch.long), tokenizer=None, doc_mask=args.doc_mask, eos_id=0)
    trainer = Trainer(model, task, RandomTokens(cfg.model.vocab_size, batch, seq), cfg.train, cfg.optim,
                      run_dir=Path("/dev/null"), quiet=True)
    for _ in range(args.warmup):
        trainer.train_step()
    trainer._sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss, _ = trainer.train_step()
    loss.item()
    trainer._sync()
    dt = time.perf_counter() - t0
    tokens_per_s = args.steps * batch * seq / dt
    flops_per_token = matmul_flops_per_token(model, seq)
    peak = peak_flops(trainer.device)
    result = {
        "preset": path.stem, "params": count_params(model), "batch_size": batch, "seq_len": seq,
        "vocab_size": cfg.model.vocab_size, "precision": str(trainer.dtype).removeprefix("torch."),
        "compile": args.compile, "loss_chunk": cfg.model.loss_chunk, "doc_mask": args.doc_mask, "steps": args.steps, "seconds": round(dt, 3), "tokens_per_s": round(tokens_per_s, 1),
        "model_flops_per_token": flops_per_token, "achieved_tflops": round(tokens_per_s * flops_per_token / 1e12, 3),
        "mfu": round(tokens_per_s * flops_per_token / peak, 4) if peak else None,
        "peak_tflops_assumed": peak / 1e12 if peak else None,
        "world_size": trainer.dist.world,
        "parallel": (args.parallel if trainer.dist.active else "none"),
        "hardware": hardware_info(trainer.device),
    }
    if trainer.device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:  # ru_maxrss is in KiB on Linux
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main)
