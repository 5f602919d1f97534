"""FID and class accuracy of generated images, from a flow-matching checkpoint or an image folder.

    python scripts/evaluate_images.py --checkpoint runs/dit-s --num_samples 10000 --classifier runs/resnet9
    python scripts/evaluate_images.py --images runs/dit-s/generated/images --reference cifar10 --classifier runs/resnet9

FID is against the Inception statistics of --reference (default: the run's training data),
train split, cached after the first use; it needs the optional extra (pip install 'blueberry[fid]').
FID depends on the number of samples: FID-10k and FID-50k are not comparable, so N is reported.
Class accuracy is the fraction of images that the classifier (scripts/train_classifier.py)
assigns to the class they were generated for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flow_matching.generate import add_solver_args, generate
from flow_matching.load import load_model
from shared.classifier import class_accuracy, load_classifier
from shared.errors import UserError, run_main
from shared.fid import InceptionFeatures, feature_stats, fid_from_stats, reference_stats
from shared.images import load_images
from shared.trainer import pick_device

SAMPLING_FLAGS = ("num_samples", "num_steps", "cfg_scale", "sampler", "time_grid", "seed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="flow-matching run or checkpoint: generate the images to evaluate")
    src.add_argument("--images", help="folder of images in <class>/*.png layout (generate_flow_matching.py --save_images)")
    p.add_argument("--reference", help="data spec whose train split is the FID reference (default: the run's data)")
    p.add_argument("--classifier", help="classifier run folder (scripts/train_classifier.py) for class accuracy")
    p.add_argument("--skip_fid", action="store_true", help="class accuracy only")
    p.add_argument("--num_samples", type=int, help="images to generate (checkpoint only; default 10000)")
    add_solver_args(p, note=", checkpoint only")
    p.add_argument("--seed", type=int, help="checkpoint only; default 0")
    p.add_argument("--no_ema", action="store_true", help="checkpoint only: the trained weights instead of the EMA")
    p.add_argument("--batch_size", type=int, default=256, help="generation batch (checkpoint only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="also write the results as JSON here")
    args = p.parse_args()
    if args.skip_fid and not args.classifier:
        raise UserError("nothing to compute: --skip_fid without --classifier")
    if args.images and (args.no_ema or any(getattr(args, f) is not None for f in SAMPLING_FLAGS)):
        raise UserError("sampling flags (--num_samples, --num_steps, --cfg_scale, --sampler, --time_grid, --seed, --no_ema) need --checkpoint")
    device = pick_device(args.device)
    result: dict = {}

    if args.checkpoint:
        run = load_model(args.checkpoint, ema=not args.no_ema, device=device)
        model, cfg, classes, ckpt = run.model, run.cfg, run.classes, run.ckpt
        s = cfg.sample
        n = 10_000 if args.num_samples is None else args.num_samples
        if n <= 0 or (args.num_steps is not None and args.num_steps <= 0) or args.batch_size <= 0:
            raise UserError("--num_samples, --num_steps and --batch_size must be positive")
        settings = {"checkpoint": str(ckpt), "ema": run.ema, "num_steps": s.num_steps if args.num_steps is None else args.num_steps,
                    "cfg_scale": s.cfg_scale if args.cfg_scale is None else args.cfg_scale,
                    "sampler": args.sampler or s.sampler, "time_grid": args.time_grid or s.time_grid,
                    "seed": 0 if args.seed is None else args.seed}
        labels = torch.arange(n) % len(classes)  # balanced classes, like the reference set
        print(f"generating {n:,} images: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
        images = generate(model, labels, num_steps=settings["num_steps"], cfg_scale=settings["cfg_scale"],
                          sampler=settings["sampler"], grid=settings["time_grid"], seed=settings["seed"],
                          batch_size=args.batch_size)
        result.update(settings)
        reference = args.reference or cfg.data.source
    else:
        folder = load_images(args.images, "all")
        images, labels, classes = folder.images, folder.labels, list(folder.classes)
        result["images"] = str(args.images)
        if not args.skip_fid and not args.reference:
            raise UserError("--images needs --reference (the data spec to compare against, e.g. cifar10)")
        reference = args.reference
    result["num_samples"] = len(images)

    if not args.skip_fid:
        ref = load_images(reference, "train")
        if ref.images.shape[1:] != images.shape[1:]:
            raise UserError(f"reference images are {tuple(ref.images.shape[1:])}, generated ones {tuple(images.shape[1:])}")
        extractor = InceptionFeatures(device)
        ref_stats = reference_stats(ref.images, ref.description, extractor)
        print(f"Inception features of {len(images):,} images ...", flush=True)
        fid = fid_from_stats(feature_stats(extractor(images)), ref_stats)
        result.update({"fid": round(fid, 3), "fid_reference": ref.description, "fid_reference_n": int(ref_stats["n"])})

    if args.classifier:
        clf, clf_classes = load_classifier(args.classifier, device)
        missing = [c for c in classes if c not in clf_classes]
        if missing:
            raise UserError(f"the classifier does not know the classes {missing[:3]} (it has {', '.join(clf_classes)})")
        mapped = torch.tensor([clf_classes.index(c) for c in classes])[labels]
        result.update({"class_accuracy": round(class_accuracy(clf, images, mapped), 4), "classifier": str(args.classifier)})

    for k, v in result.items():
        print(f"{k:<22}{v}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    run_main(main)
