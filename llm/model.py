"""Blueberry: a decoder-only Llama-style language model built from shared blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from shared.blocks import MLPS, Block, KVCache, RMSNorm, document_causal_mask, init_weights, rope_1d
from shared.errors import ConfigError
from shared.losses import linear_cross_entropy
from shared.moe import MoE


@dataclass
class DecoderConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    mlp: Literal["swiglu", "relu2"] = "relu2"
    mlp_hidden: int = 512
    qk_norm: bool = True
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    zero_init_out: bool = True
    init_std: float = 0.02
    vocab_size: int = 0  # 0: taken from the tokenizer when the run is built
    loss_chunk: int = 4096  # tokens per chunk of the fused output layer + loss in training; 0 = full fp32 logits
    # mixture of experts (shared/moe.py): 0 experts = dense MLPs everywhere
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_hidden: int = 0  # each expert's hidden width; 0 = mlp_hidden
    moe_shared_experts: int = 0  # dense experts every token passes through, beside the routed ones
    moe_dense_layers: int = 0  # the first layers keep a dense MLP
    moe_capacity_factor: float = 0.0  # 0 = dropless
    moe_aux_weight: float = 0.01  # Switch load-balancing loss
    moe_z_weight: float = 1e-3  # router z-loss
    moe_bias_rate: float = 0.0  # auxiliary-loss-free balancing step (1e-3 as in DeepSeek-V3); 0 = off
    # architecture options, all off by default (benchmarks/results/llm_architecture.md measures them)
    mlp_hidden_last: int = 0  # pyramid: dense MLP widths grow linearly from mlp_hidden to this at the last layer
    depth_init: bool = False  # output projections start at init_std / sqrt(2 (layer + 1)), not at zero
    gated_attn: bool = False  # a per-head sigmoid gate on attention outputs, from the block's input
    sandwich_norm: bool = False  # RMSNorm after each sub-block too, before the residual add
    embed_scale: bool = False  # token embeddings times sqrt(d_model) on the way in
    value_embeds: int = 0  # N value-embedding tables, added to the values of the first N and last N layers
    residual_scalars: bool = False  # learnable x = a_i x + b_i x0 before block i (a = 1, b = 0 at start)
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0 = off

    def __post_init__(self):
        if min(self.n_heads, self.n_kv_heads) <= 0:
            raise ConfigError(f"model.n_heads ({self.n_heads}) and model.n_kv_heads ({self.n_kv_heads}) must be positive")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("model: the head dimension (d_model / n_heads) must be even for RoPE")
        if self.loss_chunk < 0:
            raise ConfigError(f"model.loss_chunk must be 0 (off) or positive, got {self.loss_chunk}")
        if min(self.d_model, self.n_layers, self.mlp_hidden) <= 0:
            raise ConfigError("model: d_model, n_layers and mlp_hidden must be positive")
        if self.mlp_hidden_last < 0 or self.value_embeds < 0 or not 0.0 <= self.logit_softcap < float("inf"):
            raise ConfigError("model: mlp_hidden_last and value_embeds must not be negative, logit_softcap must be >= 0 and finite")
        if self.value_embeds > self.n_layers:
            raise ConfigError(f"model.value_embeds ({self.value_embeds}) exceeds n_layers ({self.n_layers})")
        if self.depth_init and self.zero_init_out:
            raise ConfigError("model.depth_init sets the output projections' scale; it needs model.zero_init_out = false")
        if self.moe_experts:
            if not 1 <= self.moe_top_k <= self.moe_experts:
                raise ConfigError(f"model.moe_top_k must be in [1, moe_experts={self.moe_experts}], got {self.moe_top_k}")
            if min(self.moe_hidden, self.moe_shared_experts, self.moe_dense_layers) < 0 or self.moe_experts < 0:
                raise ConfigError("model: moe_experts, moe_hidden, moe_shared_experts and moe_dense_layers must not be negative")
            for name in ("moe_capacity_factor", "moe_aux_weight", "moe_z_weight", "moe_bias_rate"):
                if not 0.0 <= getattr(self, name) < float("inf"):  # NaN fails too
                    raise ConfigError(f"model.{name} must be a finite number >= 0, got {getattr(self, name)}")
            if 0 < self.moe_capacity_factor < 1:
                raise ConfigError(f"model.moe_capacity_factor must be 0 (dropless) or at least 1, got {self.moe_capacity_factor}")


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, max_seq_len: int):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ConfigError("model.vocab_size must be set (it normally comes from the tokenizer)")
        self.cfg, self.max_seq_len = cfg, max_seq_len
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, mlp=self._mlp(i), mlp_hidden=self.mlp_width(i),
                  qk_norm=cfg.qk_norm, causal=True, gated_attn=cfg.gated_attn, sandwich_norm=cfg.sandwich_norm)
            for i in range(cfg.n_layers))
        kv_dim = cfg.n_kv_heads * (cfg.d_model // cfg.n_heads)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, kv_dim) for _ in range(cfg.value_embeds))
        if cfg.residual_scalars:
            self.resid_scale = nn.Parameter(torch.ones(cfg.n_layers))
            self.x0_scale = nn.Parameter(torch.zeros(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, std=cfg.init_std, zero_init_out=cfg.zero_init_out)
        if cfg.depth_init:  # deeper blocks write smaller updates; every layer keeps a non-zero scale
            for i, block in enumerate(self.blocks):
                std = cfg.init_std / (2 * (i + 1)) ** 0.5
                nn.init.normal_(block.attn.o.weight, std=std)
                down = block.mlp.down
                nn.init.normal_(down if isinstance(down, nn.Parameter) else down.weight, std=std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        elif cfg.zero_init_out:
            nn.init.zeros_(self.lm_head.weight)  # untied head starts at uniform predictions
        cos, sin = rope_1d(max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    cache_class = KVCache  # a subclass may keep more per-row state while decoding

    def mlp_width(self, layer: int) -> int:
        """The dense MLP's hidden width at a layer: mlp_hidden, or the pyramid's (multiples of 64)."""
        c = self.cfg
        if not c.mlp_hidden_last or c.n_layers == 1:
            return c.mlp_hidden
        width = c.mlp_hidden + (c.mlp_hidden_last - c.mlp_hidden) * layer / (c.n_layers - 1)
        return max(64, int(round(width / 64)) * 64)

    def value_table(self, layer: int) -> int | None:
        """Which value-embedding table a layer adds (modded-nanogpt's pattern: the first N layers
        and again the last N), or None."""
        n, last = self.cfg.value_embeds, self.cfg.n_layers - self.cfg.value_embeds
        if layer < n:
            return layer
        return layer - last if n and layer >= last else None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.lm_head(h)
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(out.float() / cap) if cap else out

    def _mlp(self, layer: int) -> str | nn.Module:
        c = self.cfg
        if not c.moe_experts or layer < c.moe_dense_layers:
            return c.mlp
        hidden = c.moe_hidden or c.mlp_hidden
        shared = MLPS[c.mlp](c.d_model, hidden * c.moe_shared_experts) if c.moe_shared_experts else None
        return MoE(c.d_model, hidden, c.moe_experts, c.moe_top_k, mlp=c.mlp, capacity_factor=c.moe_capacity_factor,
                   aux_weight=c.moe_aux_weight, z_weight=c.moe_z_weight, bias_rate=c.moe_bias_rate, shared_mlp=shared)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, b.mlp) for i, b in enumerate(self.blocks) if isinstance(b.mlp, MoE)]

    def after_optimizer_step(self) -> None:
        """Called by the trainer after each update: the MoE balancing biases move."""
        for _, moe in self.moe_layers():
            moe.update_bias()

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        c = self.cfg
        return self.cache_class(c.n_layers, batch, c.n_kv_heads, max_len or self.max_seq_len, c.d_model // c.n_heads,
                       device=self.tok_emb.weight.device, dtype=dtype or self.tok_emb.weight.dtype)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, targets: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for tokens idx [B, T]; with a cache, idx continues what it holds. With
        targets [B, T], the mean cross-entropy instead, computed without the full logits when
        loss_chunk > 0. doc_ids [B, T] keeps attention inside each packed document."""
        h = self.hidden(idx, cache, doc_ids)
        if targets is None:
            return self.logits(h)
        if self.cfg.loss_chunk:
            loss = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.cfg.loss_chunk,
                                        self.cfg.logit_softcap)
        else:
            loss = F.cross_entropy(self.logits(h).float().flatten(0, 1), targets.flatten())
        for _, moe in self.moe_layers():  # the balancing and z losses of this forward pass
            loss = loss + moe.aux_loss
        return loss

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final normed hidden states [B, T, D], what the output layer reads."""
        t = idx.shape[1]
        start = cache.pos if cache is not None else 0
        if start + t > self.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds the model's max_seq_len {self.max_seq_len}")
        if doc_ids is not None and cache is not None:
            raise ValueError("document masking is for training rows, not cached decoding")
        rope = self.rope_tables(idx, start, cache)
        mask = document_causal_mask(doc_ids) if doc_ids is not None else None
        x = self.tok_emb(idx)
        if self.cfg.embed_scale:
            x = x * self.cfg.d_model ** 0.5
        x0 = x
        for i, block in enumerate(self.blocks):
            if self.cfg.residual_scalars:
                x = self.resid_scale[i] * x + self.x0_scale[i] * x0
            table = self.value_table(i)
            ve = self.value_embeds[table](idx) if table is not None else None
            x = block(x, rope, cache, i, mask=mask, value_extra=ve)
        if cache is not None:
            cache.pos += t
        return self.norm(x)

    def rope_tables(self, idx: torch.Tensor, start: int, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for tokens idx at positions start.. (1-D); a subclass may place tokens elsewhere."""
        t = idx.shape[1]
        return self.rope_cos[start:start + t], self.rope_sin[start:start + t]


def matmul_flops_per_token(model: Decoder, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) for model FLOPs utilisation.

    6 x every matmul weight (output head included, embedding lookup excluded) plus the attention
    scores and weighted sum, 12 x layers x width x sequence (PaLM's accounting, causal not halved).
    """
    c = model.cfg
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    matmul += sum(p.numel() * moe.top_k // moe.n_experts for _, moe in model.moe_layers()
                  for p in moe.expert_weights())  # the k experts a token reaches
    return 6 * matmul + 12 * c.n_layers * c.d_model * seq_len


def active_params(model: Decoder) -> int:
    """Parameters one token uses: all but the experts it is not routed to."""
    unused = sum(p.numel() * (moe.n_experts - moe.top_k) // moe.n_experts for _, moe in model.moe_layers()
                 for p in moe.expert_weights())
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - unused
