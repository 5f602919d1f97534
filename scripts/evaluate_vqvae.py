"""Evaluate a trained VQ-VAE tokenizer on a data split: MSE, PSNR, codebook usage and perplexity,
tokens per image. Prints the numbers and writes them as JSON.

    python scripts/evaluate_vqvae.py --run runs/cifar10 --data cifar10
    python scripts/evaluate_vqvae.py --run runs/debug                    # the run's own data, test split
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


from shared.config import load_config
from shared.errors import UserError, run_main
from shared.images import load_images
from shared.run import check_output, find_run_dir
from shared.trainer import pick_device
from vqvae.config import VQVAERunConfig
from vqvae.task import reconstruction_metrics
from vqvae.tokenizer import VQTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (its latest checkpoint) or a checkpoint folder inside one")
    p.add_argument("--data", help="data spec; default: the run's data.source")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, default=0, help="evaluate a fixed random subset of N images; 0 = all")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", help="JSON file to write; default: <run>/eval_<split>.json")
    args = p.parse_args()
    check_output(args.out, folder=False)  # before any work
    if args.limit < 0 or args.batch_size <= 0:
        raise UserError("--limit must be >= 0 and --batch_size positive")

    run_dir = find_run_dir(args.run)
    tok = VQTokenizer.from_run(args.run, device=pick_device(args.device), batch_size=args.batch_size)
    spec = args.data or load_config(VQVAERunConfig, run_dir / "config.toml").data.source
    data = load_images(spec, args.split)
    images = data.subset(args.limit or 0).images
    if tuple(images.shape[1:]) != (3, tok.image_size, tok.image_size):
        raise UserError(f"{data.description} holds images of shape {list(images.shape[1:])}; "
                        f"the tokenizer expects [3, {tok.image_size}, {tok.image_size}]")
    print(f"evaluating {tok.source} (fingerprint {tok.fingerprint}) on {len(images):,} images of the {data.description}")
    t0 = time.perf_counter()
    metrics = reconstruction_metrics(tok.model, images, args.batch_size, progress=True)
    result = {**metrics, "codebook_size": tok.codebook_size, "grid_shape": list(tok.grid_shape), "images": len(images),
              "split": args.split, "data": data.description, "checkpoint": tok.source, "fingerprint": tok.fingerprint,
              "seconds": round(time.perf_counter() - t0, 2)}
    out = Path(args.out) if args.out else run_dir / f"eval_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'mse':<18}{metrics['mse']:.5f} (pixels in [0, 1])")
    print(f"{'psnr':<18}{metrics['psnr']:.2f} dB")
    print(f"{'codebook usage':<18}{metrics['codes_used']:,} / {tok.codebook_size:,} ({metrics['codebook_usage']:.1%})")
    print(f"{'perplexity':<18}{metrics['perplexity']:.1f}")
    print(f"{'tokens per image':<18}{metrics['tokens_per_image']} ({tok.grid_shape[0]}x{tok.grid_shape[1]})")
    print(f"{'written':<18}{out}")


if __name__ == "__main__":
    run_main(main)
