"""The language-modelling task for the shared trainer: loss, evaluation and text samples."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.contracts import Task
from shared.metrics import MetricsLogger

from .generate import document_prompt, generate, real_tokens, until_eos
from .model import Decoder
from .tokenizer import TextTokenizer

EVAL_CHUNK = 4096  # tokens whose logits exist at once during evaluation


class LanguageModelTask(Task):
    unit = "tokens"

    def __init__(self, val_rows: torch.Tensor, tokenizer: TextTokenizer, eval_batch_size: int = 16,
                 sample_prompts: tuple[str, ...] = ("Once upon a time",), sample_tokens: int = 64,
                 doc_mask: bool = False, eos_id: int | None = None):
        self.val_rows, self.tokenizer = val_rows, tokenizer
        self.eval_batch_size, self.sample_prompts, self.sample_tokens = eval_batch_size, sample_prompts, sample_tokens
        self.doc_mask = doc_mask
        self.eos_id = eos_id if eos_id is not None else (tokenizer.eos_id if tokenizer is not None else None)
        if doc_mask and self.eos_id is None:
            raise ValueError("document masking needs the end-of-text id")

    def doc_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        """Document numbers of a packed row: an EOS opens the next document, so it is what the
        first token of a document sees, as at generation (prompts start after an EOS)."""
        return (x == self.eos_id).cumsum(1) if self.doc_mask else None

    def loss(self, model: Decoder, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return model(x, targets=y, doc_ids=self.doc_ids(x))

    def train_metrics(self, model: Decoder) -> dict:
        """The routing figures the mixture-of-experts layers gathered since the last call."""
        return {f"moe/layer{i}/{k}": v for i, moe in model.moe_layers() for k, v in moe.pop_stats().items()}

    @torch.no_grad()
    def evaluate(self, model: Decoder) -> dict[str, float]:
        """Mean loss, next-token accuracy and perplexity over the fixed validation rows."""
        device = next(model.parameters()).device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one sync at the end
        correct, count = torch.zeros((), dtype=torch.long, device=device), 0
        for i in range(0, len(self.val_rows), self.eval_batch_size):
            rows = self.val_rows[i:i + self.eval_batch_size].to(device)
            x, y = rows[:, :-1], rows[:, 1:].flatten()
            h = model.hidden(x, doc_ids=self.doc_ids(x)).flatten(0, 1)
            for s in range(0, len(h), EVAL_CHUNK):  # one chunk of logits at a time
                logits = model.logits(h[s:s + EVAL_CHUNK]).float()
                loss_sum += F.cross_entropy(logits, y[s:s + EVAL_CHUNK], reduction="sum")
                correct += (logits.argmax(-1) == y[s:s + EVAL_CHUNK]).sum()
            count += y.numel()
        loss, correct = float(loss_sum) / count, int(correct)
        return {"loss": loss, "accuracy": correct / count, "perplexity": math.exp(min(loss, 50.0))}

    @torch.no_grad()
    def sample(self, model: Decoder, step: int, run_dir: Path, logger: MetricsLogger) -> None:
        device = next(model.parameters()).device
        g = torch.Generator(device=device).manual_seed(0)
        allowed = real_tokens(model.cfg.vocab_size, self.tokenizer.vocab_size, device)
        texts = []
        for prompt in self.sample_prompts:
            ids = torch.tensor([document_prompt(self.tokenizer, prompt)], device=device)
            out = [int(t) for t in generate(model, ids, self.sample_tokens, temperature=0.8, top_k=50,
                                            eos_id=self.tokenizer.eos_id, generator=g, allowed=allowed)]
            texts.append(prompt + self.tokenizer.decode(until_eos(out, self.tokenizer.eos_id)))
        text = "\n\n---\n\n".join(texts)
        out_dir = run_dir / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"step_{step:06d}.txt").write_text(text + "\n")
        logger.add_text("samples", text, step)
