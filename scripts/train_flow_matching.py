"""Train a class-conditional flow-matching DiT on 32x32 images.

    python scripts/train_flow_matching.py --config configs/flow_matching/debug.toml
    python scripts/train_flow_matching.py --config configs/flow_matching/dit-s.toml --data cifar10
    python scripts/train_flow_matching.py --config configs/flow_matching/dit-s.toml --data /path/to/cifar10-jpeg
    python scripts/train_flow_matching.py --experiment_name dit-s --resume        # continue an interrupted run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from flow_matching.config import FlowMatchingRunConfig
from flow_matching.dit import DiT2D
from flow_matching.task import FlowMatchingTask
from shared.errors import UserError, run_main
from shared.images import ImageBatches, load_train_test, save_classes
from shared.run import add_common_args, describe_training, report, resolve_run, save_config
from shared.trainer import Trainer, count_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--train_images", type=int, help="image budget (overrides train.budget), e.g. 5000000")
    args = p.parse_intermixed_args()  # overrides may sit before or after the flags
    cfg, run_dir, resume = resolve_run(args, FlowMatchingRunConfig, {
        "data.source": args.data, "train.budget": args.train_images}, package="flow_matching")

    shape = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)  # both splits checked before any work
    train, test = load_train_test(cfg.data.source, shape=shape, drop_empty_classes=cfg.data.drop_empty_classes)
    print(f"data: {train.description}; evaluation on {min(cfg.data.eval_images or len(test), len(test)):,} of {test.description}")
    if cfg.model.num_classes not in (0, len(train.classes)):
        raise UserError(f"model.num_classes = {cfg.model.num_classes} but the data has {len(train.classes)} classes")
    cfg.model.num_classes = len(train.classes)

    torch.manual_seed(cfg.train.seed)
    model = DiT2D(cfg.model)
    print(f"model: DiT2D {count_params(model) / 1e6:.1f}M parameters (hidden {cfg.model.hidden}, depth {cfg.model.depth}, "
          f"{cfg.model.n_heads} heads, patch {cfg.model.patch}: {model.grid ** 2} tokens, {cfg.model.num_classes} classes + null)")

    data = ImageBatches(train, cfg.train.batch_size, cfg.train.seed, hflip=cfg.data.hflip)
    task = FlowMatchingTask(cfg.flow, cfg.sample, test.subset(cfg.data.eval_images), train.classes,
                            eval_batch_size=cfg.train.batch_size)
    trainer = Trainer(model, task, data, cfg.train, cfg.optim, run_dir)
    describe_training(trainer, run_dir, resume, f", time sampling {cfg.flow.time_sampling}, label dropout "
                      f"{cfg.flow.label_dropout}, EMA {cfg.train.ema_decay or 'off'}")
    summary = trainer.fit(resume, on_start=lambda: (save_config(cfg, run_dir, resume), save_classes(train.classes, run_dir)))
    samples = sorted((run_dir / "samples").glob("*.png"))
    report(summary, run_dir, [
        ("eval loss" + (" (EMA)" if cfg.train.ema_decay else ""), f"{summary['final_eval']['loss']:.4f}"),
        ("class grid", str(samples[-1]) if samples else "none"),
    ])


if __name__ == "__main__":
    run_main(main)
