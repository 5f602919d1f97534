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
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from llm.config import LLMRunConfig
from llm.model import Decoder, matmul_flops_per_token
from llm.task import LanguageModelTask
from shared.config import load_config
from shared.errors import UserError, run_main
from shared.trainer import Trainer, count_params, hardware_info

ROOT = Path(__file__).resolve().parent.parent
# dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a fragment of torch.cuda.get_device_name;
# the more specific fragments come first (an H100 PCIe is not an H100 SXM)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12))


class RandomTokens:
    def __init__(self, vocab: int, batch: int, seq: int):
        self.vocab, self.batch, self.seq = vocab, batch, seq
        self.units_per_batch = batch * seq
        self.g = torch.Generator().manual_seed(0)

    def next_batch(self):
        x = torch.randint(1, self.vocab, (self.batch, self.seq + 1), generator=self.g)
        x[torch.rand(x.shape, generator=self.g) < 1 / 500] = 0  # id 0 stands for EOS: documents of ~500 tokens
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


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
