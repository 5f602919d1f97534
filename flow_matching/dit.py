"""DiT2D: a class-conditional Diffusion Transformer that predicts a velocity in pixel space.

Read top to bottom:

1. The image [B, 3, 32, 32] is cut into non-overlapping patch x patch squares; each flattened
   patch is projected to the model width. Positions enter twice: a fixed 2-D sin-cos embedding
   added to the tokens says where each patch is (RoPE alone is translation-equivariant: a
   500-step debug run without the absolute embedding drew patch-level noise, 600 steps with it
   drew recognisable classes), and 2-D rotary embeddings in every attention layer
   (shared.blocks.rope_2d) make attention depend on (row, column) offsets.
2. The condition c = time embedding + class embedding. Time t in [0, 1] is scaled by 1000 before
   the sinusoidal features, so the features' frequencies (periods 2*pi .. 2*pi*10^4) resolve the
   unit interval as finely as DiT's integer timesteps did. The class table has one extra row, the
   "null" class used for classifier-free guidance; no real label ever maps to it.
3. adaLN-Zero: every block gets its own linear map SiLU(c) -> (shift, scale, gate) for the
   attention and for the MLP. The norms have no learned gain; the condition supplies it. Those
   maps and the final output projection start at zero, so at initialisation every gate is zero
   (each block is the identity) and the output is exactly zero: the untrained model predicts
   zero velocity, and training starts from a well-defined, stable point.
4. A final adaLN-modulated norm and a linear layer map each token back to a patch of velocities,
   which are folded back into an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from shared.blocks import (
    Block,
    RMSNorm,
    init_weights,
    modulate,
    rope_2d,
    sinusoidal_embedding,
)
from shared.contracts import ModelHooks
from shared.errors import ConfigError

TIME_SCALE = 1000.0  # t in [0, 1] -> [0, 1000] before the sinusoidal features (see point 2 above)


@dataclass
class DiTConfig:
    image_size: int = 32
    channels: int = 3
    patch: int = 2
    hidden: int = 384
    depth: int = 12
    n_heads: int = 6
    mlp: Literal["swiglu", "relu2"] = "swiglu"
    mlp_hidden: int = 1024
    qk_norm: bool = True
    freq_dim: int = 256  # sinusoidal features of t before the time MLP
    num_classes: int = 0  # 0: taken from the data when the run is built

    def __post_init__(self):
        if min(self.image_size, self.channels, self.patch, self.hidden, self.depth, self.n_heads, self.mlp_hidden) <= 0:
            raise ConfigError("model: sizes must be positive")
        if self.image_size % self.patch:
            raise ConfigError(f"model.patch ({self.patch}) must divide model.image_size ({self.image_size})")
        if self.hidden % self.n_heads:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must divide model.hidden ({self.hidden})")
        if (self.hidden // self.n_heads) % 4:
            raise ConfigError("model: the head dimension (hidden / n_heads) must be divisible by 4 for 2-D RoPE")


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed absolute positions [grid * grid, dim]: half the features encode the row, half the column."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sinusoidal_embedding(rows.flatten(), dim // 2), sinusoidal_embedding(cols.flatten(), dim - dim // 2)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t * TIME_SCALE, self.freq_dim))


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from each token to its patch of velocities."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm = RMSNorm(hidden, elementwise_affine=False)
        self.modulation = nn.Linear(hidden, 2 * hidden)
        self.head = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=-1)
        return self.head(modulate(self.norm(x), shift, scale))


class DiT2D(ModelHooks, nn.Module):
    # parameters that AdamW should train although they are 2-D (see shared.optim.split_params):
    # the input projection and the output head; the class table is an nn.Embedding already
    ADAM_NAMES = ("patch_embed", "head")

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.num_classes <= 0:
            raise ConfigError("model.num_classes must be set (it normally comes from the data)")
        self.cfg = cfg
        self.null_class = cfg.num_classes  # the extra row of the class table
        self.grid = cfg.image_size // cfg.patch
        patch_dim = cfg.channels * cfg.patch * cfg.patch
        self.patch_embed = nn.Linear(patch_dim, cfg.hidden)
        self.time_embed = TimestepEmbedder(cfg.hidden, cfg.freq_dim)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.hidden)
        self.blocks = nn.ModuleList(
            Block(cfg.hidden, cfg.n_heads, mlp=cfg.mlp, mlp_hidden=cfg.mlp_hidden, qk_norm=cfg.qk_norm,
                  causal=False, norm_affine=False) for _ in range(cfg.depth))
        self.modulations = nn.ModuleList(nn.Linear(cfg.hidden, 6 * cfg.hidden) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.hidden, patch_dim)
        self.register_buffer("pos_embed", sincos_2d(self.grid, cfg.hidden), persistent=False)
        cos, sin = rope_2d(self.grid, self.grid, cfg.hidden // cfg.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init()

    def _init(self) -> None:
        init_weights(self, std=0.02, zero_init_out=False)
        nn.init.xavier_uniform_(self.patch_embed.weight)  # like a conv patch embedding, not std 0.02
        # adaLN-Zero: zero modulation (gates start at 0, blocks are the identity) and a zero head
        for m in [*self.modulations, self.final.modulation, self.final.head]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p], row-major over the patch grid."""
        return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=self.cfg.patch, q=self.cfg.patch)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=self.grid, p=self.cfg.patch, q=self.cfg.patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity [B, C, H, W] at images x, times t [B] in [0, 1] and labels y [B] (null allowed)."""
        c = self.time_embed(t) + self.class_embed(y)
        h = self.patch_embed(self.patchify(x)) + self.pos_embed
        rope = (self.rope_cos, self.rope_sin)
        silu_c = F.silu(c)
        for block, mod in zip(self.blocks, self.modulations):
            h = block(h, rope, modulation=mod(silu_c).unflatten(-1, (6, -1)))
        return self.unpatchify(self.final(h, c))
