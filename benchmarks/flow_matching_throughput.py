"""Training throughput of a flow-matching preset: images/s of full training steps (forward,
backward, Muon + AdamW, EMA) on synthetic uint8 images, printed as JSON with the hardware.

    python benchmarks/flow_matching_throughput.py --config configs/flow_matching/dit-s.toml --batch_size 256
    python benchmarks/flow_matching_throughput.py --config configs/flow_matching/debug.toml --steps 5 --warmup 2

The steps are the trainer's own (Trainer.train_step); warm-up steps (and compilation, with
--compile) are excluded from the timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from flow_matching.config import FlowMatchingRunConfig
from flow_matching.dit import DiT2D
from flow_matching.task import FlowMatchingTask
from shared.config import load_config
from shared.errors import UserError, run_main
from shared.images import ImageBatches, ImageSet
from shared.trainer import Trainer, count_params, hardware_info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--batch_size", type=int, help="default: the preset's train.batch_size")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: the preset's train.compile")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="default: the preset's train.precision")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args()
    if args.steps <= 0 or args.warmup < 0:
        raise UserError("--steps must be positive and --warmup non-negative")
    cfg = load_config(FlowMatchingRunConfig, args.config, args.overrides)
    if args.batch_size:
        cfg.train.batch_size = args.batch_size
    if args.compile is not None:
        cfg.train.compile = args.compile
    if args.precision:
        cfg.train.precision = args.precision
    cfg.model.num_classes = 10
    size = cfg.model.image_size
    n = max(cfg.train.batch_size * 4, 1024)
    g = torch.Generator().manual_seed(0)
    images = ImageSet(torch.randint(0, 256, (n, cfg.model.channels, size, size), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (n,), generator=g), tuple(str(i) for i in range(10)), "synthetic")

    torch.manual_seed(0)
    model = DiT2D(cfg.model)
    task = FlowMatchingTask(cfg.flow, cfg.sample, images, images.classes)
    data = ImageBatches(images, cfg.train.batch_size, 0, hflip=cfg.data.hflip)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, task, data, cfg.train, cfg.optim, tmp, quiet=True)
        trainer.total_steps = args.warmup + args.steps  # the schedule's length; the rate does not depend on it
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            trainer.train_step()
        trainer._sync()
        warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        trainer._sync()
        dt = time.perf_counter() - t0
    result = {
        "benchmark": "flow_matching_train_throughput", "config": args.config, "overrides": args.overrides,
        "params": count_params(model), "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
        "tokens_per_image": model.grid ** 2, "precision": str(trainer.dtype).removeprefix("torch."),
        "compile": cfg.train.compile, "ema": cfg.train.ema_decay > 0, "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 2), "timed_steps": args.steps, "timed_s": round(dt, 3),
        "images_per_s": round(args.steps * trainer.units_per_step / dt, 1), "hardware": hardware_info(trainer.device),
    }
    if trainer.device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(trainer.device) / 2**30, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main)
