"""Generate images from text, or captions for images, with a trained multimodal run.

    python scripts/generate_multimodal.py --checkpoint runs/mm-debug --prompt "a photo of a disc" --num_samples 16
    python scripts/generate_multimodal.py --checkpoint runs/mm-cifar10 --class_grid --samples_per_class 8 --cfg_scale 3
    python scripts/generate_multimodal.py --checkpoint runs/mm-cifar10 --caption cat.png plane.jpg

Images go to --output_dir (default <run>/generated) as a PNG grid, and with --save_images one PNG
per sample under <output_dir>/images/<class>/ (the layout scripts/evaluate_images.py reads).
Captions are printed, one line per image, and written to <output_dir>/captions.txt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from multimodal.config import check_sampling
from multimodal.generate import add_sampling_args, caption_codes, class_prompts, generate_images, sampling_settings
from multimodal.load import load_run
from shared.errors import UserError, run_main
from shared.grid import class_grid
from shared.images import grid_shape, image_grid, read_image_files, save_png
from shared.run import check_output
from shared.trainer import pick_device


def caption_settings(args: argparse.Namespace) -> dict:
    """Captions are greedy unless --temperature > 0; guidance is for images only."""
    if args.cfg_scale is not None:
        raise UserError("--cfg_scale guides image generation; captions are written without guidance")
    out = {"temperature": 0.0 if args.temperature is None else args.temperature,
           "top_k": args.top_k or 0, "top_p": 1.0 if args.top_p is None else args.top_p}
    check_sampling(out["temperature"], out["top_k"], out["top_p"], 1.0, where="--")
    if out["temperature"] == 0 and (args.top_k is not None or args.top_p is not None or args.seed is not None):
        raise UserError("captions are greedy by default: --top_k, --top_p and --seed need --temperature above 0")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder, or one step folder")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="text to draw, e.g. \"a photo of a cat\" (default: the classes in turn)")
    what.add_argument("--class_grid", action="store_true", help="one labelled row per class")
    what.add_argument("--caption", nargs="+", metavar="IMAGE", help="write a caption for each image")
    p.add_argument("--num_samples", type=int, help="images to draw (default 16; not with --class_grid)")
    p.add_argument("--samples_per_class", type=int, help="row length of --class_grid (default: the run's sample.per_class)")
    add_sampling_args(p)
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")
    p.add_argument("--output_dir", help="where to write (default: <run>/generated)")
    p.add_argument("--save_images", action="store_true", help="also write every sample as its own PNG")
    p.add_argument("--vqvae", help="where the run's VQ-VAE is now, if it moved (it must be the same one)")
    p.add_argument("--no_ema", action="store_true", help="use the trained weights instead of their EMA")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    check_output(args.output_dir, folder=True)  # before any work
    if args.class_grid and args.num_samples is not None:
        raise UserError("--class_grid draws every class: do not combine it with --num_samples")
    if args.samples_per_class is not None and not args.class_grid:
        raise UserError("--samples_per_class only applies with --class_grid")
    if args.caption and (args.num_samples is not None or args.save_images):
        raise UserError("--caption writes text: --num_samples and --save_images apply to image generation")
    for name in ("num_samples", "samples_per_class", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive")

    device = pick_device(args.device)
    run = load_run(args.checkpoint, device=device, ema=not args.no_ema, vqvae=args.vqvae)
    out = Path(args.output_dir) if args.output_dir else run.ckpt.parent.parent / "generated"
    weights = "EMA" if run.ema else "trained"

    if args.caption:
        sampling = caption_settings(args)
        images = read_image_files(args.caption, run.vq.image_size)
        codes = run.vq.encode(images.to(run.vq.device))
        g = torch.Generator(device=device).manual_seed(args.seed or 0)
        texts = caption_codes(run, codes, args.batch_size, generator=g, **sampling)
        lines = [f"{path}: {text}" for path, text in zip(args.caption, texts)]
        how = "greedy" if sampling["temperature"] == 0 else ", ".join(f"{k} {v}" for k, v in sampling.items()) + f", seed {args.seed or 0}"
        print(f"captions from {run.ckpt} ({weights} weights), {how}")
        print("\n".join(lines))
        out.mkdir(parents=True, exist_ok=True)
        (out / "captions.txt").write_text("\n".join(lines) + "\n")
        print(f"wrote {out / 'captions.txt'}")
        return

    settings = sampling_settings(run, args)
    args.seed = args.seed or 0
    if args.class_grid:
        per_class = args.samples_per_class or run.cfg.sample.per_class
        labels = torch.arange(len(run.classes)).repeat_interleave(per_class)
        prompts = class_prompts(run, labels)
    elif args.prompt is not None:
        labels = None
        prompts = [run.encode_prompt(args.prompt)] * (args.num_samples or 16)
    else:
        labels = torch.arange(args.num_samples or 16) % len(run.classes)
        prompts = class_prompts(run, labels)
    if args.save_images and (out / "images").is_dir() and any((out / "images").iterdir()):
        raise UserError(f"{out / 'images'} already holds images: choose another --output_dir (mixing runs would corrupt an evaluation)")
    print(f"sampling {len(prompts):,} images from {run.ckpt} ({weights} weights) on {device}: "
          + ", ".join(f"{k} {v}" for k, v in settings.items()) + f", seed {args.seed}")
    images = generate_images(run, prompts, seed=args.seed, batch_size=args.batch_size, **settings)
    if args.class_grid:
        path = out / "class_grid.png"
        save_png(class_grid(images, [run.captions.texts[k][0] for k in range(len(run.classes))], per_class), path)
    else:
        path = out / "samples.png"
        save_png(image_grid(images, nrow=grid_shape(len(images))), path)
    print(f"wrote {path}")
    if args.save_images:
        for i, img in enumerate(images):
            folder = run.classes[int(labels[i])] if labels is not None else "prompt"
            save_png(img, out / "images" / folder / f"{i:06d}.png")
        (out / "images" / "generation.json").write_text(json.dumps({
            "checkpoint": str(run.ckpt), "ema": run.ema, **settings, "seed": args.seed, "num_samples": len(images),
            "prompt": args.prompt or f"template 0: {run.cfg.data.templates[0]}"}, indent=2) + "\n")
        print(f"wrote {len(images):,} images under {out / 'images'}")


if __name__ == "__main__":
    run_main(main)
