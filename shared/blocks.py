"""Transformer building blocks shared by every package.

RMSNorm, rotary embeddings (1-D for text, 2-D for image grids), grouped-query attention with
optional QK-norm and a KV cache, SwiGLU / squared-ReLU MLPs, and a pre-norm block that can take
adaLN modulation (used by the DiT). Nothing here knows about text or images.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .muon import STACKED

class RMSNorm(nn.RMSNorm):
    """torch's fused RMSNorm with a fixed eps: its default (the input dtype's epsilon) would be
    7.8e-3 for bf16 activations under autocast but 1.2e-7 in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)


# --------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------


def rope_angles(positions: torch.Tensor, dim: int, theta: float = 10_000.0) -> torch.Tensor:
    """Rotation angles [len(positions), dim // 2] for integer or fractional positions."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return (positions.to(torch.float64)[:, None] * inv_freq[None, :]).float()


def rope_1d(seq_len: int, head_dim: int, theta: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [seq_len, head_dim // 2] for text positions 0..seq_len-1."""
    angles = rope_angles(torch.arange(seq_len), head_dim, theta)
    return angles.cos(), angles.sin()


def rope_2d(height: int, width: int, head_dim: int, theta: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [height * width, head_dim // 2] for a row-major grid.

    Half of the rotated pairs encode the row, half the column, so attention between two cells
    depends only on their (row, column) offset.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    a_row = rope_angles(rows.flatten(), head_dim // 2, theta)
    a_col = rope_angles(cols.flatten(), head_dim // 2, theta)
    angles = torch.cat([a_row, a_col], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by tables [T, D/2], or [B, T, D/2] when every row has positions of
    its own (half-split layout: pairs are (i, i + D/2))."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    cos, sin = cos.to(x.device), sin.to(x.device)
    if cos.ndim == 3:  # per-row tables broadcast over the heads
        cos, sin = cos[:, None], sin[:, None]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


class KVCache:
    """Pre-allocated keys and values for every layer of one decoder, for incremental decoding."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # tokens already stored; advanced by the model after all layers ran
        self.prev: torch.Tensor | None = None  # [B, 1, D] the last position's input, for a model that mixes it into the next

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {t} tokens > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:self.pos + t] = k
        self.v[layer, :, :, self.pos:self.pos + t] = v
        return self.k[layer, :, :, :self.pos + t], self.v[layer, :, :, :self.pos + t]

    def repeat_rows(self, repeats: int) -> "KVCache":
        """A new cache whose row i * repeats + j is a copy of row i: one shared prefix (an image)
        continued by several sequences (one caption per class) without recomputing it."""
        new = copy.copy(self)
        new.k = self.k.repeat_interleave(repeats, dim=1)
        new.v = self.v.repeat_interleave(repeats, dim=1)
        if self.prev is not None:
            new.prev = self.prev.repeat_interleave(repeats, dim=0)
        return new


def document_causal_mask(doc_ids: torch.Tensor, flex: bool | None = None):
    """Causal attention that stays inside each document of a packed row; doc_ids [B, T] numbers
    the documents. On a GPU inside torch.compile (or with flex=True) it is a FlexAttention block
    mask: blocks of other documents are skipped, not computed and masked. Otherwise a dense
    [B, 1, T, T] boolean mask for scaled_dot_product_attention, the correct slower path (FlexAttention
    has no backward on the CPU, and uncompiled it materialises the scores)."""
    b, t = doc_ids.shape
    if flex is None:
        flex = doc_ids.is_cuda and torch.compiler.is_compiling()
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(bi, h, q, kv):
            return (q >= kv) & (doc_ids[bi, q] == doc_ids[bi, kv])

        return create_block_mask(same_document_causal, b, None, t, t, device=doc_ids.device)
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float | None = None) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa, scale=scale)


class Attention(nn.Module):
    """Multi-head attention with grouped-query KV heads, optional QK-norm and RoPE.

    `gated`: each head's output is scaled by a sigmoid gate computed from the block's input
    (Qiu et al. 2025, "gated attention"), which lets a head output nothing instead of attending
    to a sink token. `qk_scale`: q and k times this (nanochat's 1.2 after QK-norm), so the logits
    sharpen by its square. `value_gate`: value embeddings scaled per KV head by 3 sigmoid(a linear
    map of the input's first VALUE_GATE_CHANNELS channels), as nanochat gates them."""

    VALUE_GATE_CHANNELS = 12

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, *, qk_norm: bool = True,
                 causal: bool = True, bias: bool = False, gated: bool = False, qk_scale: float = 1.0,
                 value_gate: bool = False):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if dim % n_heads:
            raise ValueError(f"n_heads ({n_heads}) must divide the width ({dim})")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.causal = causal
        self.q = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.k = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.v = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.o = nn.Linear(n_heads * self.head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.gate = nn.Linear(dim, n_heads, bias=True) if gated else None
        self.value_gate = nn.Linear(min(dim, self.VALUE_GATE_CHANNELS), n_kv_heads, bias=False) if value_gate else None
        # None: SDPA's default 1 / sqrt(head_dim)
        self.scale = qk_scale ** 2 / self.head_dim ** 0.5 if qk_scale != 1.0 else None

    def _out(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Heads y [B, H, T, hd] -> the output projection, through the gate when there is one."""
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x)).transpose(1, 2)[..., None]
        return self.o(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, mask=None,
                value_extra: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (from `document_causal_mask`) replaces the causal rule, for packed training rows.
        `value_extra` [B, T, kv_heads * hd] is added to the values (value embeddings)."""
        b, t, _ = x.shape  # x [B, T, D]
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        # the values and their extra added as [B, T, Hkv, hd]: gating a flat [B, T, Hkv * hd] extra through
        # a view made torch 2.11's CPU inductor fail ("unexpected group")
        v = self.v(x).view(b, t, self.n_kv_heads, self.head_dim)  # [B, T, Hkv, hd]
        if value_extra is not None:
            value_extra = value_extra.view(b, t, self.n_kv_heads, self.head_dim)
            if self.value_gate is not None:
                gate = 3 * torch.sigmoid(self.value_gate(x[..., :self.value_gate.in_features]))  # [B, T, Hkv]
                value_extra = value_extra * gate[..., None]
            v = v + value_extra
        v = v.transpose(1, 2)  # [B, Hkv, T, hd]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # CUDA autocast runs rms_norm in fp32, so q and k leave QK-norm fp32 while v is bf16: SDPA
        # would cast back, FlexAttention refuses mixed dtypes (or picks fp32 kernels)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if mask is not None:
            return self._out(x, _masked_attention(q, k, v, mask, self.scale))  # [B, T, D]
        start = cache.pos if cache is not None else 0
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, Hkv, start + T, hd]: the cached keys and values too
            k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may have been allocated outside autocast
        mask, is_causal = None, False
        if self.causal:
            if start == 0:
                is_causal = True  # queries and keys are aligned: the plain lower triangle
            elif t > 1:  # a chunk after cached tokens: query i sees keys 0..start+i
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)  # [T, start + T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # [B, H, T, hd]
        return self._out(x, y)  # [B, T, D]


# --------------------------------------------------------------------------------------------
# MLPs and the block
# --------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ReLU2MLP(nn.Module):
    """Squared-ReLU MLP (Primer; used by modded-nanogpt and nanochat)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


MLPS = {"swiglu": SwiGLU, "relu2": ReLU2MLP}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample shift and scale [B, D] applied to every token of x [B, T, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). With `sandwich_norm`
    each sub-block's output is normed too before it joins the residual stream: x + norm(attn(norm(x))).

    With `modulation` [B, 6, D] (shift, scale, gate for attention, then for the MLP) it is an
    adaLN block as in DiT; the caller owns the conditioning network that produces it.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, *, mlp: str | nn.Module = "swiglu",
                 mlp_hidden: int | None = None, qk_norm: bool = True, causal: bool = True,
                 norm_affine: bool = True, gated_attn: bool = False, sandwich_norm: bool = False,
                 qk_scale: float = 1.0, value_gate: bool = False):
        """`mlp`: a name in MLPS, or a module taking [B, T, D] to [B, T, D] (a mixture of experts)."""
        super().__init__()
        if isinstance(mlp, str) and mlp not in MLPS:
            raise ValueError(f"unknown mlp {mlp!r}; choose one of {sorted(MLPS)}")
        self.norm1 = RMSNorm(dim, elementwise_affine=norm_affine)
        self.attn = Attention(dim, n_heads, n_kv_heads, qk_norm=qk_norm, causal=causal, gated=gated_attn,
                              qk_scale=qk_scale, value_gate=value_gate)
        self.norm2 = RMSNorm(dim, elementwise_affine=norm_affine)
        self.post_norm1 = RMSNorm(dim) if sandwich_norm else nn.Identity()
        self.post_norm2 = RMSNorm(dim) if sandwich_norm else nn.Identity()
        self.mlp = mlp if isinstance(mlp, nn.Module) else MLPS[mlp](dim, mlp_hidden or 4 * dim)

    def forward(self, x: torch.Tensor, rope=None, cache: KVCache | None = None, layer: int = 0,
                modulation: torch.Tensor | None = None, mask=None, value_extra: torch.Tensor | None = None) -> torch.Tensor:
        if modulation is None:
            x = x + self.post_norm1(self.attn(self.norm1(x), rope, cache, layer, mask, value_extra))
            return x + self.post_norm2(self.mlp(self.norm2(x)))
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.unbind(1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope, cache, layer)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


def init_weights(module: nn.Module, std: float = 0.02, zero_init_out: bool = True) -> None:
    """Normal(0, std) for linear and embedding weights and stacked expert matrices, zero biases;
    with `zero_init_out` the projections that write into the residual stream start at zero, so
    every block starts as the identity (as in modded-nanogpt and nanochat)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        for p in m.parameters(recurse=False):
            if getattr(p, STACKED, False):
                nn.init.normal_(p, mean=0.0, std=std)
    if zero_init_out:
        for m in module.modules():
            if isinstance(m, Attention):
                nn.init.zeros_(m.o.weight)
            elif isinstance(m, (SwiGLU, ReLU2MLP)):
                nn.init.zeros_(m.down.weight)
            elif getattr(getattr(m, "down", None), STACKED, False):  # experts' output projections
                nn.init.zeros_(m.down)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of scalar inputs t [B] (timesteps, for example)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))
