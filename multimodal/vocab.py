"""One vocabulary for text and images.

    [0, text_size)                          the text tokenizer's ids, unchanged
    [text_size, text_size + 6)              <bos> <eos> <seg_start> <seg_end> <empty> <pad>
    [visual_start, visual_start + codes)    the VQ-VAE's codebook: visual token v is code v - visual_start

The model's embedding table is this size rounded up to a multiple of 64; the extra rows are never
sampled (the samplers only allow visual tokens inside an image and text tokens outside).
The layout and both tokenizers' fingerprints are saved with a run (`vocab.json`), so a run is
never paired with a VQ-VAE or text tokenizer whose ids mean something else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shared.errors import UserError

SPECIALS = ("<bos>", "<eos>", "<seg_start>", "<seg_end>", "<empty>", "<pad>")
VOCAB_FILE = "vocab.json"


@dataclass(frozen=True)
class Vocabulary:
    text_size: int
    codebook_size: int
    grid: tuple[int, int]  # the VQ-VAE's token grid (rows, columns)
    text_fingerprint: str
    vq_fingerprint: str
    vq_source: str = ""  # where the VQ-VAE was loaded from when the run was made (a hint, not an identity)

    def __post_init__(self):
        if self.text_size <= 0 or self.codebook_size <= 0:
            raise ValueError("a vocabulary needs text tokens and visual tokens")

    def special(self, name: str) -> int:
        return self.text_size + SPECIALS.index(name)

    @property
    def bos(self) -> int:
        return self.special("<bos>")

    @property
    def eos(self) -> int:
        return self.special("<eos>")

    @property
    def seg_start(self) -> int:
        return self.special("<seg_start>")

    @property
    def seg_end(self) -> int:
        return self.special("<seg_end>")

    @property
    def empty(self) -> int:
        return self.special("<empty>")

    @property
    def pad(self) -> int:
        return self.special("<pad>")

    @property
    def visual_start(self) -> int:
        return self.text_size + len(SPECIALS)

    @property
    def size(self) -> int:
        return self.visual_start + self.codebook_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def visual(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook indices (any shape) -> visual token ids."""
        return codes.long() + self.visual_start

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Visual token ids -> codebook indices; refuses any other id."""
        codes = ids.long() - self.visual_start
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError("not a visual token id")
        return codes

    def is_visual(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.visual_start) & (ids < self.size)

    def visual_mask(self, rows: int, device=None) -> torch.Tensor:
        """bool [rows]: True for the visual ids of a `rows`-row embedding table."""
        mask = torch.zeros(rows, dtype=torch.bool, device=device)
        mask[self.visual_start:self.size] = True
        return mask

    def text_mask(self, rows: int, banned: tuple[int, ...] = (), device=None) -> torch.Tensor:
        """bool [rows]: True for text ids (minus `banned`, e.g. the text tokenizer's own end token) and <eos>."""
        mask = torch.zeros(rows, dtype=torch.bool, device=device)
        mask[:self.text_size] = True
        mask[list(banned)] = False
        mask[self.eos] = True
        return mask

    # ------------------------------------------------------------------ persistence
    def save(self, run_dir: Path) -> None:
        d = asdict(self)
        d["specials"] = {name: self.special(name) for name in SPECIALS}
        d["visual_start"] = self.visual_start
        (Path(run_dir) / VOCAB_FILE).write_text(json.dumps(d, indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> "Vocabulary":
        path = Path(run_dir) / VOCAB_FILE
        if not path.is_file():
            raise UserError(f"{path} is missing: was {run_dir} trained by scripts/train_multimodal.py?")
        try:
            d = json.loads(path.read_text())
            vocab = cls(int(d["text_size"]), int(d["codebook_size"]), tuple(int(x) for x in d["grid"]),
                        str(d["text_fingerprint"]), str(d["vq_fingerprint"]), str(d.get("vq_source", "")))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} is corrupt: {type(e).__name__}: {e}") from None
        if d.get("specials") != {name: vocab.special(name) for name in SPECIALS}:
            raise UserError(f"{path} was written with another special-token layout than this version uses")
        return vocab

    def check_vq(self, fingerprint: str, source: str) -> None:
        if fingerprint != self.vq_fingerprint:
            raise UserError(f"the VQ-VAE at {source} (fingerprint {fingerprint}) is not the one this run was trained on "
                            f"({self.vq_fingerprint}, from {self.vq_source or 'unknown'}): its visual tokens mean other "
                            "image patches; pass --vqvae with the run's own VQ-VAE")

    def check_text(self, fingerprint: str, source: str) -> None:
        if fingerprint != self.text_fingerprint:
            raise UserError(f"the text tokenizer at {source} (fingerprint {fingerprint}) is not the one this run was "
                            f"trained with ({self.text_fingerprint})")
