"""Blueberry: a decoder-only Llama-style language model built from shared blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from shared.blocks import (
    MLPS,
    Block,
    KVCache,
    RMSNorm,
    document_causal_mask,
    init_weights,
    rope_1d,
)
from shared.contracts import ModelHooks
from shared.errors import ConfigError
from shared.losses import linear_cross_entropy
from shared.moe import MoE, MoEConfig


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
    moe: MoEConfig | None = None  # [model.moe]: mixture-of-experts MLPs (shared/moe.py); None = dense
    # architecture options, all off by default (benchmarks/results/llm_architecture.md measures them)
    mlp_hidden_last: int = 0  # pyramid: dense MLP widths grow linearly from mlp_hidden to this at the last layer
    depth_init: bool = False  # output projections start at init_std / sqrt(2 (layer + 1)), not at zero
    gated_attn: bool = False  # a per-head sigmoid gate on attention outputs, from the block's input
    sandwich_norm: bool = False  # RMSNorm after each sub-block too, before the residual add
    # token embeddings times sqrt(d_model) on the way in: 5-dollar-llm's recipe (5dollar-88m) has it; on
    # top of embed_norm it loses on real text (p = 0.001, llm_recipe.md), so no Blueberry recipe uses it
    embed_scale: bool = False
    value_embeds: int = 0  # N value-embedding tables, added to the values of the first N and last N layers
    residual_scalars: bool = False  # learnable x = a_i x + b_i x0 before block i (a = 1, b = 0 at start)
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0 = off
    # from nanochat (karpathy/nanochat, nanochat/gpt.py at 92d63d4), measured in
    # benchmarks/results/llm_recipe.md
    embed_norm: bool = False  # a weight-free RMSNorm on the token embeddings
    qk_scale: float = 1.0  # q and k times this after QK-norm (nanochat: 1.2)
    smear: bool = False  # each embedding adds its predecessor's, through a gate read from its first channels
    value_gate: bool = False  # value embeddings scaled per KV head by a gate (needs value_embeds)
    # "nanochat": q, k, v and value tables uniform with std 1 / sqrt(d_model), the MLP's input 0.4 times
    # that, an untied embedding N(0, 0.8) and head N(0, 0.001) (tied, they keep init_std);
    # "normal": everything N(0, init_std)
    init: Literal["normal", "nanochat"] = "normal"
    # residual_scalars' start: "identity" (a = 1, b = 0) or "nanochat" (a from 1.15 down to 1.05,
    # b from 0.20 down to 0.05 over the layers)
    residual_init: Literal["identity", "nanochat"] = "identity"
    # Muon orthogonalises each block's q, k, v and o as one [q + 2 kv + o, d] matrix, as 5-dollar-llm's
    # merged qkvo parameter has it (the weights stay four matrices: checkpoints and exports are unchanged)
    merged_qkvo: bool = False

    # old runs' config.toml files (and old overrides) wrote the MoE settings flat, as moe_experts, ...
    RENAMED: ClassVar[dict[str, str]] = {f"moe_{k}": f"moe.{k}" for k in (
        "experts", "top_k", "hidden", "shared_experts", "dense_layers", "capacity_factor", "aux_weight", "z_weight",
        "bias_rate")}

    def __post_init__(self):
        if self.moe is not None and self.moe.experts == 0:
            self.moe = None  # no experts: dense
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
        if not 0.0 < self.qk_scale < float("inf"):
            raise ConfigError(f"model.qk_scale must be positive and finite, got {self.qk_scale}")
        if self.value_gate and not self.value_embeds:
            raise ConfigError("model.value_gate gates value embeddings: set model.value_embeds too")
        if self.residual_init != "identity" and not self.residual_scalars:
            raise ConfigError("model.residual_init starts the residual scalars: set model.residual_scalars = true too")
        if self.depth_init and self.zero_init_out:
            raise ConfigError("model.depth_init sets the output projections' scale; it needs model.zero_init_out = false")


class Decoder(ModelHooks, nn.Module):
    # 2-D weights AdamW trains, not Muon (shared.optim.split_params): the output head (an untied
    # one; a tied one is the embedding) and the MoE routers; embeddings are nn.Embedding already
    ADAM_NAMES = ("lm_head", "router", "smear_gate")
    HEAD_NAMES = ("lm_head",)  # what optim.head_lr trains
    SMEAR_CHANNELS = 24  # the smear gate reads this many channels of each embedding (nanochat's)

    def __init__(self, cfg: DecoderConfig, max_seq_len: int):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ConfigError("model.vocab_size must be set (it normally comes from the tokenizer)")
        self.cfg, self.max_seq_len = cfg, max_seq_len
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, mlp=self._mlp(i), mlp_hidden=self.mlp_width(i),
                  qk_norm=cfg.qk_norm, causal=True, gated_attn=cfg.gated_attn, sandwich_norm=cfg.sandwich_norm,
                  qk_scale=cfg.qk_scale, value_gate=cfg.value_gate and self.value_table(i) is not None)
            for i in range(cfg.n_layers))
        kv_dim = cfg.n_kv_heads * (cfg.d_model // cfg.n_heads)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, kv_dim) for _ in range(cfg.value_embeds))
        if cfg.residual_scalars:
            self.resid_scale = nn.Parameter(torch.ones(cfg.n_layers))
            self.x0_scale = nn.Parameter(torch.zeros(cfg.n_layers))
        if cfg.smear:  # the mix starts at zero: lambda = 0
            self.smear_gate = nn.Linear(min(cfg.d_model, self.SMEAR_CHANNELS), 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, std=cfg.init_std, zero_init_out=cfg.zero_init_out)
        if cfg.init == "nanochat":
            self._init_nanochat()
        if cfg.residual_init == "nanochat":
            with torch.no_grad():
                depth = torch.arange(cfg.n_layers) / max(cfg.n_layers - 1, 1)
                self.resid_scale.copy_(1.15 - 0.10 * depth)
                self.x0_scale.copy_(0.20 - 0.15 * depth)
        if cfg.depth_init:  # deeper blocks write smaller updates; every layer keeps a non-zero scale
            for i, block in enumerate(self.blocks):
                std = cfg.init_std / (2 * (i + 1)) ** 0.5
                nn.init.normal_(block.attn.o.weight, std=std)
                down = block.mlp.down
                nn.init.normal_(down if isinstance(down, nn.Parameter) else down.weight, std=std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        elif cfg.init == "nanochat":
            nn.init.normal_(self.lm_head.weight, std=0.001)
        elif cfg.zero_init_out:
            nn.init.zeros_(self.lm_head.weight)  # untied head starts at uniform predictions
        cos, sin = rope_1d(max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    cache_class = KVCache  # a subclass may keep more per-row state while decoding

    @torch.no_grad()
    def _init_nanochat(self) -> None:
        """Uniform weights (no outliers) with nanochat's scales: std 1 / sqrt(d_model) for what reads
        the residual stream, 0.4 times that for the MLP's input (nanochat/gpt.py, init_weights)."""
        bound = 3 ** 0.5 * self.cfg.d_model ** -0.5  # U(-b, b) has std b / sqrt(3)
        for block in self.blocks:
            for w in (block.attn.q.weight, block.attn.k.weight, block.attn.v.weight):
                nn.init.uniform_(w, -bound, bound)
            # a dense MLP's input matrices; a mixture's: its experts' (stacked) and its shared experts'
            for mlp in (block.mlp, getattr(block.mlp, "shared", None)):
                for name in ("up", "gate"):
                    w = getattr(mlp, name, None)
                    w = w.weight if isinstance(w, nn.Linear) else w
                    if w is not None:
                        nn.init.uniform_(w, -0.4 * bound, 0.4 * bound)
        for table in self.value_embeds:
            nn.init.uniform_(table.weight, -bound, bound)
        if not self.cfg.tie_embeddings:  # an untied embedding N(0, 0.8) (nanochat normalises it on the way in)
            nn.init.normal_(self.tok_emb.weight, std=0.8)

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
        c, m = self.cfg, self.cfg.moe
        if m is None or layer < m.dense_layers:
            return c.mlp
        hidden = m.hidden or c.mlp_hidden
        shared = MLPS[c.mlp](c.d_model, hidden * m.shared_experts) if m.shared_experts else None
        return MoE(c.d_model, hidden, m.experts, m.top_k, mlp=c.mlp, capacity_factor=m.capacity_factor,
                   aux_weight=m.aux_weight, z_weight=m.z_weight, bias_rate=m.bias_rate, shared_mlp=shared)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, b.mlp) for i, b in enumerate(self.blocks) if isinstance(b.mlp, MoE)]

    def muon_merged(self) -> list[list[nn.Parameter]]:
        """With merged_qkvo: each block's q, k, v, o weights, in 5-dollar-llm's row order."""
        if not self.cfg.merged_qkvo:
            return []
        return [[b.attn.q.weight, b.attn.k.weight, b.attn.v.weight, b.attn.o.weight] for b in self.blocks]

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
        rope = self.rope_tables(idx, start, cache)  # cos, sin [T, hd/2] (or [B, T, hd/2])
        mask = document_causal_mask(doc_ids) if doc_ids is not None else None  # [B, 1, T, T] or a block mask
        x = self.tok_emb(idx)  # [B, T, D]
        if self.cfg.embed_norm:
            x = F.rms_norm(x, (x.shape[-1],), eps=self.norm.eps)
        if self.cfg.embed_scale:
            x = x * self.cfg.d_model ** 0.5
        if self.cfg.smear:
            x = self.smear(x, cache)
        x0 = x  # [B, T, D]
        for i, block in enumerate(self.blocks):
            if self.cfg.residual_scalars:
                x = self.resid_scale[i] * x + self.x0_scale[i] * x0
            table = self.value_table(i)
            ve = self.value_embeds[table](idx) if table is not None else None  # [B, T, kv_heads * hd]
            x = block(x, rope, cache, i, mask=mask, value_extra=ve)  # [B, T, D]
        if cache is not None:
            cache.pos += t
        return self.norm(x)  # [B, T, D]

    def smear(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """x [B, T, D] with each position's predecessor added, scaled by lambda * sigmoid(gate); the
        first position of a sequence has none. While decoding, the cache holds the last embedding."""
        before = cache.prev if cache is not None else None  # [B, 1, D] or None
        if cache is not None:
            cache.prev = x[:, -1:]
        prev = x[:, :-1] if before is None else torch.cat([before, x[:, :-1]], 1)
        cur = x[:, 1:] if before is None else x
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(cur[..., :self.smear_gate.in_features]))  # [B, T', 1]
        mixed = cur + gate * prev
        return mixed if before is not None else torch.cat([x[:, :1], mixed], 1)

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
