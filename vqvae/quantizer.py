"""Vector quantiser built to use its whole codebook.

- The codebook is initialised from the first training batch of encoder outputs (k-means, or
  sampled vectors with `kmeans_iters = 0`), so no code starts far from the data.
- It is updated by exponential moving averages of the vectors assigned to each code (the
  default), or trained by the codebook loss as a parameter (`update = "loss"`).
- A code whose moving-average use falls below `dead_threshold` (expected assignments per batch)
  is moved onto an encoder output of the current batch: a random one (`reseed = "random"`), or
  the ones farthest from every code (`reseed = "farthest"`), which land where the codebook covers
  the data worst instead of next to a code that already serves them.
- Optionally codes are l2-normalised (cosine-similarity lookup), which works best with a low
  code dimension.
- Gradients pass the quantisation by the straight-through estimator, or by the rotation trick
  (Fifty et al., 2024), which rotates and rescales z onto its code so the decoder's gradient
  reaches the encoder with the angle between z and the code taken into account.

Everything that changes during training (codebook, EMA statistics, the initialised flag) is a
buffer, so checkpoints save it and resume restores it exactly. The statistics are updated only
in training mode, inside forward, from every process's vectors when several train together (and
random draws are rank 0's), so the codebook stays the same on all of them.

A training forward makes no host synchronisation once the codebook is initialised (the trainer
reads the device only at logging points): the initialised flag is also kept in Python, counts
are scattered rather than `bincount`ed, and dead codes are replaced with static shapes (a
candidate drawn for every code, kept where the code is dead) instead of indexing by `nonzero`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from shared import distributed


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, D, H, W], carries gradients to the encoder
    indices: torch.Tensor  # int64 [B, H, W]
    commitment: torch.Tensor  # ||z - sg(q)||^2, scalar
    codebook: torch.Tensor  # ||sg(z) - q||^2, scalar (zero gradient under EMA updates)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None,
           cosine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, D], counts [k]) from Lloyd's algorithm on x [N, D], started at random points.
    With fewer than k points, points are repeated (the dead-code rule separates them later)."""
    n = x.shape[0]
    start = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(0, n, (k,), generator=generator)
    centroids = x[start.to(x.device)].clone()
    counts = torch.ones(k, device=x.device)
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        used = counts > 0
        centroids[used] = sums[used] / counts[used, None]  # empty clusters keep their point
        if cosine:
            centroids = F.normalize(centroids, dim=1)
    return centroids, counts


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, update: Literal["ema", "loss"] = "ema", decay: float = 0.99,
                 dead_threshold: float = 1.0, kmeans_iters: int = 10, l2_normalize: bool = False,
                 gradient: Literal["ste", "rotation"] = "ste", reseed: Literal["random", "farthest"] = "random",
                 eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.dim, self.update, self.decay = codebook_size, dim, update, decay
        self.dead_threshold, self.kmeans_iters, self.l2 = dead_threshold, kmeans_iters, l2_normalize
        self.gradient, self.reseed, self.eps = gradient, reseed, eps
        init = torch.randn(codebook_size, dim)
        if update == "loss":
            self.embedding = nn.Parameter(init)
        else:
            self.register_buffer("embedding", init)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # EMA of assignments per batch
        self.register_buffer("embed_sum", torch.zeros(codebook_size, dim))  # EMA of assigned vectors' sum
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # the buffer's value on the host, so a step need not read the device to know it: set by
        # _initialise and by loading a state dict (checkpoints hold the buffer)
        self._initialized = False
        self.register_load_state_dict_post_hook(_read_initialized)
        self.replaced: torch.Tensor | None = None  # codes the last training forward replaced (on the device)

    def codebook(self) -> torch.Tensor:
        e = self.embedding.float()
        return F.normalize(e, dim=1) if self.l2 else e

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=1) if self.l2 else z

    def lookup(self, flat: torch.Tensor) -> torch.Tensor:
        """Nearest code index for each row of flat [N, D] (already normalised when l2)."""
        with torch.autocast(flat.device.type, enabled=False):  # bf16 distances would pick wrong codes
            e, flat = self.codebook(), flat.float()
            # ||x||^2 is the same for every code and is left out of the argmin
            dist = (e * e).sum(1)[None, :] - 2 * flat @ e.t()
            return dist.argmin(1)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for integer indices [...] -> [..., D]."""
        return self.codebook()[indices]

    # ---------------------------------------------------------------- training-time updates
    @torch.no_grad()
    def _initialise(self, flat: torch.Tensor) -> None:
        centroids, counts = kmeans(flat, self.codebook_size, self.kmeans_iters, cosine=self.l2)
        self.embedding.data.copy_(centroids)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(centroids * counts[:, None])
        self.initialized.fill_(True)
        self._initialized = True
        distributed.broadcast_(self.embedding.data, self.cluster_size, self.embed_sum)  # rank 0's random start

    @property
    def ready(self) -> bool:
        """Whether the codebook is initialised, as the host knows it (no read of the device)."""
        return self._initialized

    @torch.no_grad()
    def initialise_from(self, z: torch.Tensor) -> None:
        """The codebook from encoder outputs z [B, D, H, W] (every process's), unless it is set.
        Called eagerly before the first training forward (vqvae/task.py), so that a compiled
        forward is traced once, with the codebook initialised, and never recompiles for it."""
        if not self._initialized:
            with torch.autocast(z.device.type, enabled=False):
                flat = self._prepare(z.float()).permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                self._initialise_once(distributed.gather_rows(flat))

    def _initialise_once(self, seen: torch.Tensor) -> None:
        if not bool(self.initialized):  # a sync, but only until the codebook is initialised
            self._initialise(seen)
        self._initialized = True  # or the buffer was set directly, not through a state dict

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        # counts and sums by index, without a one-hot [N, K] matrix (N = 16k vectors x 1k codes = 64 MB per
        # batch); index_add_ rather than bincount, which reads the largest index on the host
        counts = flat.new_zeros(self.codebook_size).index_add_(0, indices, flat.new_ones(len(indices)))
        sums = flat.new_zeros(self.codebook_size, flat.shape[1]).index_add_(0, indices, flat)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        if self.update == "ema":
            self.embed_sum.lerp_(sums, 1 - self.decay)
            # Laplace smoothing keeps a rarely used code from dividing by ~0
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
            self.embedding.data.copy_(self.embed_sum / smoothed[:, None])
            if self.l2:
                self.embedding.data.copy_(F.normalize(self.embedding.data, dim=1))

    @torch.no_grad()
    def _replace_dead(self, flat: torch.Tensor) -> torch.Tensor:
        """Move every dead code onto a vector of this batch; returns how many moved (a device tensor).

        Static shapes, so nothing waits for the host: a candidate vector is drawn for every code
        (distinct random ones, or the farthest from every live code, farthest first), the i-th dead
        code takes the i-th candidate, and torch.where keeps the live codes as they are."""
        k, n = self.codebook_size, flat.shape[0]
        if self.dead_threshold <= 0:  # cluster sizes never fall below zero: no code can die
            return flat.new_zeros((), dtype=torch.long)
        dead = self.cluster_size < self.dead_threshold
        score = torch.rand(n, device=flat.device)  # random keys: the top k are k distinct vectors in random order
        if self.reseed == "farthest":
            # squared distance of each vector to its nearest live code (this step's updated codebook);
            # with no live code at all, the random keys
            e = self.codebook()
            dist = (flat * flat).sum(1, keepdim=True) + ((e * e).sum(1)[None, :] - 2 * flat @ e.t())
            gap = dist.masked_fill(dead[None, :], float("inf")).min(1).values
            score = torch.where(dead.all(), score, gap)
        candidates = score.topk(min(n, k)).indices
        # with fewer vectors than dead codes the candidates repeat, as draws with replacement would
        rank = (dead.long().cumsum(0) - 1).clamp_min(0)
        pick = candidates[rank % len(candidates)]
        distributed.broadcast_(pick)  # rank 0's draw: the codebook stays one codebook across processes
        new = flat[pick]
        self.embedding.data.copy_(torch.where(dead[:, None], new.to(self.embedding.dtype), self.embedding.data))
        # start each new code as if used at the threshold rate, so it has a chance to be picked
        self.cluster_size.masked_fill_(dead, self.dead_threshold)
        self.embed_sum.copy_(torch.where(dead[:, None], new * self.dead_threshold, self.embed_sum))
        return dead.sum()

    # ---------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA stay in fp32
            z = self._prepare(z.float())
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            if self.training:  # statistics over every process's vectors, so all keep the same codebook
                seen = distributed.gather_rows(flat.detach())
            if self.training and not self._initialized:
                self._initialise_once(seen)
            with torch.no_grad():
                indices = self.lookup(flat)
            q = self.embed(indices)  # the codebook before this step's update, as the loss sees it
            if self.training:
                self._ema_update(seen, distributed.gather_rows(indices))
            commitment = F.mse_loss(flat, q.detach())
            codebook = F.mse_loss(flat.detach(), q)
            if self.gradient == "rotation":
                out = rotate_to(flat, q.detach())
            else:
                out = flat + (q - flat).detach()
            if self.training:
                self.replaced = self._replace_dead(seen)  # after the lookup, so this batch's indices stay valid
        quantized = out.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return QuantizerOutput(quantized, indices.reshape(b, h, w), commitment, codebook)


def _read_initialized(module: VectorQuantizer, incompatible_keys) -> None:
    """After load_state_dict: the Python flag follows the loaded buffer (one sync per load)."""
    module._initialized = bool(module.initialized)


def rotate_to(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The rotation trick: returns q in value, but as s * R z with R (the rotation taking z's
    direction to q's) and s = |q| / |z| held constant, so gradients flow through z rotated."""
    z_norm = z.norm(dim=1, keepdim=True).clamp_min(1e-6)
    q_norm = q.norm(dim=1, keepdim=True).clamp_min(1e-6)
    u, v = (z / z_norm).detach(), q / q_norm
    w = F.normalize(u + v, dim=1).detach()
    # R = I - 2 w w^T + 2 v u^T maps u to v (Householder-style, no D x D matrix needed)
    rz = z - 2 * w * (w * z).sum(1, keepdim=True) + 2 * v * (u * z).sum(1, keepdim=True)
    return (q_norm / z_norm).detach() * rz
