"""From noise to images: time grids, ODE solvers (Euler, Heun) and classifier-free guidance.

A velocity field is any callable v(x, t) with t a float in [0, 1]; the solvers integrate
dx/dt = v from t = 0 (noise) to t = 1 (data) over a grid of times.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import nn

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
SAMPLERS = ("euler", "heun")
TIME_GRIDS = ("uniform", "cosine")


def time_grid(num_steps: int, kind: str = "uniform") -> list[float]:
    """num_steps + 1 increasing times from 0 to 1.

    uniform: equal steps. cosine: t_i = (1 - cos(pi * i / n)) / 2, smaller steps near both ends,
    where the velocity of a trained model changes fastest.
    """
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    u = [i / num_steps for i in range(num_steps + 1)]
    if kind == "uniform":
        return u
    if kind == "cosine":
        return [0.0, *[(1 - math.cos(math.pi * s)) / 2 for s in u[1:-1]], 1.0]
    raise ValueError(f"unknown time grid {kind!r}; choose one of {TIME_GRIDS}")


@torch.no_grad()
def euler(v: Velocity, x: torch.Tensor, times: list[float]) -> torch.Tensor:
    """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i): one evaluation per step, first order."""
    for t0, t1 in zip(times[:-1], times[1:]):
        x = x + (t1 - t0) * v(x, t0)
    return x


@torch.no_grad()
def heun(v: Velocity, x: torch.Tensor, times: list[float]) -> torch.Tensor:
    """Euler predictor, trapezoidal corrector: two evaluations per step, second order."""
    for t0, t1 in zip(times[:-1], times[1:]):
        dt = t1 - t0
        v0 = v(x, t0)
        x_pred = x + dt * v0
        x = x + dt * 0.5 * (v0 + v(x_pred, t1))
    return x


SOLVERS = {"euler": euler, "heun": heun}


def guided_velocity(model: nn.Module, labels: torch.Tensor, scale: float, null_class: int) -> Velocity:
    """v = v_uncond + scale * (v_cond - v_uncond) on all channels.

    The conditional and unconditional halves run as one batch of 2B. At scale 1 the guided field
    is the conditional one, so the unconditional half is skipped.
    """

    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device)
        if scale == 1.0:
            return model(x, tt, labels).float()
        null = torch.full_like(labels, null_class)
        out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).float()
        v_cond, v_uncond = out.chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    return v


@torch.no_grad()
def sample(model: nn.Module, labels: torch.Tensor, *, num_steps: int, cfg_scale: float = 1.0,
           sampler: Literal["euler", "heun"] = "euler", grid: str = "uniform",
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1] (clamped) for `labels`, starting from seeded Gaussian noise."""
    cfg = model.cfg
    device = labels.device
    noise = torch.randn(len(labels), cfg.channels, cfg.image_size, cfg.image_size, generator=generator,
                        device=generator.device if generator is not None else device).to(device)
    v = guided_velocity(model, labels, cfg_scale, model.null_class)
    return SOLVERS[sampler](v, noise, time_grid(num_steps, grid)).clamp(-1, 1)
