"""Writing images, writing captions and scoring captions, all KV-cached.

Images: the prompt ends with <seg_start>; exactly tokens_per_image visual tokens follow, each
sampled with every non-visual id forbidden (after the guidance mix: a finite mask there can never
meet another and give NaN), and <seg_end> is implied. Guidance is on the logits,
uncond + s * (cond - uncond), with the conditional and the <empty>-caption prompts in one batch.

Captions: after an image prompt, only text tokens and <eos> may be sampled, up to the caption
length the model was trained with.

Zero-shot: the image is run once; its cache is copied for every class, and each class scores
log p(caption <eos> | image), averaged over as many caption templates as asked.
"""

from __future__ import annotations

import torch

from llm.generate import generate, restrict, sample_next, until_eos

from .model import MultimodalDecoder
from .sequences import SequenceLayout


def guidance_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def clamp_top_k(top_k: int, codebook_size: int) -> tuple[int, str | None]:
    """top-k beyond the codebook means "all codes": clamp it, with a note for the user."""
    if top_k > codebook_size:
        return codebook_size, f"note: top_k {top_k} is larger than the codebook; using {codebook_size} (all visual tokens)"
    return top_k, None


@torch.no_grad()
def sample_images(model: MultimodalDecoder, layout: SequenceLayout, captions: list[list[int] | None], *,
                  cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Codebook grids int64 [N, h, w] for text-token captions (None: the empty caption)."""
    vocab = layout.vocab
    device = model.tok_emb.weight.device
    prompts = torch.tensor([layout.text_to_image_prompt(c) for c in captions], device=device)  # [N, P]
    guided = cfg_scale != 1.0
    if guided:
        empty = torch.tensor(layout.text_to_image_prompt(None), device=device).expand_as(prompts)
        prompts = torch.cat([prompts, empty])  # [2N, P]: conditional rows, then unconditional
    allowed = vocab.visual_mask(model.cfg.vocab_size, device)  # bool [V]
    top_k = min(top_k, vocab.codebook_size)
    n, n_vis = len(captions), vocab.tokens_per_image
    model.eval()
    cache = model.new_cache(len(prompts), prompts.shape[1] + n_vis)
    logits = model(prompts, cache)[:, -1]  # [N or 2N, V]
    out = []
    for i in range(n_vis):
        logits = logits.float()
        if guided:
            logits = guidance_mix(logits[:n], logits[n:], cfg_scale)  # [N, V]
        nxt = sample_next(restrict(logits, allowed), temperature, top_k, top_p, generator)  # [N]
        out.append(nxt)
        if i + 1 < n_vis:
            step = torch.cat([nxt, nxt]) if guided else nxt  # both halves continue with the guided token
            logits = model(step[:, None], cache)[:, -1]
    return vocab.codes(torch.stack(out, 1)).view(n, *vocab.grid)  # [N, n_vis] ids -> [N, h, w] codes


@torch.no_grad()
def write_captions(model: MultimodalDecoder, layout: SequenceLayout, codes: torch.Tensor, *, banned: tuple[int, ...] = (),
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """Text-token ids of a caption for each grid of codes [N, h, w] (greedy by default), without <eos>."""
    vocab = layout.vocab
    device = model.tok_emb.weight.device
    prompt = layout.image_to_text_prompt(codes.cpu()).to(device)  # [N, P]
    allowed = vocab.text_mask(model.cfg.vocab_size, banned, device)  # bool [V]
    steps = list(generate(model, prompt, layout.max_caption + 1, temperature, top_k, top_p, eos_id=vocab.eos,
                          generator=generator, allowed=allowed))  # [N] per step
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(len(codes))]  # [N, steps]
    return [until_eos(row, vocab.eos) for row in rows]


@torch.no_grad()
def caption_scores(model: MultimodalDecoder, layout: SequenceLayout, codes: torch.Tensor,
                   captions: list[list[list[int]]], batch_size: int = 64, templates: int = 1) -> torch.Tensor:
    """float [N, C]: for each image grid and class c, the mean over the first `templates` templates j
    of log p(captions[c][j] <eos> | image). One template is the default: every template costs one
    more pass, and the class is decided by the same name tokens in each."""
    vocab = layout.vocab
    device = model.tok_emb.weight.device
    n_cls, n_tpl = len(captions), min(templates, len(captions[0]))
    model.eval()
    scores = torch.zeros(len(codes), n_cls)
    for start in range(0, len(codes), batch_size):
        prompt = layout.image_to_text_prompt(codes[start:start + batch_size].cpu()).to(device)  # [b, P]
        b = len(prompt)
        cache = model.new_cache(b, prompt.shape[1] + layout.max_caption + 1)
        first = model(prompt, cache)[:, -1].float().log_softmax(-1)  # [b, V]: the caption's first token
        total = torch.zeros(b, n_cls, device=device)  # [b, C]
        for j in range(n_tpl):
            conts = [captions[c][j] + [vocab.eos] for c in range(n_cls)]
            width = max(len(x) for x in conts)
            ids = torch.tensor([x + [vocab.pad] * (width - len(x)) for x in conts], device=device)  # [C, W]
            valid = torch.tensor([[1.0] * len(x) + [0.0] * (width - len(x)) for x in conts], device=device)  # [C, W]
            rows = cache.repeat_rows(n_cls)  # row i * C + c continues image i with class c's caption
            ids_rows = ids.repeat(b, 1)  # [b*C, W]
            logp = first.repeat_interleave(n_cls, 0).gather(1, ids_rows[:, :1])  # [b*C, 1]
            if width > 1:
                rest = model(ids_rows[:, :-1], rows).float().log_softmax(-1)  # [b*C, W-1, V]
                logp = torch.cat([logp, rest.gather(2, ids_rows[:, 1:, None]).squeeze(2)], 1)  # [b*C, W]
            total += (logp * valid.repeat(b, 1)).sum(1).view(b, n_cls)
        scores[start:start + b] = (total / n_tpl).cpu()
    return scores
