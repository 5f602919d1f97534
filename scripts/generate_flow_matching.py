"""Sample images from a trained flow-matching DiT.

    python scripts/generate_flow_matching.py --checkpoint runs/debug --class_grid --samples_per_class 8
    python scripts/generate_flow_matching.py --checkpoint runs/dit-s --num_samples 64 --class_label cat --cfg_scale 2
    python scripts/generate_flow_matching.py --checkpoint runs/dit-s --num_samples 10000 --save_images   # for evaluate_images.py

Writes PNG grids to --output_dir; with --save_images also one PNG per sample under
<output_dir>/images/<class>/, the folder layout scripts/evaluate_images.py reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from flow_matching.generate import add_solver_args, generate
from flow_matching.load import load_model, parse_class
from shared.errors import UserError, run_main
from shared.grid import class_grid
from shared.images import grid_shape, image_grid, save_png
from shared.run import check_output
from shared.trainer import pick_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder, or one step folder")
    p.add_argument("--num_samples", type=int, help="images to draw (default 64; not with --class_grid)")
    p.add_argument("--class_label", help="class name or index for every sample (default: classes in turn)")
    p.add_argument("--class_grid", action="store_true", help="one labelled row per class")
    p.add_argument("--samples_per_class", type=int, help="row length of --class_grid (default: the run's sample.per_class)")
    add_solver_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", help="where to write (default: <run>/generated)")
    p.add_argument("--save_images", action="store_true", help="also write every sample as its own PNG")
    p.add_argument("--no_ema", action="store_true", help="use the trained weights instead of their EMA")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    check_output(args.output_dir, folder=True)  # before any work
    if args.class_grid and (args.num_samples is not None or args.class_label is not None):
        raise UserError("--class_grid draws every class: do not combine it with --num_samples or --class_label")
    if args.samples_per_class is not None and not args.class_grid:
        raise UserError("--samples_per_class only applies with --class_grid")
    for name in ("num_samples", "samples_per_class", "num_steps", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive")

    device = pick_device(args.device)
    run = load_model(args.checkpoint, ema=not args.no_ema, device=device)
    model, cfg, classes, ckpt = run.model, run.cfg, run.classes, run.ckpt
    s = cfg.sample
    steps = args.num_steps or s.num_steps
    scale = s.cfg_scale if args.cfg_scale is None else args.cfg_scale
    sampler, grid = args.sampler or s.sampler, args.time_grid or s.time_grid
    if args.class_grid:
        per_class = args.samples_per_class or s.per_class
        labels = torch.arange(len(classes)).repeat_interleave(per_class)
    elif args.class_label is not None:
        labels = torch.full((args.num_samples or 64,), parse_class(args.class_label, classes))
    else:
        labels = torch.arange(args.num_samples or 64) % len(classes)
    out = Path(args.output_dir) if args.output_dir else ckpt.parent.parent / "generated"
    if args.save_images and (out / "images").is_dir() and any((out / "images").iterdir()):
        raise UserError(f"{out / 'images'} already holds images: choose another --output_dir (mixing runs would corrupt an evaluation)")
    print(f"sampling {len(labels):,} images from {ckpt} ({'EMA' if run.ema else 'trained'} weights) on {device}: "
          f"{sampler}, {steps} steps, {grid} time grid, guidance scale {scale}, seed {args.seed}")

    images = generate(model, labels, num_steps=steps, cfg_scale=scale, sampler=sampler, grid=grid,
                      seed=args.seed, batch_size=args.batch_size)
    if args.class_grid:
        path = out / "class_grid.png"
        save_png(class_grid(images, classes, per_class), path)
    else:
        path = out / "samples.png"
        save_png(image_grid(images, nrow=grid_shape(len(images))), path)
    print(f"wrote {path}")
    if args.save_images:
        for i, (img, y) in enumerate(tqdm(list(zip(images, labels.tolist())), desc="writing", unit="image",
                                          disable=len(images) < 1000)):
            save_png(img, out / "images" / classes[y] / f"{i:06d}.png")
        (out / "images" / "generation.json").write_text(json.dumps({
            "checkpoint": str(ckpt), "ema": run.ema, "num_steps": steps, "cfg_scale": scale,
            "sampler": sampler, "time_grid": grid, "seed": args.seed, "num_samples": len(images)}, indent=2) + "\n")
        print(f"wrote {len(images):,} images under {out / 'images'}")


if __name__ == "__main__":
    run_main(main)
