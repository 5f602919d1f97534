"""The multimodal decoder: the LLM's Decoder over the joint vocabulary, with 2-D rotary positions
for visual tokens as an option.

With `rope_2d`, a visual token is rotated by its (row, column) in the VQ grid, half of each head's
rotated pairs per axis (shared.blocks.rope_2d), so attention inside the image depends on 2-D
offsets; text keeps 1-D positions. A token's cell is counted from the visual tokens before it in
its sequence (one image per sequence), which a cache carries across decoding steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm.model import Decoder, DecoderConfig
from shared.blocks import KVCache, rope_2d
from shared.errors import ConfigError

from .vocab import Vocabulary


@dataclass
class MultimodalModelConfig(DecoderConfig):
    rope_2d: bool = False  # 2-D rotary positions for visual tokens (text keeps 1-D)

    def __post_init__(self):
        super().__post_init__()
        if self.rope_2d and (self.d_model // self.n_heads) % 4:
            raise ConfigError("model.rope_2d needs a head dimension (d_model / n_heads) divisible by 4")


class SegmentCache(KVCache):
    """A KV cache that also counts each row's visual tokens so far (their grid cells)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.visual_seen = torch.zeros(self.k.shape[1], dtype=torch.long, device=self.k.device)

    def repeat_rows(self, repeats: int) -> "SegmentCache":
        new = super().repeat_rows(repeats)
        new.visual_seen = self.visual_seen.repeat_interleave(repeats)
        return new


class MultimodalDecoder(Decoder):
    cache_class = SegmentCache

    def __init__(self, cfg: MultimodalModelConfig, max_seq_len: int, vocab: Vocabulary):
        if cfg.vocab_size < vocab.size:
            raise ConfigError(f"model.vocab_size {cfg.vocab_size} is smaller than the joint vocabulary ({vocab.size})")
        super().__init__(cfg, max_seq_len)
        self.vocab = vocab
        if cfg.rope_2d:
            cos, sin = rope_2d(*vocab.grid, cfg.d_model // cfg.n_heads, cfg.rope_theta)
            self.register_buffer("rope2d_cos", cos, persistent=False)
            self.register_buffer("rope2d_sin", sin, persistent=False)

    def rope_tables(self, idx: torch.Tensor, start: int, cache: KVCache | None):
        if not self.cfg.rope_2d:
            return super().rope_tables(idx, start, cache)
        t = idx.shape[1]
        visual = self.vocab.is_visual(idx)
        before = cache.visual_seen[:, None] if isinstance(cache, SegmentCache) else 0
        cell = (before + visual.long().cumsum(1) - 1).clamp(0, self.rope2d_cos.shape[0] - 1)
        cos = torch.where(visual[..., None], self.rope2d_cos[cell], self.rope_cos[start:start + t][None])
        sin = torch.where(visual[..., None], self.rope2d_sin[cell], self.rope_sin[start:start + t][None])
        if isinstance(cache, SegmentCache):
            cache.visual_seen += visual.sum(1)
        return cos, sin
