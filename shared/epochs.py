"""The order in which a batch source visits its examples, epoch by epoch, resumably."""

from __future__ import annotations

import torch

from .errors import UserError


class EpochOrder:
    """Batches of indices into n examples: a fresh permutation each epoch, the incomplete tail of an
    epoch skipped. The order is a pure function of (seed, epoch), so (epoch, cursor) is all that a
    checkpoint needs to continue it exactly."""

    def __init__(self, n: int, batch_size: int, seed: int, what: str = "examples"):
        if n < batch_size:
            raise UserError(f"{n:,} {what} is fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def next(self) -> tuple[torch.Tensor, torch.Generator]:
        """(indices of the next batch, a generator seeded by this batch's position for its random choices)."""
        if self.cursor + self.batch_size > self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.cursor:self.cursor + self.batch_size]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + self.cursor)
        self.cursor += self.batch_size
        return idx, g

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise UserError("the checkpoint's data position does not fit this data (different data or seed)")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)
