"""Images as visual tokens, encoded once, and the resumable source of training sequences.

Every image is encoded by the VQ-VAE twice, as it is and mirrored (mirroring a token grid is not
mirroring the image: each code describes a patch, not a pixel), and the grids are cached under
$BLUEBERRY_CACHE keyed by a hash of the pixels and the tokenizer's fingerprint, in the token-file
format of `scripts/encode_vqvae.py`. The cache records the hash and is checked against the images
when read (count, labels, tokenizer, grid): one that does not fit is encoded again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from shared.cache import Stale, build_once, cache_root
from shared.contracts import BatchSource
from shared.epochs import EpochOrder
from shared.errors import UserError
from shared.images import ImageSet, subset_indices
from vqvae.token_file import TokenFile, load_tokens, write_tokens
from vqvae.tokenizer import VQTokenizer

from .captions import CaptionTable
from .sequences import SequenceLayout


@dataclass
class VisualTokens:
    codes: torch.Tensor  # int64 [N, 2, h, w]: each image as it is, then mirrored
    labels: torch.Tensor  # int64 [N]
    classes: tuple[str, ...]
    description: str

    def __len__(self) -> int:
        return len(self.labels)

    def first(self, n: int) -> "VisualTokens":
        return VisualTokens(self.codes[:n], self.labels[:n], self.classes, self.description)

    def subset(self, n: int) -> "VisualTokens":
        idx = subset_indices(len(self), n)  # the images ImageSet.subset(n) picks
        return self if idx is None else VisualTokens(self.codes[idx], self.labels[idx], self.classes, self.description)


def pixel_key(images: torch.Tensor, labels: torch.Tensor) -> str:
    """The identity of an image set: a hash of every pixel and label (CIFAR-10's 50,000 images: ~0.3 s)."""
    h = hashlib.sha256(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


TOKEN_FILES = ("tokens.safetensors", "mirrored.safetensors")  # each image as it is, then mirrored


def _mismatch(f: TokenFile, data: ImageSet, key: str, vq: VQTokenizer) -> str:
    if f.tokenizer.get("fingerprint") != vq.fingerprint:
        return f"written by VQ tokenizer {f.tokenizer.get('fingerprint')}, this one is {vq.fingerprint}"
    if len(f) != len(data):
        return f"{len(f):,} rows for {len(data):,} images"
    if tuple(f.tokens.shape[1:]) != tuple(vq.grid_shape):
        return f"grids of {list(f.tokens.shape[1:])}, the tokenizer makes {list(vq.grid_shape)}"
    if f.images_key != key or not torch.equal(f.labels, data.labels):
        return "encoded from other images or labels"
    return ""


def _cached(folder: Path, data: ImageSet, key: str, vq: VQTokenizer) -> VisualTokens | None:
    """The cached grids when they are of exactly these images (count, pixels and labels) and this
    tokenizer: rows of other images would pair token grids with the wrong labels."""
    if not folder.is_dir():
        return None
    try:
        files = [load_tokens(folder / name) for name in TOKEN_FILES]
    except UserError as e:  # missing or corrupt: a derived cache, so encode again
        raise Stale(f"the visual-token cache {folder} is unusable ({e}): encoding the images again") from None
    for f in files:
        problem = _mismatch(f, data, key, vq)
        if problem:
            raise Stale(f"the visual-token cache {folder} does not fit ({problem}): encoding the images again")
    return VisualTokens(torch.stack([f.tokens.long() for f in files], 1), data.labels, data.classes, data.description)


def _encode(data: ImageSet, split: str, vq: VQTokenizer, mirrored: bool, progress: bool) -> torch.Tensor:
    chunks = []
    starts = range(0, len(data), vq.batch_size)
    for i in tqdm(starts, desc=f"VQ-encode {split}{' (mirrored)' if mirrored else ''}", unit="batch",
                  disable=not progress or len(starts) < 4, mininterval=1.0):
        x = data.images[i:i + vq.batch_size]
        chunks.append(vq.encode(x.flip(-1) if mirrored else x).cpu())
    return torch.cat(chunks)


def encode_images(data: ImageSet, split: str, vq: VQTokenizer, progress: bool = True) -> VisualTokens:
    """The VQ tokens of every image and of its mirror image, from the cache when it holds them
    (checked against the images: a cache that does not fit is encoded again, with a note)."""
    key = pixel_key(data.images, data.labels)
    folder = cache_root() / "multimodal-tokens" / f"{split}-{key}-{vq.fingerprint}"

    def build(partial: Path) -> None:
        partial.mkdir()
        for name, mirrored in zip(TOKEN_FILES, (False, True)):
            write_tokens(partial / name, _encode(data, split, vq, mirrored, progress), data.labels, data.classes,
                         vq.identity(), data.description + (", mirrored" if mirrored else ""), images_key=key)

    return build_once(folder, lambda: _cached(folder, data, key, vq), build, "the visual-token cache")


class SequenceBatches(BatchSource):
    """Training sequences drawn from visual tokens: for each image of the epoch's order, at random
    (from a generator seeded by the batch's position, so resume is exact) its orientation, the
    direction (text-to-image with probability `t2i_fraction`), a caption template, and for
    text-to-image the empty caption with probability `empty_caption`.

    Batches are (inputs, targets, target kinds), each int64 [B, length - 1].
    """

    def __init__(self, tokens: VisualTokens, captions: CaptionTable, layout: SequenceLayout, batch_size: int, seed: int,
                 t2i_fraction: float, empty_caption: float, hflip: bool = True):
        self.tokens, self.captions, self.layout = tokens, captions, layout
        self.t2i_fraction, self.empty_caption, self.hflip = t2i_fraction, empty_caption, hflip
        self.order = EpochOrder(len(tokens), batch_size, seed, what="images")
        self.units_per_batch = batch_size
        # every (class, template) caption as prompt and tail rows, once: a batch is then pure indexing
        rows = [layout.caption_rows(per_class) for per_class in captions.ids]
        self.prompts = torch.stack([p for p, _ in rows])  # [classes, templates, prompt_length]
        self.tails = torch.stack([t for _, t in rows])
        # every tail holds a caption (none is the empty one): checked once here, so that building a
        # batch skips assemble's check, which reads tensor values on the host
        if not bool((self.tails[..., 0] == layout.vocab.seg_end).all()):
            raise ValueError("an image-to-text sequence needs a caption")
        self.empty_prompt = layout.caption_rows([None])[0][0]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx, g = self.order.next()
        n = len(idx)
        mirrored = (torch.rand(n, generator=g) < 0.5) if self.hflip else torch.zeros(n, dtype=torch.bool)
        to_image = torch.rand(n, generator=g) < self.t2i_fraction
        template = torch.randint(0, len(self.captions.templates), (n,), generator=g)
        empty = (torch.rand(n, generator=g) < self.empty_caption) & to_image
        codes = self.tokens.codes[idx, mirrored.long()]
        labels = self.tokens.labels[idx]
        prompts = torch.where(empty[:, None], self.empty_prompt, self.prompts[labels, template])
        ids, kinds = self.layout.assemble(codes, prompts, self.tails[labels, template], to_image, check=False)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), kinds[:, 1:].contiguous()

    def skip_batch(self) -> None:
        """Advance past a batch without building it (another process trains on it)."""
        self.order.next()

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
