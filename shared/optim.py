"""The Muon + AdamW split and learning-rate schedules.

Muon (shared/muon.py: Nesterov momentum, Newton-Schulz orthogonalisation, shape-aware step size,
decoupled weight decay) trains the hidden 2-D weight matrices; AdamW trains everything else:
embeddings, what the model names in its ADAM_NAMES (output heads, MoE routers), norms, gains,
biases, and anything not 2-D (convolution filters too, unless `muon_conv` is set). A package's
config may replace what trains the rest by overriding `OptimConfig.rest_optimizer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .contracts import ModelHooks
from .errors import ConfigError
from .muon import STACKED, Muon


@dataclass
class OptimConfig:
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    # Muon momentum warm-up (nanochat's): from muon_momentum_start linearly to muon_momentum over
    # this many steps; 0 = constant
    muon_momentum_warmup: int = 0
    muon_momentum_start: float = 0.85
    muon_weight_decay: float = 0.0
    muon_cautious_wd: bool = False  # decay only where the update and the weight agree in sign (nanochat)
    muon_beta2: float = 0.0  # > 0: NorMuon's second-moment normalisation of Muon's updates (nanochat: 0.9)
    adam_lr: float = 3e-3
    # AdamW's rate for embedding tables and for the model's HEAD_NAMES (an untied output head;
    # a tied one is the embedding); 0 = adam_lr. nanochat trains its embedding far faster than its head.
    embed_lr: float = 0.0
    head_lr: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_weight_decay: float = 0.0
    adam_eps: float = 1e-10
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    schedule: Literal["constant", "cosine", "wsd"] = "wsd"
    warmup_steps: int = 0
    # the warm-up reaches step / warmup_steps (torch LambdaLR's ramp, so the first step runs at lr 0:
    # 5-dollar-llm's "constant, no warm-up" schedule is that with one warm-up step) instead of (step + 1) / warmup_steps
    warmup_from_zero: bool = False
    cooldown_frac: float = 0.2  # wsd: final fraction of steps that decays to min_lr_ratio
    min_lr_ratio: float = 0.0
    muon_conv: bool = False  # also train conv filters with Muon, flattened to [out, in*kh*kw]
    matrix_optimizer: Literal["muon", "adamw"] = "muon"  # "adamw": one AdamW at adam_lr trains everything (a baseline)
    muon_ns: Literal["quintic", "polar_express"] = "quintic"  # Muon's orthogonalisation (shared/muon.py)
    # keys an older OptimConfig wrote into every run's config.toml (the classifier's optimiser knobs,
    # now a subclass's): shared.config drops them at these values, so those runs still load
    RETIRED: ClassVar[dict[str, Any]] = {"other_optimizer": "adamw", "sgd_momentum": 0.0}

    def __post_init__(self):
        # written so that NaN fails every check (NaN compares false)
        if not 0.0 <= self.muon_beta2 < 1.0:
            raise ConfigError(f"optim.muon_beta2 must be in [0, 1) (0 = plain Muon), got {self.muon_beta2}")
        if not 0.0 <= self.cooldown_frac <= 1.0:
            raise ConfigError(f"optim.cooldown_frac must be in [0, 1], got {self.cooldown_frac}")
        if not (self.warmup_steps >= 0 and 0 < self.muon_lr < math.inf and 0 < self.adam_lr < math.inf):
            raise ConfigError("optim: learning rates must be positive and finite, warmup_steps non-negative")
        if not (0.0 <= self.min_lr_ratio <= 1.0 and 0.0 <= self.grad_clip < math.inf):
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1] and optim.grad_clip >= 0 (0 = off), got "
                              f"{self.min_lr_ratio} and {self.grad_clip}")
        if not (0.0 <= self.embed_lr < math.inf and 0.0 <= self.head_lr < math.inf and self.muon_momentum_warmup >= 0):
            raise ConfigError("optim.embed_lr and optim.head_lr must be >= 0 (0 = adam_lr), "
                              "optim.muon_momentum_warmup non-negative")
        for name in ("muon_momentum", "muon_momentum_start", "adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if not (0.0 <= self.muon_weight_decay < math.inf and 0.0 <= self.adam_weight_decay < math.inf):
            raise ConfigError("optim: weight decays must be non-negative and finite")
        if not 0.0 < self.adam_eps < 1.0:
            raise ConfigError(f"optim.adam_eps must be in (0, 1), got {self.adam_eps}")

    def rest_optimizer(self, model: nn.Module, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """What trains the parameters Muon does not: AdamW at adam_lr. A subclass may train them
        otherwise (judge/config.py: Nesterov SGD for the classifier)."""
        return adamw(self.lr_groups(model, params), self)

    def lr_groups(self, model: nn.Module, params: list[nn.Parameter]) -> list[dict]:
        """`params` in groups by rate: adam_lr, embeddings at embed_lr and the model's HEAD_NAMES at
        head_lr. A group of its own only when its rate is set, so that the optimiser states of runs
        from before these settings still load."""
        embed = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
        heads = model.HEAD_NAMES if isinstance(model, ModelHooks) else ()
        head = {id(p) for name, m in model.named_modules() if name.split(".")[-1] in heads
                for p in m.parameters(recurse=False)} - embed  # a tied head is its embedding
        groups: dict[str, list] = {"rest": [], "embed": [], "head": []}
        for p in params:
            kind = "embed" if self.embed_lr and id(p) in embed else "head" if self.head_lr and id(p) in head else "rest"
            groups[kind].append(p)
        rates = {"rest": self.adam_lr, "embed": self.embed_lr, "head": self.head_lr}
        return [dict(params=ps, lr=rates[kind]) for kind, ps in groups.items() if ps]


def adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    # fused kernels on every device: the single-tensor and foreach paths read each parameter's step
    # count on the host (one sync per parameter per step); the fused ones keep it on the device
    return torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                             eps=cfg.adam_eps, fused=True)


def split_params(model: nn.Module, conv: bool = False) -> tuple[list, list]:
    """(muon, adam) parameter lists; every trainable parameter lands in exactly one.

    A 2-D weight goes to Muon unless it belongs to an embedding (nn.Embedding) or to a module
    whose name (its last component) the model lists in its class attribute ADAM_NAMES: what it
    has AdamW train although it is 2-D (output heads, MoE routers, an input projection); and so do
    stacked expert matrices [E, out, in]; with `conv`, so do the filters of nn.Conv2d layers. Tied
    weights are seen once, through the module that registered them first.
    """
    # ModelHooks declares it; a plain module lists none, so Muon trains every matrix it has
    adam_names = model.ADAM_NAMES if isinstance(model, ModelHooks) else ()
    muon, adam, seen = [], [], set()
    for mod_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            declared = mod_name.split(".")[-1] in adam_names
            matrix = p.ndim == 2 or (conv and p.ndim == 4 and isinstance(module, nn.Conv2d)) or getattr(p, STACKED, False)
            if matrix and not isinstance(module, nn.Embedding) and not declared:
                muon.append(p)
            else:
                adam.append(p)
    return muon, adam


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    muon_params, adam_params = split_params(model, conv=cfg.muon_conv)
    if cfg.matrix_optimizer == "adamw":
        muon_params, adam_params = [], muon_params + adam_params
    opts: list[torch.optim.Optimizer] = []
    if muon_params:
        mine = {id(p) for p in muon_params}
        merged = [g for g in model.muon_merged() if all(id(p) in mine for p in g)] if isinstance(model, ModelHooks) else []
        opts.append(Muon(muon_params, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True,
                         weight_decay=cfg.muon_weight_decay, ns=cfg.muon_ns, merged=merged, beta2=cfg.muon_beta2,
                         cautious_wd=cfg.muon_cautious_wd))
    if adam_params:
        opts.append(cfg.rest_optimizer(model, adam_params))
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def warmup_steps(total_steps: int, cfg: OptimConfig) -> int:
    """The warm-up in force: at most half the run and, for wsd, over by the step its warm-down
    begins, so a short run (a preset's recipe at a few dozen steps) reaches its full rate before it
    decays. Without the second cap `blueberry-88m` at 74 steps (warm-up 40, the last 65% decaying)
    peaked at 0.81 of its rate (`benchmarks/results/llm_5dollar.md`, section 3b)."""
    cap = total_steps // 2
    if cfg.schedule == "wsd" and (start := total_steps - cooldown_steps(total_steps, cfg)) > 0:
        cap = min(cap, start)  # a warm-down over the whole run (start 0) keeps the warm-up, met by min()
    return min(cfg.warmup_steps, cap)


def cooldown_steps(total_steps: int, cfg: OptimConfig) -> int:
    """wsd's warm-down: the last cooldown_frac of the steps."""
    return int(round(cfg.cooldown_frac * total_steps))


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier on the base learning rate for optimiser step `step` (0-based).

    Warmup is linear and reaches (step + 1) / warmup, so the first step never runs at 0 (with
    warmup_from_zero: step / warmup, as torch's LambdaLR ramps). The warm-up and the decay never
    overlap into a jump: where they meet, the lower ramp wins.
    """
    warm = warmup_steps(total_steps, cfg)
    first = 0 if cfg.warmup_from_zero else 1  # the ramp's value at step 0, in warm-up steps
    ramp = (step + first) / warm if step < warm else 1.0
    if cfg.schedule == "constant":
        return ramp
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        if step < warm:
            return ramp
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: hold, then decay linearly over the last cooldown_frac of all steps
    cooldown = cooldown_steps(total_steps, cfg)
    start = total_steps - cooldown
    if cooldown == 0 or step < start:
        return ramp
    return min(ramp, floor + (1 - floor) * max(0.0, (total_steps - step) / cooldown))


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * multiplier


def muon_momentum(step: int, cfg: OptimConfig) -> float:
    """Muon's momentum at optimiser step `step`: the warm-up's ramp, then muon_momentum."""
    if step >= cfg.muon_momentum_warmup:
        return cfg.muon_momentum
    return cfg.muon_momentum_start + (cfg.muon_momentum - cfg.muon_momentum_start) * step / cfg.muon_momentum_warmup


def apply_schedule(optimizers: list[torch.optim.Optimizer], step: int, total_steps: int, cfg: OptimConfig) -> None:
    """Every scheduled hyperparameter for step `step`: learning rates and Muon's momentum."""
    set_lr(optimizers, lr_multiplier(step, total_steps, cfg))
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = muon_momentum(step, cfg)
