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
        distributed.broadcast_(self.embedding.data, self.cluster_size, self.embed_sum)  # rank 0's random start

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        # counts and sums by index, without a one-hot [N, K] matrix (N = 16k vectors x 1k codes = 64 MB per batch)
        counts = torch.bincount(indices, minlength=self.codebook_size).to(flat.dtype)
        sums = torch.zeros(self.codebook_size, flat.shape[1], dtype=flat.dtype, device=flat.device).index_add_(0, indices, flat)
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
    def _replace_dead(self, flat: torch.Tensor) -> int:
        dead = (self.cluster_size < self.dead_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        n = flat.shape[0]
        if self.reseed == "farthest" and n >= dead.numel():
            # squared distance of each vector to its nearest live code (this step's updated codebook)
            e = self.codebook()[self.cluster_size >= self.dead_threshold]
            gap = ((flat * flat).sum(1, keepdim=True) + ((e * e).sum(1)[None, :] - 2 * flat @ e.t())).min(1).values \
                if len(e) else torch.rand(n, device=flat.device)
            pick = gap.topk(dead.numel()).indices
        else:
            pick = torch.randperm(n, device=flat.device)[:dead.numel()] if n >= dead.numel() else \
                torch.randint(0, n, (dead.numel(),), device=flat.device)
        distributed.broadcast_(pick)  # rank 0's draw: the codebook stays one codebook across processes
        new = flat[pick]
        self.embedding.data[dead] = new.to(self.embedding.dtype)
        # start each new code as if used at the threshold rate, so it has a chance to be picked
        self.cluster_size[dead] = self.dead_threshold
        self.embed_sum[dead] = new * self.dead_threshold
        return int(dead.numel())

    # ---------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA stay in fp32
            z = self._prepare(z.float())
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            if self.training:  # statistics over every process's vectors, so all keep the same codebook
                seen = distributed.gather_rows(flat.detach())
            if self.training and not bool(self.initialized):
                self._initialise(seen)
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
                self._replace_dead(seen)  # after the lookup, so this batch's indices stay valid
        quantized = out.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return QuantizerOutput(quantized, indices.reshape(b, h, w), commitment, codebook)


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
