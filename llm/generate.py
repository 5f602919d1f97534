"""Sampling from a Decoder: temperature, top-k, top-p, a KV cache, streamed token by token."""

from __future__ import annotations

from typing import Iterator

import torch

from .model import Decoder
from .tokenizer import TextTokenizer


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]. temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# What a forbidden token's logit becomes: finite, so that no later arithmetic (a guidance mix,
# a temperature) can meet -inf - -inf = NaN, and still far below any real logit.
FORBIDDEN = -1e9


def document_prompt(tokenizer: TextTokenizer, text: str) -> list[int]:
    """A prompt as the start of a document: training documents follow an end-of-text token."""
    return [tokenizer.eos_id, *tokenizer.encode(text)]


def until_eos(ids: list[int], eos_id: int) -> list[int]:
    """The tokens before the first eos_id (all of them when there is none)."""
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def new_token_budget(max_new_tokens: int, prompt_tokens: int, context: int) -> tuple[int, str]:
    """How many tokens `generate` can add after a prompt, and a note when that is fewer than asked
    ("" otherwise): the prompt and what follows it share the model's context."""
    room = max(context - prompt_tokens, 0)
    if max_new_tokens <= room:
        return max_new_tokens, ""
    return room, (f"note: the prompt's {prompt_tokens} tokens leave room for {room} of the {max_new_tokens} new tokens "
                  f"asked (the model's context is {context}): each sample stops there")


def real_tokens(vocab_rows: int, tokenizer_size: int, device=None) -> torch.Tensor:
    """bool [vocab_rows]: the tokenizer's ids, not the rows padded onto the embedding table."""
    return torch.arange(vocab_rows, device=device) < tokenizer_size


def restrict(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Float logits with every id outside `allowed` (bool [V]) set to FORBIDDEN."""
    logits = logits.float()
    return logits if allowed is None else logits.masked_fill(~allowed, FORBIDDEN)


@torch.no_grad()
def generate(model: Decoder, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, use_cache: bool = True, eos_id: int | None = None,
             generator: torch.Generator | None = None, allowed: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield next tokens [B] one step at a time after `prompt` [B, T].

    With the cache, the prompt is run once and each new token costs one position; without it the
    whole sequence is recomputed every step (the reference the cache is tested against). Stops
    at max_new_tokens, at the model's context length, or when every row has produced eos_id; a row
    that has yields eos_id from then on. `allowed` (bool [V]) limits what may be sampled.
    """
    model.eval()
    budget, _ = new_token_budget(max_new_tokens, prompt.shape[1], model.max_seq_len)
    if budget <= 0:
        return
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + budget) if use_cache else None
    seq, step_input = prompt, prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(budget):
        logits = restrict(model(step_input if use_cache else seq, cache)[:, -1], allowed)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(done, eos_id, nxt)
        yield nxt
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                return
