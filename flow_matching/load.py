"""Rebuild a trained DiT2D from a run folder or checkpoint for sampling and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from shared.checkpoint import load_weights, resolve_checkpoint
from shared.errors import UserError
from shared.images import load_classes
from shared.run import find_run_dir, load_run_config

from .config import FlowMatchingRunConfig
from .dit import DiT2D


@dataclass
class Loaded:
    model: DiT2D  # in eval mode, gradients off
    cfg: FlowMatchingRunConfig
    classes: list[str]
    ckpt: Path
    ema: bool  # whether the EMA weights were loaded


def load_model(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> Loaded:
    """The model of a run folder or checkpoint; the EMA weights when asked and the run kept them."""
    ckpt = resolve_checkpoint(path)
    run_dir = find_run_dir(ckpt)
    cfg = load_run_config(run_dir, FlowMatchingRunConfig, "flow_matching")
    classes = load_classes(run_dir, "scripts/train_flow_matching.py")
    model = DiT2D(cfg.model)
    ema = ema and cfg.train.ema_decay > 0
    load_weights(model, ckpt, ema=ema)
    return Loaded(model.to(device).eval().requires_grad_(False), cfg, classes, ckpt, ema)


def parse_class(value: str, classes: list[str]) -> int:
    """A class given by index or by name."""
    if value in classes:
        return classes.index(value)
    try:
        k = int(value)
    except ValueError:
        raise UserError(f"unknown class {value!r}; classes: {', '.join(classes)}") from None
    if not 0 <= k < len(classes):
        raise UserError(f"class index {k} out of range 0..{len(classes) - 1}")
    return k
