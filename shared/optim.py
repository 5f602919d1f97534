"""The Muon + AdamW split and learning-rate schedules.

Muon (shared/muon.py: Nesterov momentum, Newton-Schulz orthogonalisation, shape-aware step size,
decoupled weight decay) trains the hidden 2-D weight matrices; AdamW (or SGD) trains everything else:
embeddings, output heads, norms, gains, biases, and anything not 2-D (convolution filters too,
unless `muon_conv` is set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import ConfigError
from .muon import STACKED, Muon


@dataclass
class OptimConfig:
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    adam_lr: float = 3e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    schedule: Literal["constant", "cosine", "wsd"] = "wsd"
    warmup_steps: int = 0
    cooldown_frac: float = 0.2  # wsd: final fraction of steps that decays to min_lr_ratio
    min_lr_ratio: float = 0.0
    muon_conv: bool = False  # also train conv filters with Muon, flattened to [out, in*kh*kw]
    matrix_optimizer: Literal["muon", "adamw"] = "muon"  # "adamw": one AdamW at adam_lr trains everything (a baseline)
    # what trains the rest: AdamW, or SGD with Nesterov momentum (airbench's CIFAR-10 recipe) at
    # adam_lr, whose weight decay then shrinks every group by adam_lr * adam_weight_decay per step
    other_optimizer: Literal["adamw", "sgd"] = "adamw"
    sgd_momentum: float = 0.0  # that SGD's Nesterov momentum, in (0, 1) (airbench: 0.85); only with "sgd"
    head_lr: float = 0.0  # learning rate of output heads (modules named *head) in that optimiser; 0: adam_lr

    def __post_init__(self):
        # written so that NaN fails every check (NaN compares false)
        if not 0.0 <= self.cooldown_frac <= 1.0:
            raise ConfigError(f"optim.cooldown_frac must be in [0, 1], got {self.cooldown_frac}")
        if not (self.warmup_steps >= 0 and 0 < self.muon_lr < math.inf and 0 < self.adam_lr < math.inf):
            raise ConfigError("optim: learning rates must be positive and finite, warmup_steps non-negative")
        if not (0.0 <= self.min_lr_ratio <= 1.0 and 0.0 <= self.grad_clip < math.inf):
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1] and optim.grad_clip >= 0 (0 = off), got "
                              f"{self.min_lr_ratio} and {self.grad_clip}")
        for name in ("muon_momentum", "adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if not (0.0 <= self.muon_weight_decay < math.inf and 0.0 <= self.adam_weight_decay < math.inf):
            raise ConfigError("optim: weight decays must be non-negative and finite")
        if self.other_optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optim.other_optimizer must be \"adamw\" or \"sgd\", got {self.other_optimizer!r}")
        sgd = self.other_optimizer == "sgd"
        if not (0.0 < self.sgd_momentum < 1.0 if sgd else self.sgd_momentum == 0.0):
            raise ConfigError(f"optim.sgd_momentum must be in (0, 1) with other_optimizer = \"sgd\" and unset "
                              f"otherwise, got {self.sgd_momentum} with {self.other_optimizer!r}")
        if not 0.0 <= self.head_lr < math.inf:
            raise ConfigError(f"optim.head_lr must be >= 0 (0 = adam_lr), got {self.head_lr}")


def split_params(model: nn.Module, adam_modules: tuple[type[nn.Module], ...] = (nn.Embedding,),
                 adam_names: tuple[str, ...] = ("lm_head", "head", "router"), conv: bool = False) -> tuple[list, list]:
    """(muon, adam) parameter lists; every trainable parameter lands in exactly one.

    A 2-D weight goes to Muon unless it belongs to an embedding (any module of `adam_modules`)
    or to a module whose name ends with one of `adam_names` (output heads, MoE routers), and so do
    stacked expert matrices [E, out, in]; with `conv`, so do
    the filters of nn.Conv2d layers. Tied weights are seen once, through the module that
    registered them first.
    """
    muon, adam, seen = [], [], set()
    for mod_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_head = mod_name.split(".")[-1] in adam_names
            matrix = p.ndim == 2 or (conv and p.ndim == 4 and isinstance(module, nn.Conv2d)) or getattr(p, STACKED, False)
            if matrix and not isinstance(module, adam_modules) and not is_head:
                muon.append(p)
            else:
                adam.append(p)
    return muon, adam


def build_optimizers(model: nn.Module, cfg: OptimConfig, **split_kwargs) -> list[torch.optim.Optimizer]:
    muon_params, adam_params = split_params(model, conv=cfg.muon_conv, **split_kwargs)
    if cfg.matrix_optimizer == "adamw":
        muon_params, adam_params = [], muon_params + adam_params
    # fused kernels on every device: the single-tensor and foreach paths read each parameter's step
    # count on the host (one sync per parameter per step); the fused ones keep it on the device
    fused = {"fused": True}
    opts: list[torch.optim.Optimizer] = []
    if muon_params:
        opts.append(Muon(muon_params, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True,
                         weight_decay=cfg.muon_weight_decay))
    if adam_params:
        groups = [dict(params=adam_params, lr=cfg.adam_lr)]
        if cfg.head_lr:  # a second group only when asked, so that older checkpoints' optimiser states still load
            heads = {id(p) for name, m in model.named_modules() if name.endswith("head") for p in m.parameters()}
            groups = [g for g in (dict(params=[p for p in adam_params if id(p) not in heads], lr=cfg.adam_lr),
                                  dict(params=[p for p in adam_params if id(p) in heads], lr=cfg.head_lr)) if g["params"]]
        if cfg.other_optimizer == "sgd":
            for g in groups:  # torch's decay is lr * weight_decay per step: the same fraction in every group
                g["weight_decay"] = cfg.adam_lr * cfg.adam_weight_decay / g["lr"]
            opts.append(torch.optim.SGD(groups, momentum=cfg.sgd_momentum, nesterov=True, **fused))
        else:
            opts.append(torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                          weight_decay=cfg.adam_weight_decay, eps=1e-10, **fused))
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def warmup_steps(total_steps: int, cfg: OptimConfig) -> int:
    """The warm-up in force: at most half the run, so a short run (the 8M-token speedrun of a preset
    whose warm-up was set for longer ones) still trains at its full rate before it decays."""
    return min(cfg.warmup_steps, total_steps // 2)


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier on the base learning rate for optimiser step `step` (0-based).

    Warmup is linear and reaches (step + 1) / warmup, so the first step never runs at 0. The
    warm-up and the decay never overlap into a jump: where they meet, the lower ramp wins.
    """
    warm = warmup_steps(total_steps, cfg)
    ramp = (step + 1) / warm if step < warm else 1.0
    if cfg.schedule == "constant":
        return ramp
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        if step < warm:
            return ramp
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: hold, then decay linearly over the last cooldown_frac of all steps
    cooldown = int(round(cfg.cooldown_frac * total_steps))
    start = total_steps - cooldown
    if cooldown == 0 or step < start:
        return ramp
    return min(ramp, floor + (1 - floor) * max(0.0, (total_steps - step) / cooldown))


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * multiplier
