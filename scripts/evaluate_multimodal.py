"""Read real images with a multimodal run: zero-shot classification and captioning accuracy.

    python scripts/evaluate_multimodal.py --checkpoint runs/mm-cifar10 --data /path/to/cifar10-jpeg
    python scripts/evaluate_multimodal.py --checkpoint runs/mm-debug --limit 500 --output runs/mm-debug/read.json

Zero-shot: for each test image, every class's caption is scored given the image,
log p(caption <eos> | image) with the run's first caption template ("a photo of a cat"; with
--templates N the mean over the first N); the prediction is the best class.
Captioning: a greedy caption per image; it is right when it names the image's class and no other.
Both over the whole test split unless --limit (a fixed random subset).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from multimodal.captions import class_in_caption
from multimodal.data import encode_images
from multimodal.generate import caption_codes
from multimodal.load import load_run
from multimodal.sampling import caption_scores
from shared.errors import UserError, run_main
from shared.images import load_images
from shared.run import check_output, print_results
from shared.trainer import pick_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="multimodal run folder or checkpoint")
    p.add_argument("--data", help="image data whose test split is read (default: the run's data.source)")
    p.add_argument("--limit", type=int, default=0, help="score a fixed random subset of this many test images (0 = all)")
    p.add_argument("--templates", type=int, default=1, help="caption templates each class is scored with, averaged "
                   "(default 1: the first, 'a photo of ...'); more cost one pass each")
    p.add_argument("--skip_captions", action="store_true", help="zero-shot accuracy only")
    p.add_argument("--vqvae", help="where the run's VQ-VAE is now, if it moved")
    p.add_argument("--no_ema", action="store_true", help="the trained weights instead of their EMA")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="also write the results as JSON here")
    args = p.parse_args()
    check_output(args.output, folder=False)  # before any work
    if args.limit < 0 or args.batch_size <= 0 or args.templates <= 0:
        raise UserError("--limit must be >= 0, --batch_size and --templates positive")
    device = pick_device(args.device)
    run = load_run(args.checkpoint, device=device, ema=not args.no_ema, vqvae=args.vqvae)
    test = load_images(args.data or run.cfg.data.source, "test")
    if list(test.classes) != run.classes:
        raise UserError(f"the data's classes ({', '.join(test.classes)}) are not the run's ({', '.join(run.classes)})")
    tokens = encode_images(test, "test", run.vq).subset(args.limit)
    codes, labels = tokens.codes[:, 0], tokens.labels
    result = {"checkpoint": str(run.ckpt), "ema": run.ema, "data": test.description, "images": len(labels),
              "chance": round(1 / len(run.classes), 4), "templates_scored": min(args.templates, len(run.cfg.data.templates))}

    t0 = time.perf_counter()
    scores = torch.cat([caption_scores(run.model, run.layout, codes[i:i + args.batch_size], run.captions.ids, args.batch_size,
                                         args.templates)
                        for i in tqdm(range(0, len(codes), args.batch_size), desc="zero-shot", unit="batch", mininterval=1.0)])
    pred = scores.argmax(1)
    result["zero_shot_accuracy"] = round((pred == labels).float().mean().item(), 4)
    result["zero_shot_per_class"] = {c: round((pred[labels == k] == k).float().mean().item(), 4)
                                     for k, c in enumerate(run.classes) if (labels == k).any()}
    result["zero_shot_s"] = round(time.perf_counter() - t0, 1)

    if not args.skip_captions:
        t0 = time.perf_counter()
        texts = caption_codes(run, codes, args.batch_size)
        named = [class_in_caption(t, run.captions.names) for t in texts]
        result["caption_accuracy"] = round(sum(n == k for n, k in zip(named, labels.tolist())) / len(texts), 4)
        result["captions_naming_no_single_class"] = round(sum(n is None for n in named) / len(texts), 4)
        result["caption_examples"] = [f"{run.classes[k]}: {t}" for k, t in zip(labels[:8].tolist(), texts[:8])]
        result["caption_s"] = round(time.perf_counter() - t0, 1)

    print_results(result, args.output)


if __name__ == "__main__":
    run_main(main)
