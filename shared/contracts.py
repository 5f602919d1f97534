"""What the training loop calls, and nothing else: a package's model, task and batch source
declare these hooks by subclassing, each optional one with a no-op default (as torchtitan's
components do), so the loop never looks a hook up by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class ModelHooks:
    """Mixed into a model (`class Decoder(ModelHooks, nn.Module)`).

    ADAM_NAMES: the names of the modules (the last component of their dotted name) whose matrices
    AdamW trains instead of Muon, such as output heads and routers; embeddings always go to AdamW.
    HEAD_NAMES: the modules that `optim.head_lr` trains (an output head).
    """

    ADAM_NAMES: tuple[str, ...] = ()
    HEAD_NAMES: tuple[str, ...] = ()

    def after_optimizer_step(self) -> None:
        """State the model moves outside the gradient after each update (MoE balancing biases,
        a step counter, held filter norms)."""

    def muon_merged(self) -> list[list[nn.Parameter]]:
        """Groups of matrices Muon orthogonalises as one, stacked by rows (5-dollar-llm keeps an
        attention's q, k, v and o in one parameter); none by default."""
        return []


class BatchSource:
    """An endless, deterministic stream of batches whose position can be saved and restored."""

    units_per_batch: int  # the task's unit (tokens, images) in one batch

    def next_batch(self) -> Any:
        raise NotImplementedError

    def skip_batch(self) -> None:
        """Advance past a batch another process trains on; a source that can do so without
        building it overrides this."""
        self.next_batch()

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class Task:
    """Loss, evaluation and samples of one kind of model."""

    unit: str  # "tokens", "images"

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def sample(self, model: nn.Module, step: int, run_dir: Path, logger) -> None:
        """Samples written under run_dir and to the logger at sample milestones; none by default."""

    def train_metrics(self, model: nn.Module) -> dict[str, float]:
        """Figures gathered since the last call (kept as tensors until then, so they cost no host
        sync per step), logged beside the training loss; `model` is the trained (unwrapped) model."""
        return {}
