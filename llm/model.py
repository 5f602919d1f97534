"""Blueberry: a decoder-only Llama-style language model built from shared blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from shared.blocks import Block, KVCache, RMSNorm, document_causal_mask, init_weights, rope_1d
from shared.errors import ConfigError
from shared.losses import linear_cross_entropy


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


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, max_seq_len: int):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ConfigError("model.vocab_size must be set (it normally comes from the tokenizer)")
        self.cfg, self.max_seq_len = cfg, max_seq_len
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, mlp=cfg.mlp, mlp_hidden=cfg.mlp_hidden,
                  qk_norm=cfg.qk_norm, causal=True) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, std=cfg.init_std, zero_init_out=cfg.zero_init_out)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        elif cfg.zero_init_out:
            nn.init.zeros_(self.lm_head.weight)  # untied head starts at uniform predictions
        cos, sin = rope_1d(max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    cache_class = KVCache  # a subclass may keep more per-row state while decoding

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
            return self.lm_head(h)
        if self.cfg.loss_chunk:
            return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.cfg.loss_chunk)
        return F.cross_entropy(self.lm_head(h).float().flatten(0, 1), targets.flatten())

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
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i, mask=mask)
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
    return 6 * matmul + 12 * c.n_layers * c.d_model * seq_len
