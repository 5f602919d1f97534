"""Train a VQ-VAE image tokenizer.

    python scripts/train_vqvae.py --config configs/vqvae/debug.toml
    python scripts/train_vqvae.py --config configs/vqvae/cifar10.toml --data cifar10
    python scripts/train_vqvae.py --config configs/vqvae/cifar10.toml --data /path/to/cifar10-jpeg --train_images 200000
    python scripts/train_vqvae.py --experiment_name cifar10 --resume      # continue an interrupted run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from shared import distributed
from shared.errors import ConfigError, run_main
from shared.images import ImageBatches, load_train_test
from shared.run import add_common_args, describe_training, report, resolve_run, save_config
from shared.trainer import Trainer, count_params
from vqvae.config import VQVAERunConfig
from vqvae.model import VQVAE
from vqvae.task import VQVAETask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--train_images", type=int, help="image budget (overrides train.budget), e.g. 1000000")
    args = p.parse_intermixed_args()  # overrides may sit before or after the flags
    cfg, run_dir, resume = resolve_run(args, VQVAERunConfig, {"data.source": args.data, "train.budget": args.train_images},
                                       package="vqvae", fixed=("gan.channels", "gan.layers"))  # the discriminator's shape

    s = cfg.model.image_size  # every split checked against the model before any work
    train, test = load_train_test(cfg.data.source, same_classes=False, shape=(3, s, s),  # a tokenizer needs no labels
                                  drop_empty_classes=cfg.data.drop_empty_classes)
    eval_images = test.subset(cfg.data.eval_images).images
    print(f"data: {train.description}; evaluating on {len(eval_images):,} images of the {test.description}")

    if cfg.gan.weight > 0 and distributed.current().active:  # the discriminator runs outside DDP's forward
        raise ConfigError("gan.weight > 0 trains in one process only for now: drop gan.weight or launch one process")
    torch.manual_seed(cfg.train.seed)
    model = VQVAE(cfg.model, cfg.discriminator())  # a discriminator only with gan.weight > 0
    h, w = model.grid_shape
    print(f"model: {count_params(model) / 1e6:.2f}M parameters, {s}x{s} images -> {h}x{w} = {h * w} tokens from "
          f"{cfg.model.codebook_size:,} codes of dimension {cfg.model.code_dim} "
          f"({cfg.model.codebook_update} codebook, {cfg.model.gradient} gradients{', l2-normalised' if cfg.model.l2_codes else ''})")
    if model.discriminator is not None:
        print(f"adversarial loss: PatchGAN discriminator ({count_params(model.discriminator) / 1e6:.2f}M parameters, in the "
              f"count above), hinge loss, weight {cfg.gan.weight}{' x adaptive' if cfg.gan.adaptive else ''} from step {cfg.gan.start}")

    data = ImageBatches(train, cfg.train.batch_size, cfg.train.seed, hflip=cfg.data.hflip)
    task = VQVAETask(eval_images, cfg.loss, sample_images=cfg.sample.images, batch_size=max(cfg.train.batch_size, 256),
                     gan=cfg.gan)
    trainer = Trainer(model, task, data, cfg.train, cfg.optim, run_dir)
    describe_training(trainer, run_dir, resume)
    summary = trainer.fit(resume, on_start=lambda: save_config(cfg, run_dir, resume))
    ev = summary["final_eval"]
    report(summary, run_dir, [
        ("reconstruction mse", f"{ev['mse']:.5f} (pixels in [0, 1])"),
        ("psnr", f"{ev['psnr']:.2f} dB"),
        ("codebook usage", f"{ev['codes_used']:,} / {cfg.model.codebook_size:,} codes ({ev['codebook_usage']:.1%}), "
                           f"perplexity {ev['perplexity']:.1f}"),
        ("tokens per image", f"{ev['tokens_per_image']} ({h}x{w})"),
        ("re-encode kept", f"{ev['reencode_kept']:.1%} of tokens; {ev['distinct_codes']:,} distinct codes after merging near-duplicates"),
        ("samples", str(run_dir / "samples")),
    ])


if __name__ == "__main__":
    run_main(main)
