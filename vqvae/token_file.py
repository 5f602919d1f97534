"""A dataset tokenised once: uint16 token grids and labels in one safetensors file, with the
identity of the tokenizer that wrote it in the file's metadata.

Reading it back with `expect=` a tokenizer (or its fingerprint) refuses a file written by a
different tokenizer, because its token ids would mean other image patches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from shared.cache import writing
from shared.errors import UserError

FORMAT = "blueberry-vq-tokens-v1"


@dataclass
class TokenFile:
    tokens: torch.Tensor  # uint16 [N, h, w]
    labels: torch.Tensor  # int64 [N]
    classes: tuple[str, ...]
    tokenizer: dict  # identity: fingerprint, codebook_size, grid_shape, image_size, source
    data: str  # description of the images that were encoded
    images_key: str = ""  # a fingerprint of the images and labels encoded, when the writer gave one

    def __len__(self) -> int:
        return len(self.labels)

    def check(self, expect) -> None:
        """Raise UserError unless written by `expect` (a VQTokenizer or a fingerprint string)."""
        want = expect if isinstance(expect, str) else expect.fingerprint
        have = self.tokenizer["fingerprint"]
        if have != want:
            raise UserError(f"token file was written by tokenizer {have} ({self.tokenizer.get('source')}), not by the "
                            f"tokenizer in use ({want}); re-encode the data with scripts/encode_vqvae.py")


def write_tokens(path: str | Path, tokens: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...],
                 tokenizer: dict, data: str, images_key: str = "") -> None:
    """Write a token file in place (inside a folder that is itself built atomically); else save_tokens."""
    if tokens.ndim != 3 or len(tokens) != len(labels):
        raise ValueError(f"tokens [N, h, w] and labels [N] expected, got {list(tokens.shape)} and {list(labels.shape)}")
    ids = tokens.long()  # uint16 (what load_tokens returns) has no min/max on the CPU
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= tokenizer["codebook_size"]):
        raise ValueError("token ids outside the tokenizer's codebook")
    meta = {"format": FORMAT, "tokenizer": json.dumps(tokenizer), "classes": json.dumps(list(classes)), "data": data,
            "images_key": images_key}
    save_file({"tokens": tokens.to(torch.uint16).contiguous().cpu(),
               "labels": labels.to(torch.int64).contiguous().cpu()}, str(path), metadata=meta)


def save_tokens(path: str | Path, tokens: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...],
                tokenizer: dict, data: str, images_key: str = "") -> Path:
    """Write a token file atomically: a reader never sees half a file, a failed write leaves none (one line)."""
    path = Path(path)
    with writing(path, "the token file") as partial:
        write_tokens(partial, tokens, labels, classes, tokenizer, data, images_key)
    return path


def load_tokens(path: str | Path, expect=None) -> TokenFile:
    """Read a token file; with `expect` (a VQTokenizer or fingerprint), refuse one from another tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"token file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise UserError(f"{path} is not a Blueberry token file (format {meta.get('format')!r})")
            out = TokenFile(f.get_tensor("tokens"), f.get_tensor("labels"), tuple(json.loads(meta["classes"])),
                            json.loads(meta["tokenizer"]), meta["data"], meta.get("images_key", ""))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UserError(f"token file {path} is corrupt or unreadable: {type(e).__name__}: {e}") from None
    if expect is not None:
        out.check(expect)
    return out
