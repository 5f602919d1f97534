"""Test accuracy of the classifier's EMA weights under the EMA before and after the issue-11 changes.

    python benchmarks/ema_classifier.py data.eval_images=0 train.eval_every=0 --data PATH/cifar10-jpeg --seeds 0 1 2

Trains the classifier preset (configs/classifier/debug.toml unless --config) once per variant and
seed, as scripts/train_classifier.py does, and scores the EMA weights and the trained ones on the
test split (data.eval_images of it; 0 is all of it). Variants:

    before     the fixed warm-up (horizon 10); BatchNorm statistics copied from the live model
    measured   the fixed warm-up; BatchNorm statistics measured for the EMA weights (the fix alone)
    horizon    the warm-up sized to the run; statistics copied (the schedule alone)
    averaged   the warm-up sized to the run; float buffers averaged like the weights (the other fix)
    after      the warm-up sized to the run; statistics measured: what the trainer now does

Prints one JSON object per run, then mean +- sample standard deviation per variant. Overrides
(section.key=value, before the flags) go to every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from judge.classifier import ClassifierTask, build_classifier
from judge.config import ClassifierRunConfig
from shared.config import load_config
from shared.ema import EMA
from shared.images import ImageBatches, load_images
from shared.trainer import Trainer, hardware_info

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("before", "measured", "horizon", "averaged", "after")


class CopiedStatisticsEMA(EMA):
    """BatchNorm statistics as the live model has them, never measured (the EMA as it was)."""

    @property
    def batchnorm_stale(self) -> bool:
        return False


class AveragedBuffersEMA(CopiedStatisticsEMA):
    """Float buffers (BatchNorm statistics) averaged with the weights' decay; integer ones copied."""

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        shadow, live = list(self.shadow.parameters()), [p.detach() for p in model.parameters()]
        for eb, mb in zip(self.shadow.buffers(), model.buffers()):
            if eb.is_floating_point():
                shadow.append(eb)
                live.append(mb)
            else:
                eb.copy_(mb)
        torch._foreach_lerp_(shadow, live, 1.0 - d)
        self.updates += 1


def run(cfg: ClassifierRunConfig, variant: str, train, test, run_dir: Path) -> dict:
    torch.manual_seed(cfg.train.seed)
    model = build_classifier(cfg.model).to(memory_format=torch.channels_last)
    data = ImageBatches(train, cfg.train.batch_size, cfg.train.seed, hflip=cfg.data.hflip)
    task = ClassifierTask(test, cfg.data.crop_pad, cfg.label_smoothing)
    trainer = Trainer(model, task, data, cfg.train, cfg.optim, run_dir, quiet=True)
    horizon = 10.0 if variant in ("before", "measured") else trainer.ema.horizon
    cls = {"before": CopiedStatisticsEMA, "horizon": CopiedStatisticsEMA,
           "averaged": AveragedBuffersEMA}.get(variant, EMA)
    trainer.ema = cls(trainer.model, cfg.train.ema_decay, horizon=horizon)
    start = time.perf_counter()
    summary = trainer.fit()
    raw = task.evaluate(trainer.model)
    return {"variant": variant, "seed": cfg.train.seed, "horizon": round(horizon, 3),
            "final_ema_decay": summary["ema_decay"],
            "ema_accuracy": summary["final_eval"]["accuracy"], "raw_accuracy": raw["accuracy"],
            "test_images": len(test), "steps": summary["steps"], "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "classifier" / "debug.toml"))
    p.add_argument("--data", help="data.source for every run (builtin, cifar10 or an image folder)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("overrides", nargs="*", help="section.key=value, applied to every run")
    args = p.parse_intermixed_args()
    overrides = list(args.overrides) + ([f'data.source="{args.data}"'] if args.data else [])
    base = load_config(ClassifierRunConfig, args.config, overrides)
    if base.train.ema_decay <= 0:
        raise SystemExit("error: the preset has no EMA (set train.ema_decay)")
    train, test = load_images(base.data.source, "train"), load_images(base.data.source, "test")
    test = test.subset(base.data.eval_images)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for variant in args.variants:
                cfg = load_config(ClassifierRunConfig, args.config, overrides + [f"train.seed={seed}"])
                cfg.model.num_classes = len(train.classes)
                results.append(run(cfg, variant, train, test, Path(tmp) / f"{variant}-{seed}"))
                print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"config": args.config, "overrides": overrides, "data": train.description,
                      "hardware": hardware_info(torch.device("cpu"))}))
    print("| variant | EMA accuracy (%) | raw accuracy (%) | final EMA decay | runs |")
    print("| --- | --- | --- | --- | --- |")
    for variant in args.variants:
        rows = [r for r in results if r["variant"] == variant]
        cell = lambda key: (f"{100 * statistics.mean(r[key] for r in rows):.2f}"
                            + (f" ± {100 * statistics.stdev(r[key] for r in rows):.2f}" if len(rows) > 1 else ""))
        print(f"| {variant} | {cell('ema_accuracy')} | {cell('raw_accuracy')} | {rows[0]['final_ema_decay']:.5f} "
              f"| {len(rows)} |")


if __name__ == "__main__":
    main()
