"""Batched sampling for scripts: many images for given labels, seeded, with progress output."""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from shared.images import to_uint8
from shared.run import finite_float

from .dit import DiT2D
from .sampling import SAMPLERS, TIME_GRIDS, sample


def add_solver_args(p: argparse.ArgumentParser, note: str = "") -> None:
    """--num_steps, --cfg_scale, --sampler, --time_grid; None means the run's sample.* setting."""
    p.add_argument("--num_steps", type=int, help=f"solver steps{note} (default: the run's sample.num_steps)")
    p.add_argument("--cfg_scale", type=finite_float, help=f"guidance scale, 1 = no guidance{note} (default: the run's sample.cfg_scale)")
    p.add_argument("--sampler", choices=SAMPLERS, help=f"ODE solver{note} (default: the run's sample.sampler)")
    p.add_argument("--time_grid", choices=TIME_GRIDS, help=f"solver time grid{note} (default: the run's sample.time_grid)")


def generate(model: DiT2D, labels: torch.Tensor, *, num_steps: int, cfg_scale: float, sampler: str, grid: str,
             seed: int, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """uint8 images [N, 3, H, W] on the CPU. The noise comes from one generator seeded once, so
    a given seed and batch size always give the same images."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch", disable=not progress or len(labels) <= batch_size):
        y = labels[i:i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = sample(model, y, num_steps=num_steps, cfg_scale=cfg_scale, sampler=sampler, grid=grid, generator=g)
        out.append(to_uint8(x.float()).cpu())
    return torch.cat(out)
