"""Train the CIFAR-10 classifier that scores generated images (judge/classifier.py).

    python scripts/train_classifier.py --config configs/classifier/airbench.toml --data cifar10
    python scripts/train_classifier.py --config configs/classifier/airbench.toml --data /path/to/cifar10-jpeg
    python scripts/train_classifier.py --config configs/classifier/resnet9.toml --data cifar10  # Page's ResNet-9
    python scripts/train_classifier.py --config configs/classifier/debug.toml       # CPU smoke run on the built-in set

Reports test accuracy; scripts/evaluate_images.py --classifier runs/<name> then uses it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from judge.classifier import ClassifierTask, build_classifier
from judge.config import ClassifierRunConfig
from shared.errors import UserError, run_main
from shared.images import ImageBatches, load_train_test, save_classes
from shared.run import add_common_args, describe_training, report, resolve_run, save_config
from shared.trainer import Trainer, count_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    args = p.parse_intermixed_args()  # overrides may sit before or after the flags
    cfg, run_dir, resume = resolve_run(args, ClassifierRunConfig, {"data.source": args.data}, package="classifier")

    train, test = load_train_test(cfg.data.source, drop_empty_classes=cfg.data.drop_empty_classes)
    test = test.subset(cfg.data.eval_images)
    print(f"data: {train.description}; evaluation on {len(test):,} test images")
    if cfg.model.num_classes not in (0, len(train.classes)):
        raise UserError(f"model.num_classes = {cfg.model.num_classes} but the data has {len(train.classes)} classes")
    cfg.model.num_classes = len(train.classes)

    torch.manual_seed(cfg.train.seed)
    model = build_classifier(cfg.model)
    model.fit_stem(train.images, cfg.train.seed)
    model = model.to(memory_format=torch.channels_last)
    name = {"resnet9": "ResNet-9", "airbench": "airbench net"}[cfg.model.arch]
    print(f"model: {name} width {cfg.model.width}, {count_params(model) / 1e6:.2f}M parameters")
    data = ImageBatches(train, cfg.train.batch_size, cfg.train.seed, hflip=cfg.data.hflip, alternate=cfg.data.alternate_flip)
    task = ClassifierTask(test, cfg.data.crop_pad, cfg.label_smoothing)
    trainer = Trainer(model, task, data, cfg.train, cfg.optim, run_dir)
    epochs = cfg.train.budget / len(train)
    describe_training(trainer, run_dir, resume, f", {epochs:.1f} epochs")
    summary = trainer.fit(resume, on_start=lambda: (save_config(cfg, run_dir, resume), save_classes(train.classes, run_dir)))
    ev = summary["final_eval"]
    report(summary, run_dir, [
        ("test accuracy" + (" (EMA)" if cfg.train.ema_decay else ""), f"{ev['accuracy']:.4f} on {len(test):,} images"),
        ("test loss", f"{ev['loss']:.4f}"),
    ])


if __name__ == "__main__":
    run_main(main)
