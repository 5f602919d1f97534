"""The trained tokenizer as other packages use it: images <-> grids of discrete visual tokens.

    tok = VQTokenizer.from_run("runs/vqvae-cifar10")        # a run folder or a checkpoint in it
    tokens = tok.encode(images)     # uint8 [N, 3, 32, 32] or float in [-1, 1] -> int64 [N, 8, 8]
    images = tok.decode(tokens)     # -> float [N, 3, 32, 32] in [-1, 1] (shared.images.to_uint8 for pixels)
    tok.codebook_size, tok.grid_shape, tok.tokens_per_image, tok.fingerprint

The fingerprint is a hash of the weights (codebook included) and the model config: two
tokenizers with the same fingerprint produce the same tokens, so files of tokens record it.
`tok.save_copy(folder)` writes the loaded weights and the run's config as a folder `from_run`
reads: a run that depends on this tokenizer keeps its own copy (resuming the VQ-VAE run prunes
its old checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from shared.checkpoint import EMA_FILE, MODEL_FILE, WRITE_ERRORS, load_weights, resolve_checkpoint, write_failure
from shared.config import to_dict
from shared.errors import UserError
from shared.images import to_float
from shared.run import find_run_dir, load_run_config

from .config import VQVAERunConfig
from .model import VQVAE


def fingerprint(model: VQVAE) -> str:
    h = hashlib.sha256(json.dumps(to_dict(model.cfg), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class VQTokenizer:
    def __init__(self, model: VQVAE, source: str = "(in memory)", batch_size: int = 256,
                 files: tuple[Path, Path] | None = None):
        self.model = model.eval().requires_grad_(False)
        self.source, self.batch_size = source, batch_size
        self.files = files  # (config.toml, the weights file loaded) of a tokenizer read from a run
        self.fingerprint = fingerprint(model)

    @classmethod
    def from_run(cls, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 256) -> "VQTokenizer":
        """Load from a run folder (its latest checkpoint) or one checkpoint folder inside it; the
        EMA weights when the run kept them, as the run's own evaluations used."""
        run_dir = find_run_dir(path)
        ckpt = resolve_checkpoint(path)
        cfg = load_run_config(run_dir, VQVAERunConfig, "vqvae")
        model = VQVAE(cfg.model, cfg.discriminator())
        ema = (ckpt / EMA_FILE).is_file()
        load_weights(model, ckpt, ema=ema)
        model.discriminator = None  # a GAN run's discriminator: training only, never part of the tokenizer
        return cls(model.to(device), source=str(ckpt), batch_size=batch_size,
                   files=(run_dir / "config.toml", ckpt / (EMA_FILE if ema else MODEL_FILE)))

    def save_copy(self, folder: Path) -> None:
        """The run's config and the weights loaded, as `folder/config.toml` and `folder/model.safetensors`
        (a folder from_run reads, to the same fingerprint); written whole or not at all."""
        if self.files is None:
            raise UserError("a VQ-VAE held only in memory has no run to copy")
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".partial")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copyfile(self.files[0], tmp / "config.toml")
            shutil.copyfile(self.files[1], tmp / MODEL_FILE)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        except WRITE_ERRORS as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"could not copy the VQ-VAE {self.source} to {folder} ({write_failure(e, folder.parent)})") from None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def codebook_size(self) -> int:
        return self.model.cfg.codebook_size

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.model.grid_shape

    @property
    def tokens_per_image(self) -> int:
        h, w = self.grid_shape
        return h * w

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    def identity(self) -> dict:
        """What a token file records about the tokenizer that wrote it."""
        return {"fingerprint": self.fingerprint, "codebook_size": self.codebook_size,
                "grid_shape": list(self.grid_shape), "image_size": self.image_size, "source": self.source}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] (or float in [-1, 1]) -> int64 token grids [N, h, w] on the input's device."""
        s = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise UserError(f"this tokenizer encodes images of shape [N, 3, {s}, {s}], got {list(images.shape)}")
        out = []
        for i in range(0, len(images), self.batch_size):
            x = images[i:i + self.batch_size].to(self.device)
            x = to_float(x) if x.dtype == torch.uint8 else x.float()
            out.append(self.model.encode(x).to(images.device))
        return torch.cat(out) if out else torch.zeros(0, *self.grid_shape, dtype=torch.long, device=images.device)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grids [N, h, w] (any integer dtype) -> float images [N, 3, S, S] in [-1, 1]."""
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != self.grid_shape:
            raise UserError(f"this tokenizer decodes token grids of shape [N, {self.grid_shape[0]}, {self.grid_shape[1]}], "
                            f"got {list(tokens.shape)}")
        tokens = tokens.long()
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            raise UserError(f"tokens must be in [0, {self.codebook_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        out = []
        for i in range(0, len(tokens), self.batch_size):
            out.append(self.model.decode(tokens[i:i + self.batch_size].to(self.device)).float().clamp(-1, 1).to(tokens.device))
        s = self.image_size
        return torch.cat(out) if out else torch.zeros(0, 3, s, s, device=tokens.device)
