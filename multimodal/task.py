"""The multimodal task for the shared trainer: the weighted loss (text and visual parts logged
apart), validation losses and zero-shot accuracy, and samples (a guided class grid and captions
of test images)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from shared.contracts import Task
from shared.grid import class_grid
from shared.images import save_png, to_uint8
from shared.metrics import MetricsLogger
from vqvae.tokenizer import VQTokenizer

from .captions import CaptionTable
from .config import LossConfig, SampleConfig
from .data import VisualTokens
from .model import MultimodalDecoder
from .sampling import caption_scores, sample_images, write_captions
from .sequences import TEXT, VISUAL, SequenceLayout


def validation_sequences(tokens: VisualTokens, captions: CaptionTable, layout: SequenceLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed set: each image once as it is, text-to-image for even and image-to-text for odd
    positions, templates in turn, never the empty caption."""
    n = len(tokens)
    to_image = torch.arange(n) % 2 == 0
    caps = [captions.ids[k][i % len(captions.templates)] for i, k in enumerate(tokens.labels.tolist())]
    return layout.build(tokens.codes[:, 0], caps, to_image)


class MultimodalTask(Task):
    unit = "images"

    def __init__(self, layout: SequenceLayout, captions: CaptionTable, val: VisualTokens, zero_shot: VisualTokens,
                 vq: VQTokenizer, loss_cfg: LossConfig, sample_cfg: SampleConfig, banned_text: tuple[int, ...] = (),
                 decode_text=None, eval_batch_size: int = 64):
        self.layout, self.captions, self.vq = layout, captions, vq
        self.val_ids, self.val_kinds = validation_sequences(val, captions, layout)
        self.caption_images = val.first(sample_cfg.captions)  # captioned at each sample hook
        self.zero_shot, self.sample_cfg, self.banned_text = zero_shot, sample_cfg, banned_text
        self.decode_text, self.eval_batch_size = decode_text, eval_batch_size
        self.weights = torch.tensor([0.0, loss_cfg.text_weight, loss_cfg.visual_weight])  # by token kind
        self._weights: dict[torch.device, torch.Tensor] = {}  # the same, moved once to each device the loss runs on
        self._sums: torch.Tensor | None = None  # text ce, text tokens, visual ce, visual tokens since the last record

    @staticmethod
    def _parts(ce: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        text, visual = kinds == TEXT, kinds == VISUAL
        return torch.stack([(ce * text).sum(), text.sum(), (ce * visual).sum(), visual.sum()]).double()

    def loss(self, model: MultimodalDecoder, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y, kinds = batch
        ce = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        w = self._weights_on(ce.device)[kinds]
        with torch.no_grad():
            parts = self._parts(ce.detach(), kinds)
            self._sums = parts if self._sums is None else self._sums + parts
        return (ce * w).sum() / w.sum().clamp_min(1e-8)

    def _weights_on(self, device: torch.device) -> torch.Tensor:
        # a CPU tensor would be copied to the GPU every micro-batch, a blocking copy from pageable memory
        w = self._weights.get(device)
        if w is None:
            w = self._weights[device] = self.weights.to(device)
        return w

    def train_metrics(self, model: MultimodalDecoder) -> dict[str, float]:
        if self._sums is None:
            return {}
        t, nt, v, nv = self._sums.tolist()
        self._sums = None
        out = {}
        if nt:
            out["text_loss"] = t / nt
        if nv:
            out["visual_loss"] = v / nv
        return out

    @torch.no_grad()
    def evaluate(self, model: MultimodalDecoder) -> dict[str, float]:
        device = model.tok_emb.weight.device
        sums = torch.zeros(4, dtype=torch.float64)
        for i in range(0, len(self.val_ids), self.eval_batch_size):
            ids = self.val_ids[i:i + self.eval_batch_size].to(device)
            kinds = self.val_kinds[i:i + self.eval_batch_size, 1:].to(device)
            ce = F.cross_entropy(model(ids[:, :-1]).float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            sums += self._parts(ce.view_as(kinds), kinds).cpu()
        t, nt, v, nv = sums.tolist()
        w = self.weights.tolist()
        out = {"loss": (w[1] * t + w[2] * v) / (w[1] * nt + w[2] * nv), "text_loss": t / nt, "visual_loss": v / nv}
        if len(self.zero_shot):
            scores = caption_scores(model, self.layout, self.zero_shot.codes[:, 0], self.captions.ids, self.eval_batch_size)
            out["zero_shot_accuracy"] = (scores.argmax(1) == self.zero_shot.labels).float().mean().item()
        return out

    @torch.no_grad()
    def sample(self, model: MultimodalDecoder, step: int, run_dir: Path, logger: MetricsLogger) -> None:
        s = self.sample_cfg
        device = model.tok_emb.weight.device
        g = torch.Generator(device=device).manual_seed(s.seed)  # the same draws at every step: grids compare
        names = self.captions.names
        prompts = [self.captions.ids[k][0] for k in range(len(names)) for _ in range(s.per_class)]
        codes = sample_images(model, self.layout, prompts, cfg_scale=s.cfg_scale, temperature=s.temperature,
                              top_k=s.top_k, top_p=s.top_p, generator=g)
        images = to_uint8(self.vq.decode(codes.to(self.vq.device)).float()).cpu()
        grid = class_grid(images, [self.captions.texts[k][0] for k in range(len(names))], s.per_class)
        out = Path(run_dir) / "samples"
        save_png(grid, out / f"step_{step:06d}.png")
        logger.add_image("samples", grid, step)
        shown = self.caption_images
        if len(shown) and self.decode_text is not None:
            written = write_captions(model, self.layout, shown.codes[:, 0], banned=self.banned_text)
            lines = [f"{names[int(k)]:>16}: {self.decode_text(c)}" for k, c in zip(shown.labels, written)]
            (out / f"step_{step:06d}_captions.txt").write_text("true class: generated caption\n" + "\n".join(lines) + "\n")
            logger.add_text("captions", "\n\n".join(lines), step)
