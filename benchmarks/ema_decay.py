"""The EMA decay each preset ends with: the fixed warm-up (horizon 10) against the warm-up sized to the run.

    python benchmarks/ema_decay.py

For every preset in configs/*/*.toml with train.ema_decay > 0: its optimiser steps (budget over the
units of one step) and, under each warm-up, the decay of its EMA update half-way and of the last
one, the update at which the configured decay is first used, and the share of the final average
that comes from the first tenth of the run (the initial weights included). The shares are exact
products of the per-update decays.
Prints a Markdown table; no training.
"""

from __future__ import annotations

import argparse
import math
import sys
import tomllib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from shared.ema import EMA, warmup_horizon
from shared.trainer import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def total_steps(package: str, cfg: dict) -> int:
    train = TrainConfig(**cfg.get("train", {}))
    per_batch = train.batch_size * (cfg["data"]["seq_len"] if package == "llm" else 1)  # text counts tokens
    return math.ceil(train.budget / (per_batch * train.grad_accum))


def profile(ema: EMA, steps: int) -> tuple[float, float, str, float]:
    """(decay at half the run, of the last update, where the configured decay is first used, share
    of the first tenth)."""
    decays = [ema.decay_at(n) for n in range(steps)]
    reached = next((n for n, d in enumerate(decays) if d == ema.decay), None)
    # the final average weighs update k's weights by (1 - d_k) * prod_{j > k} d_j, the initial ones by prod_j d_j
    later, tail = 0.0, 1.0
    for n in range(steps - 1, math.ceil(steps / 10) - 1, -1):
        later += (1 - decays[n]) * tail
        tail *= decays[n]
    where = "never" if reached is None else f"{reached:,} ({reached / steps:.0%})"
    return decays[steps // 2], decays[-1], where, 1.0 - later


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("| preset | ema_decay | steps | before: half-way | final decay | reached | first 10% share "
          "| horizon | after: half-way | final decay | reached | first 10% share |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for path in sorted(ROOT.glob("configs/*/*.toml")):
        cfg = tomllib.loads(path.read_text())
        decay = cfg.get("train", {}).get("ema_decay", 0.0)
        if decay <= 0:
            continue
        package = path.parent.name
        steps = total_steps(package, cfg)
        model = torch.nn.Linear(1, 1)
        before = EMA(model, decay)
        horizon = warmup_horizon(decay, steps)
        after = EMA(model, decay, horizon=horizon)
        b, a = profile(before, steps), profile(after, steps)
        print(f"| {package}/{path.stem} | {decay} | {steps:,} | {b[0]:.5f} | {b[1]:.5f} | {b[2]} | {b[3]:.3g} "
              f"| {horizon:.2f} | {a[0]:.5f} | {a[1]:.5f} | {a[2]} | {a[3]:.3g} |")


if __name__ == "__main__":
    main()
