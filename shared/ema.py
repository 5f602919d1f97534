"""Exponential moving average of a model's weights, with a warm-up sized to the run and BatchNorm
statistics measured for the averaged weights."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

BATCHNORM_BATCHES = 16  # training batches that measure the averaged weights' BatchNorm statistics


def warmup_horizon(decay: float, total_steps: int) -> float:
    """The horizon whose ramp (1 + n) / (horizon + n) reaches `decay` at update total_steps - 1, the
    last, so `decay` is exactly the decay the final weights are averaged with.

    Why a ramp to the end rather than to an early point and a constant decay after it: the average is
    then a power function of training time (EDM2, Karras et al. 2024), the same share of the steps
    so far at every evaluation, and presets that run only one or two spans of 1 / (1 - decay)
    updates weigh their early weights less. Never below 2 (a uniform average), where later weights
    stop counting at least as much as earlier ones: a run shorter than about 1 / (1 - decay) updates
    ends below `decay`, at total_steps / (total_steps + 1).
    """
    exact = 1.0 + total_steps * (1.0 - decay) / decay
    return max(2.0, exact * (1 - 1e-9))  # a hair lower, so rounding cannot leave the last ramp value under `decay`


class EMA:
    """Keeps `shadow`, a frozen copy of the model whose weights trail the trained ones.

    The decay used at update n is min(decay, (1 + n) / (horizon + n)). Until it meets `decay` the
    ramp is a power-function average: update k's weights count about as k^(horizon - 2), so no run
    is dominated by its random initialisation. horizon=10, the classic fixed ramp, reaches `decay`
    only after about 10 / (1 - decay) updates, longer than most presets run (0.9999 would need
    100,000): the trainer sizes the horizon to the run with `warmup_horizon`.

    Buffers are copied from the live model, so the EMA's state never depends on anything else.
    BatchNorm running statistics copied that way describe the live weights, not the averaged ones,
    and an average of them is no better once the EMA spans the fast early changes (measured on the
    classifier: benchmarks/results/ema.md), so `measure_batchnorm` measures them afresh for the
    averaged weights before the shadow is used or saved.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True, horizon: float = 10.0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if not horizon >= 1.0:  # NaN fails too; below 1 the ramp would start above 1
            raise ValueError(f"EMA warm-up horizon must be >= 1, got {horizon}")
        self.decay, self.warmup, self.horizon, self.updates = decay, warmup, horizon, 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.norms = [m for m in self.shadow.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.measured_at: int | None = None  # the update whose weights the BatchNorm statistics were measured for

    def decay_at(self, n: int) -> float:
        """The decay of update n (counted from 0)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + n) / (self.horizon + n))

    def current_decay(self) -> float:
        """The decay the next update will use."""
        return self.decay_at(self.updates)

    @property
    def last_decay(self) -> float | None:
        """The decay of the latest update (what the shadow now reflects); None before the first."""
        return self.decay_at(self.updates - 1) if self.updates else None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        torch._foreach_lerp_(list(self.shadow.parameters()), [p.detach() for p in model.parameters()], 1.0 - d)
        for eb, mb in zip(self.shadow.buffers(), model.buffers()):
            eb.copy_(mb)
        self.updates += 1

    @property
    def batchnorm_stale(self) -> bool:
        """Whether the shadow has BatchNorm statistics not yet measured for its current weights."""
        return bool(self.norms) and self.measured_at != self.updates

    @torch.no_grad()
    def measure_batchnorm(self, forward: Callable[[nn.Module], object], batches: int = BATCHNORM_BATCHES) -> None:
        """Replace the shadow's BatchNorm statistics by their plain mean over `batches` calls of
        `forward(shadow)`, each running one training batch through it. Only the BatchNorm layers are
        put in training mode. The next update copies the live buffers back, so the EMA's state, and
        an exact resume, do not depend on when this ran."""
        if not self.batchnorm_stale:
            return
        momenta = [m.momentum for m in self.norms]
        for m in self.norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative mean, not another moving average
            m.train()
        try:
            for _ in range(batches):
                forward(self.shadow)
        finally:
            for m, momentum in zip(self.norms, momenta):
                m.momentum = momentum
                m.eval()
        self.measured_at = self.updates

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "horizon": self.horizon, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]  # decay and horizon follow the config in force
