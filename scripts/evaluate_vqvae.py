"""Evaluate a trained VQ-VAE tokenizer on a data split: MSE, PSNR, codebook usage and perplexity,
tokens per image, re-encode stability, distinct codes after merging near-duplicates, and
optionally the reconstruction FID. Prints the numbers and writes them as JSON.

    python scripts/evaluate_vqvae.py --run runs/cifar10 --data cifar10
    python scripts/evaluate_vqvae.py --run runs/cifar10 --data cifar10 --fid_images 10000   # + rFID-10k
    python scripts/evaluate_vqvae.py --run runs/debug                    # the run's own data, test split

rFID is the FID of the reconstructions of N images of the split (a fixed random subset) against
those same N originals; the originals' Inception statistics are cached. It needs the optional
extra (pip install 'blueberry[fid]'). Like every FID it grows as N shrinks: compare equal N only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from shared.config import load_config
from shared.errors import UserError, run_main
from judge.image_eval import count_label
from shared.images import load_images
from shared.run import check_output, find_run_dir
from shared.trainer import pick_device
from vqvae.config import VQVAERunConfig
from vqvae.task import DUPLICATE_MERGE, reconstruction_fid, reconstruction_metrics
from vqvae.tokenizer import VQTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (its latest checkpoint) or a checkpoint folder inside one")
    p.add_argument("--data", help="data spec; default: the run's data.source")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, default=0, help="evaluate a fixed random subset of N images; 0 = all")
    p.add_argument("--fid_images", type=int, default=0,
                   help="also compute rFID on N images of the split (a fixed random subset); 0 = skip")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", help="JSON file to write; default: <run>/eval_<split>.json")
    args = p.parse_args()
    check_output(args.out, folder=False)  # before any work
    if args.limit < 0 or args.fid_images < 0 or args.batch_size <= 0:
        raise UserError("--limit and --fid_images must be >= 0 and --batch_size positive")
    if args.fid_images == 1:
        raise UserError("--fid_images needs at least 2 images")

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
    if args.fid_images:
        fid_set = data.subset(args.fid_images)  # the same random order as --limit: the first N of it
        n = len(fid_set.images)
        fid_label = f"rFID-{count_label(n)} vs the same {n:,} originals ({data.description})"
        print(f"{fid_label} ...", flush=True)
        fid = reconstruction_fid(tok.model, fid_set.images, f"{data.description}-{args.split}", args.batch_size)
        fid_result = {"rfid": round(fid, 3), "rfid_label": fid_label, "rfid_images": n}
    metrics = reconstruction_metrics(tok.model, images, args.batch_size, progress=True)
    if args.fid_images:
        metrics.update(fid_result)
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
    print(f"{'re-encode kept':<18}{metrics['reencode_kept']:.1%} of tokens (decode, round to 8 bits, encode again)")
    print(f"{'distinct codes':<18}{metrics['distinct_codes']:,} / {tok.codebook_size:,} after merging codes closer "
          f"than {DUPLICATE_MERGE}x the median nearest-neighbour distance")
    if args.fid_images:
        print(f"{'rFID':<18}{metrics['rfid']:.2f} ({metrics['rfid_label']})")
    print(f"{'written':<18}{out}")


if __name__ == "__main__":
    run_main(main)
