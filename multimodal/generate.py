"""Batched generation for scripts: images for labels or prompts, captions for images; seeded, with
progress output, and the sampling flags the scripts share."""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from shared.images import to_uint8
from shared.run import finite_float, non_negative_int

from .config import check_sampling
from .load import MultimodalRun
from .sampling import clamp_top_k, sample_images, write_captions


def add_sampling_args(p: argparse.ArgumentParser, note: str = "", cfg_scale: bool = True) -> None:
    """--cfg_scale (unless the script defines it), --temperature, --top_k, --top_p; None means the
    run's sample.* setting."""
    if cfg_scale:
        p.add_argument("--cfg_scale", type=finite_float, help=f"guidance scale, 1 = none{note} (default: the run's sample.cfg_scale)")
    p.add_argument("--temperature", type=finite_float, help=f"0 = greedy{note} (default: the run's sample.temperature)")
    p.add_argument("--top_k", type=non_negative_int, help=f"keep the k most likely tokens, 0 = all{note} (default: the run's)")
    p.add_argument("--top_p", type=finite_float, help=f"nucleus sampling mass, 1 = off{note} (default: the run's)")


def sampling_settings(run: MultimodalRun, args: argparse.Namespace) -> dict:
    """The flags given, else the run's sample.* values; checked, with top-k clamped to the codebook."""
    s = run.cfg.sample
    pick = lambda flag, default: default if getattr(args, flag, None) is None else getattr(args, flag)
    out = {"cfg_scale": pick("cfg_scale", s.cfg_scale), "temperature": pick("temperature", s.temperature),
           "top_k": pick("top_k", s.top_k), "top_p": pick("top_p", s.top_p)}
    check_sampling(out["temperature"], out["top_k"], out["top_p"], out["cfg_scale"], where="--")
    out["top_k"], note = clamp_top_k(out["top_k"], run.vocab.codebook_size)
    if note:
        print(note)
    return out


def generate_images(run: MultimodalRun, prompts: list[list[int]], *, cfg_scale: float, temperature: float, top_k: int,
                    top_p: float, seed: int, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """uint8 images [N, 3, H, W] on the CPU for text-token prompts, decoded by the run's VQ-VAE.
    One generator seeded once: a given seed and batch size always give the same images."""
    device = run.model.tok_emb.weight.device
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc="sampling", unit="batch", disable=not progress or len(starts) < 2):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            codes = sample_images(run.model, run.layout, prompts[i:i + batch_size], cfg_scale=cfg_scale,
                                  temperature=temperature, top_k=top_k, top_p=top_p, generator=g)
        out.append(to_uint8(run.vq.decode(codes.to(run.vq.device)).float()).cpu())
    return torch.cat(out)


def class_prompts(run: MultimodalRun, labels: torch.Tensor, template: int = 0) -> list[list[int]]:
    """The caption of each label's class through one template ("a photo of a cat")."""
    return [run.captions.ids[k][template] for k in labels.tolist()]


def caption_codes(run: MultimodalRun, codes: torch.Tensor, batch_size: int = 256, progress: bool = True,
                  **sampling) -> list[str]:
    """A caption (text) for each grid of codes [N, h, w]; greedy unless sampling settings are given."""
    out = []
    starts = range(0, len(codes), batch_size)
    for i in tqdm(starts, desc="captioning", unit="batch", disable=not progress or len(starts) < 2):
        ids = write_captions(run.model, run.layout, codes[i:i + batch_size], banned=run.banned_text, **sampling)
        out += [run.text.decode(x).strip() for x in ids]
    return out
