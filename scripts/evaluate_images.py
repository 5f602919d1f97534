"""FID and class accuracy of generated images, from any image generator of the project (a
flow-matching or a multimodal run) or from an image folder.

    python scripts/evaluate_images.py --checkpoint runs/dit-s --num_samples 10000 --classifier runs/resnet9
    python scripts/evaluate_images.py --checkpoint runs/mm-cifar10 --num_samples 1000 --cfg_scale 3 --classifier runs/resnet9 --skip_fid
    python scripts/evaluate_images.py --images runs/dit-s/generated/images --reference cifar10 --classifier runs/resnet9

FID is against the Inception statistics of --reference (default: the run's training data),
train split, cached after the first use; it needs the optional extra (pip install 'blueberry[fid]').
Every FID is labelled "FID-<N> vs <reference>": FID depends on N, so FID-10k and FID-50k are not
comparable. Class accuracy is the fraction of images that the classifier
(scripts/train_classifier.py) assigns to the class they were generated for; generators draw the
classes in turn, balanced like the reference set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from flow_matching.generate import add_solver_args, generate as generate_flow
from flow_matching.load import load_model
from multimodal.generate import add_sampling_args, class_prompts, generate_images, sampling_settings
from multimodal.load import is_multimodal_run, load_run
from shared.errors import UserError, run_main
from judge.image_eval import score_images
from shared.images import load_images
from shared.run import check_output, print_results
from shared.trainer import pick_device

FLOW_FLAGS = ("num_steps", "sampler", "time_grid")
MULTIMODAL_FLAGS = ("temperature", "top_k", "top_p", "vqvae")
SAMPLING_FLAGS = ("num_samples", "cfg_scale", "seed", *FLOW_FLAGS, *MULTIMODAL_FLAGS)


def _refuse(args, flags: tuple[str, ...], why: str) -> None:
    given = [f"--{f}" for f in flags if getattr(args, f) is not None]
    if given:
        raise UserError(f"{', '.join(given)} {why}")


def flow_images(args, device) -> tuple[torch.Tensor, torch.Tensor, list[str], dict, str]:
    _refuse(args, MULTIMODAL_FLAGS, "apply to multimodal runs; this is a flow-matching run")
    run = load_model(args.checkpoint, ema=not args.no_ema, device=device)
    s = run.cfg.sample
    settings = {"generator": "flow matching", "checkpoint": str(run.ckpt), "ema": run.ema,
                "num_steps": s.num_steps if args.num_steps is None else args.num_steps,
                "cfg_scale": s.cfg_scale if args.cfg_scale is None else args.cfg_scale,
                "sampler": args.sampler or s.sampler, "time_grid": args.time_grid or s.time_grid, "seed": args.seed or 0}
    if settings["num_steps"] <= 0:
        raise UserError("--num_steps must be positive")
    labels = torch.arange(args.num_samples) % len(run.classes)
    print(f"generating {len(labels):,} images: " + ", ".join(f"{k} {v}" for k, v in settings.items()), flush=True)
    images = generate_flow(run.model, labels, num_steps=settings["num_steps"], cfg_scale=settings["cfg_scale"],
                           sampler=settings["sampler"], grid=settings["time_grid"], seed=settings["seed"],
                           batch_size=args.batch_size)
    return images, labels, run.classes, settings, run.cfg.data.source


def multimodal_images(args, device) -> tuple[torch.Tensor, torch.Tensor, list[str], dict, str]:
    _refuse(args, FLOW_FLAGS, "apply to flow-matching runs; this is a multimodal run")
    run = load_run(args.checkpoint, device=device, ema=not args.no_ema, vqvae=args.vqvae)
    sampling = sampling_settings(run, args)
    settings = {"generator": "multimodal", "checkpoint": str(run.ckpt), "ema": run.ema, **sampling,
                "prompt": "template 0: " + run.cfg.data.templates[0], "seed": args.seed or 0}
    labels = torch.arange(args.num_samples) % len(run.classes)
    print(f"generating {len(labels):,} images: " + ", ".join(f"{k} {v}" for k, v in settings.items()), flush=True)
    images = generate_images(run, class_prompts(run, labels), seed=settings["seed"], batch_size=args.batch_size, **sampling)
    return images, labels, run.classes, settings, run.cfg.data.source


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="flow-matching or multimodal run or checkpoint: generate the images to evaluate")
    src.add_argument("--images", help="folder of images in <class>/*.png layout (generate_*.py --save_images)")
    p.add_argument("--reference", help="data spec whose train split is the FID reference (default: the run's data)")
    p.add_argument("--classifier", help="classifier run folder (scripts/train_classifier.py) for class accuracy")
    p.add_argument("--skip_fid", action="store_true", help="class accuracy only")
    p.add_argument("--num_samples", type=int, help="images to generate (checkpoint only; default 10000)")
    add_solver_args(p, note=", checkpoint only")
    add_sampling_args(p, note=", multimodal only", cfg_scale=False)
    p.add_argument("--vqvae", help="multimodal only: where the run's VQ-VAE is now, if it moved")
    p.add_argument("--seed", type=int, help="checkpoint only; default 0")
    p.add_argument("--no_ema", action="store_true", help="checkpoint only: the trained weights instead of the EMA")
    p.add_argument("--batch_size", type=int, default=256, help="generation batch (checkpoint only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="also write the results as JSON here")
    args = p.parse_args()
    check_output(args.output, folder=False)  # before any work
    if args.skip_fid and not args.classifier:
        raise UserError("nothing to compute: --skip_fid without --classifier")
    if args.images and (args.no_ema or any(getattr(args, f) is not None for f in SAMPLING_FLAGS)):
        raise UserError("sampling flags (--num_samples, --cfg_scale, --seed, --no_ema and the solver or token-sampling "
                        "flags) need --checkpoint")
    if args.batch_size <= 0 or (args.num_samples is not None and args.num_samples <= 0):
        raise UserError("--num_samples and --batch_size must be positive")
    device = pick_device(args.device)

    if args.checkpoint:
        args.num_samples = args.num_samples or 10_000
        make = multimodal_images if is_multimodal_run(args.checkpoint) else flow_images
        images, labels, classes, result, data_source = make(args, device)
        reference = args.reference or data_source
    else:
        folder = load_images(args.images, "all")
        images, labels, classes = folder.images, folder.labels, list(folder.classes)
        result = {"images": str(args.images)}
        if not args.skip_fid and not args.reference:
            raise UserError("--images needs --reference (the data spec to compare against, e.g. cifar10)")
        reference = args.reference
    result.update(score_images(images, labels, classes, reference=None if args.skip_fid else reference,
                               classifier=args.classifier, device=device))

    print_results(result, args.output)


if __name__ == "__main__":
    run_main(main)
