"""The two sequence layouts, all of one length so that a batch needs no attention mask:

    text-to-image   <pad>... <bos> caption <seg_start> v_1 ... v_64 <seg_end> <eos>
    image-to-text   <bos> <seg_start> v_1 ... v_64 <seg_end> caption <eos> <pad>...

The text-to-image caption is padded on the left, so the image always starts at the same position
and a batch of prompts (conditional and unconditional) can be decoded together; the padding of
image-to-text sits after <eos>, where causal attention never lets it matter. With classifier-free
guidance the caption is the single token <empty>.

Every token also gets a kind, saying how it is trained when it is the target: the image a
text-to-image sequence draws (VISUAL), the caption an image-to-text sequence writes and its <eos>
(TEXT), and what is given rather than written (IGNORE: padding, <bos>, segment markers, which the
samplers force, and the text-to-image prompt). The image an image-to-text sequence reads is
trained too (`input_image_loss`, on by default): it is then an unconditional image, like the
<empty>-caption ones; turned off, class accuracy was the same and zero-shot accuracy lower
(`debug`, 2 seeds, benchmarks/results/multimodal.md).
"""

from __future__ import annotations

import torch

from .vocab import Vocabulary

IGNORE, TEXT, VISUAL = 0, 1, 2


class SequenceLayout:
    def __init__(self, vocab: Vocabulary, max_caption_tokens: int, input_image_loss: bool = True):
        self.vocab, self.max_caption, self.input_image_loss = vocab, max_caption_tokens, input_image_loss
        self.length = max_caption_tokens + 4 + vocab.tokens_per_image  # tokens in every sequence
        self.prompt_length = max_caption_tokens + 2  # a text-to-image prompt, up to and with <seg_start>

    def _check_caption(self, caption: list[int]) -> None:
        if len(caption) > self.max_caption:
            raise ValueError(f"caption of {len(caption)} tokens; this model takes at most {self.max_caption}")
        if any(not 0 <= t < self.vocab.text_size for t in caption):
            raise ValueError("caption ids must be text token ids")

    def text_to_image_prompt(self, caption: list[int] | None) -> list[int]:
        """[pad..., bos, caption or <empty>, seg_start] of prompt_length tokens."""
        v = self.vocab
        body = [v.empty] if caption is None else list(caption)
        if caption is not None:
            self._check_caption(caption)
        return [v.pad] * (self.max_caption - len(body)) + [v.bos, *body, v.seg_start]

    def image_to_text_prompt(self, codes: torch.Tensor) -> torch.Tensor:
        """[N, tokens_per_image + 3]: bos, seg_start, the visual tokens, seg_end."""
        v = self.vocab
        n, dev = len(codes), codes.device
        return torch.cat([torch.tensor([v.bos, v.seg_start], device=dev).expand(n, 2), v.visual(codes.reshape(n, -1)),
                          torch.full((n, 1), v.seg_end, device=dev)], dim=1)

    def image_to_text_tail(self, caption: list[int]) -> list[int]:
        """[seg_end, caption, eos, pad...] of prompt_length tokens: what follows the image."""
        self._check_caption(caption)
        v = self.vocab
        return [v.seg_end, *caption, v.eos] + [v.pad] * (self.max_caption - len(caption))

    def caption_rows(self, captions: list[list[int] | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text-to-image prompts, image-to-text tails), int64 [N, prompt_length] each; a None
        caption (the empty one) has a tail of padding, which `assemble` refuses to use."""
        pad = [self.vocab.pad] * self.prompt_length
        prompts = [self.text_to_image_prompt(c) for c in captions]
        tails = [pad if c is None else self.image_to_text_tail(c) for c in captions]
        return torch.tensor(prompts, dtype=torch.long), torch.tensor(tails, dtype=torch.long)

    def assemble(self, codes: torch.Tensor, prompts: torch.Tensor, tails: torch.Tensor,
                 to_image: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, kinds), int64 [N, length]: row i is text-to-image (prompts[i], the image) when
        to_image[i], else image-to-text (the image, tails[i]). Pure tensor indexing, so a training
        batch costs no Python loop over its rows. `check=False` skips the check that every
        image-to-text row has a caption (a read of the values on the host), for a caller whose
        tails all hold one."""
        v, n = self.vocab, len(codes)
        visual = v.visual(codes.reshape(n, -1))
        if check and (~to_image & (tails[:, 0] != v.seg_end)).any():
            raise ValueError("an image-to-text sequence needs a caption")
        given = lambda *ids: torch.tensor(ids, dtype=torch.long, device=codes.device).expand(n, len(ids))
        t2i = torch.cat([prompts, visual, given(v.seg_end, v.eos)], 1)
        i2t = torch.cat([given(v.bos, v.seg_start), visual, tails], 1)
        ids = torch.where(to_image[:, None], t2i, i2t)
        vis_kind = torch.full_like(visual, VISUAL)
        t2i_kinds = torch.cat([torch.full_like(prompts, IGNORE), vis_kind, given(IGNORE, IGNORE)], 1)
        tail_kinds = torch.where((tails == v.pad) | (tails == v.seg_end), IGNORE, TEXT)
        input_kind = vis_kind if self.input_image_loss else torch.full_like(visual, IGNORE)
        i2t_kinds = torch.cat([given(IGNORE, IGNORE), input_kind, tail_kinds], 1)
        return ids, torch.where(to_image[:, None], t2i_kinds, i2t_kinds)

    def build(self, codes: torch.Tensor, captions: list[list[int] | None], to_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, kinds), both int64 [N, length], for codebook grids `codes` [N, h, w], captions (None:
        the empty caption, text-to-image only) and `to_image` [N] (True: text-to-image)."""
        return self.assemble(codes, *self.caption_rows(captions), to_image)
