"""Tokenise a whole image dataset once with a trained VQ-VAE: one file per split holding uint16
token grids, labels, class names and the tokenizer's identity (so a different tokenizer is
refused when the file is read).

    python scripts/encode_vqvae.py --run runs/cifar10 --data cifar10 --out data_cache/cifar10-vq
    -> data_cache/cifar10-vq/train.safetensors, data_cache/cifar10-vq/test.safetensors
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from shared.config import load_config
from shared.errors import UserError, run_main
from shared.images import load_images
from shared.run import check_output, find_run_dir
from shared.trainer import pick_device
from vqvae.config import VQVAERunConfig
from vqvae.token_file import save_tokens
from vqvae.tokenizer import VQTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (its latest checkpoint) or a checkpoint folder inside one")
    p.add_argument("--data", help="data spec; default: the run's data.source")
    p.add_argument("--out", required=True, help="folder for <split>.safetensors")
    p.add_argument("--splits", default="train,test", help="comma-separated splits to encode")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args()
    check_output(args.out, folder=True)  # before any work
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits or any(s not in ("train", "test") for s in splits):
        raise UserError(f"--splits must list train and/or test, got {args.splits!r}")
    if args.batch_size <= 0:
        raise UserError("--batch_size must be positive")

    tok = VQTokenizer.from_run(args.run, device=pick_device(args.device), batch_size=args.batch_size)
    spec = args.data or load_config(VQVAERunConfig, find_run_dir(args.run) / "config.toml").data.source
    print(f"tokenizer: {tok.source} (fingerprint {tok.fingerprint}), {tok.codebook_size:,} codes, "
          f"{tok.grid_shape[0]}x{tok.grid_shape[1]} tokens per image")
    for split in splits:
        data = load_images(spec, split)
        t0 = time.perf_counter()
        chunks = []
        for i in tqdm(range(0, len(data), args.batch_size), desc=f"encode {split}", unit="batch", mininterval=1.0):
            chunks.append(tok.encode(data.images[i:i + args.batch_size]))
        tokens = torch.cat(chunks)
        path = save_tokens(Path(args.out) / f"{split}.safetensors", tokens, data.labels, data.classes,
                           tok.identity(), data.description)
        used = int(torch.unique(tokens).numel())
        print(f"{split}: {len(tokens):,} images -> {path} ({path.stat().st_size / 2**20:.1f} MiB, "
              f"{used:,} distinct codes, {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    run_main(main)
