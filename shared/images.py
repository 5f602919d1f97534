"""Image data for every image package: one place that turns a data spec into uint8 tensors.

Data specs (`--data`):
  builtin      a small class-labelled set of 32x32 shapes generated here (offline, no third-party data)
  cifar10      CIFAR-10 through torchvision (downloads once into $BLUEBERRY_CACHE/cifar10)
  PATH         an image folder: PATH/<split>/<class>/*.jpg|png (or PATH/<class>/... for one split)

Images are decoded once and kept as a uint8 tensor [N, 3, H, W] (decoded folders are cached on
disk, built by one process at a time and checked against the folder when read), so a GPU trainer
indexes memory instead of decoding files.

Inputs are checked against what they claim: both splits of a training set hold images of one size
(the model's, when the caller names it), and a class folder with no training images is refused
(or left out with a note, by drop_empty_classes) rather than counted as a class and scored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cache import Stale, build_once, cache_root, say
from .contracts import BatchSource
from .distributed import main_first
from .epochs import EpochOrder
from .errors import ConfigError, UserError

BUILTIN_CLASSES = ("disc", "square", "ring", "cross", "h-stripes", "v-stripes", "checker", "triangle", "gradient", "dots")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
OFFLINE_OPTIONS = "use --data builtin (generated offline set) or --data PATH (an image folder such as <root>/cifar10-jpeg)"


@dataclass
class ImageDataConfig:
    """The `[data]` table of an image model (the VQ-VAE, flow matching)."""

    source: str = "builtin"  # builtin | cifar10 | PATH of an image folder (the specs above)
    drop_empty_classes: bool = False  # leave out class folders with no training images (with a note) instead of refusing them
    hflip: bool = True  # random horizontal flips of training images
    # test images (a fixed random subset, ImageSet.subset) evaluated during training; 0 = all of them.
    # The VQ-VAE's rule, which subset() already follows; flow matching refused 0, and no preset used it
    eval_images: int = 1000

    def __post_init__(self):
        if self.eval_images < 0:
            raise ConfigError(f"data.eval_images must be >= 0 (0 = all), got {self.eval_images}")


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: tuple[str, ...]
    description: str
    dropped: tuple[str, ...] = ()  # class folders left out for having no training images

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int) -> "ImageSet":
        idx = subset_indices(len(self), n)
        return self if idx is None else ImageSet(self.images[idx], self.labels[idx], self.classes, self.description,
                                                 self.dropped)

    def without(self, classes: tuple[str, ...]) -> "ImageSet":
        """These classes and their images left out; the other labels renumbered in order."""
        keep = [i for i, c in enumerate(self.classes) if c not in classes]
        new = torch.full((len(self.classes),), -1, dtype=torch.long)
        new[keep] = torch.arange(len(keep))
        labels = new[self.labels]
        idx = (labels >= 0).nonzero().squeeze(1)
        return ImageSet(self.images[idx], labels[idx], tuple(self.classes[i] for i in keep), self.description,
                        self.dropped + tuple(c for c in classes if c in self.classes))


def subset_indices(total: int, n: int) -> torch.Tensor | None:
    """A fixed random subset of n of `total` examples (None: all of them, when n is 0 or too big).
    Random because folders are sorted by class, so the first n would hold one or two classes."""
    if n <= 0 or n >= total:
        return None
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n]


# ------------------------------------------------------------------------------- built-in set


def generate_shapes(n_per_class: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten classes of coloured shapes on coloured backgrounds with random position, scale and noise."""
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * len(BUILTIN_CLASSES)
    labels = torch.arange(len(BUILTIN_CLASSES)).repeat_interleave(n_per_class)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    cy = size / 2 + (torch.rand(n, 1, 1, generator=g) - 0.5) * size * 0.3
    cx = size / 2 + (torch.rand(n, 1, 1, generator=g) - 0.5) * size * 0.3
    r = size * (0.18 + 0.14 * torch.rand(n, 1, 1, generator=g))
    dy, dx = ys - cy, xs - cx
    dist = (dy**2 + dx**2).sqrt()
    period = 3 + torch.randint(0, 4, (n, 1, 1), generator=g).float()
    masks = {
        0: dist < r,
        1: (dy.abs() < r) & (dx.abs() < r),
        2: (dist < r) & (dist > r * 0.6),
        3: ((dy.abs() < r * 0.3) & (dx.abs() < r)) | ((dx.abs() < r * 0.3) & (dy.abs() < r)),
        4: (ys / period).floor().remainder(2) == 0,
        5: (xs / period).floor().remainder(2) == 0,
        6: ((ys / period).floor() + (xs / period).floor()).remainder(2) == 0,
        7: (dy < r) & (dy > -r) & (dx.abs() < (dy + r) / 2),
        8: None,  # gradient: handled below
        9: ((dy.remainder(period * 2) < period) & (dx.remainder(period * 2) < period)) & (dist < r * 1.4),
    }
    fg = torch.rand(n, 3, 1, 1, generator=g)
    bg = torch.rand(n, 3, 1, 1, generator=g)
    bg = torch.where((fg - bg).abs().sum(1, keepdim=True) < 0.6, 1 - fg, bg)  # keep the shape visible
    out = torch.empty(n, 3, size, size)
    for k, mask in masks.items():
        idx = labels == k
        if k == 8:
            t = ((xs + ys) / (2 * size - 2)).expand(int(idx.sum()), size, size)[:, None]
            out[idx] = bg[idx] * (1 - t) + fg[idx] * t
        else:
            m = mask[idx][:, None].float() if mask.shape[0] == n else mask.expand(int(idx.sum()), size, size)[:, None].float()
            out[idx] = fg[idx] * m + bg[idx] * (1 - m)
    out = out + 0.04 * torch.randn(out.shape, generator=g)
    perm = torch.randperm(n, generator=g)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)[perm], labels[perm]


def _builtin(split: str) -> ImageSet:
    n, seed = (500, 0) if split == "train" else (100, 1)
    images, labels = generate_shapes(n, seed)
    return ImageSet(images, labels, BUILTIN_CLASSES, f"built-in generated shapes, {split} split ({len(labels)} images)")


# ------------------------------------------------------------------------------- folders


HELD_OUT = 10  # a folder without split subfolders keeps every 10th image (by file-name hash) for test


def display(text: object) -> str:
    """A path or name as it can be printed: bytes that are not UTF-8 (which Python holds as
    surrogate escapes, and which no UTF-8 terminal can print) become U+FFFD."""
    return os.fsencode(str(text)).decode("utf-8", "replace")


def _held_out(path: Path) -> bool:
    # the name's bytes: any file name hashes, and UTF-8 names hash as they always have
    return hashlib.blake2b(os.fsencode(f"{path.parent.name}/{path.name}"), digest_size=8).digest()[0] % HELD_OUT == 0


def _files_key(base: Path, files: list[tuple[Path, int]]) -> str:
    """The decoded-image cache's name: every file's path, class, size and modification time, so a
    changed, added or removed image anywhere is decoded again (60,000 stat calls take well under a second)."""
    h = hashlib.sha256(os.fsencode(str(base.resolve())))
    for f, label in files:
        st = f.stat()
        h.update(os.fsencode(str(f.relative_to(base))) + f"|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _class_folders(base: Path) -> tuple[list[Path], list[str]]:
    """The class folders under base, sorted, and their class names: a folder name that is not
    UTF-8 is named with U+FFFD for its undecodable bytes, with a note."""
    folders = sorted((d for d in base.iterdir() if d.is_dir()), key=lambda d: d.name)
    names = [display(d.name) for d in folders]
    for d, name in zip(folders, names):
        if name != d.name:
            say(f"note: the class folder {os.fsencode(d.name)!r} under {display(base)} is not UTF-8: its class is named {name!r}")
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two class folders under {display(base)} are both named {twice!r} once their non-UTF-8 bytes "
                        "are replaced: rename one")
    return folders, names


def _drop_empty(base: Path, split: str, classes: list[str], files: list[tuple[Path, int]],
                drop: bool) -> tuple[list[str], list[tuple[Path, int]], tuple[str, ...]]:
    """A class folder with no training images is not a class: refused, or left out with a note."""
    counts = Counter(i for _, i in files)
    empty = tuple(c for i, c in enumerate(classes) if not counts[i])
    if not empty:
        return classes, files, ()
    what = "images" if split == "all" else "training images"
    if not drop:
        more = len(empty) - 1
        others = f" (nor have {more} more: {', '.join(empty[1:4])}{', ...' * (more > 3)})" if more else ""
        raise UserError(f"the class folder {empty[0]!r} under {display(base)} has no {what}{others}: remove it, or set "
                        "data.drop_empty_classes=true to leave such classes out")
    say(f"note: left out {len(empty)} class folder{'s' * (len(empty) > 1)} with no {what} under {display(base)}: "
        + ", ".join(empty))
    keep = [i for i, c in enumerate(classes) if counts[i]]
    new = {old: k for k, old in enumerate(keep)}
    return [classes[i] for i in keep], [(f, new[i]) for f, i in files], empty


def _decode(files: list[tuple[Path, int]], base: Path) -> torch.Tensor:
    from PIL import Image

    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"cannot read image {display(f)}: {e}") from None
    odd = next((i for i, a in enumerate(arrays) if a.shape != arrays[0].shape), None)
    if odd is not None:
        (h0, w0, _), (h1, w1, _) = arrays[0].shape, arrays[odd].shape
        raise UserError(f"images under {display(base)} have different sizes ({display(files[0][0].relative_to(base))} is "
                        f"{h0}x{w0}, {display(files[odd][0].relative_to(base))} {h1}x{w1}); resize them first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _cached_images(cache: Path, files: list[tuple[Path, int]], base: Path) -> torch.Tensor:
    """The folder's decoded images, through a cache that is built once (two runs decoding one folder
    at once take turns) and checked against the folder's listing whenever it is read."""
    labels = torch.tensor([i for _, i in files], dtype=torch.long)

    def read() -> torch.Tensor | None:
        if not cache.is_file():
            return None
        try:
            saved = torch.load(cache, weights_only=True)
        except Exception as e:  # a truncated or foreign file: torch raises several kinds
            raise Stale(f"the decoded-image cache {display(cache)} is unreadable ({type(e).__name__}): decoding again") from None
        images = saved.get("images") if isinstance(saved, dict) else None
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
                and images.shape[0] == len(labels) and images.shape[1] == 3
                and isinstance(saved.get("labels"), torch.Tensor) and torch.equal(saved["labels"], labels)):
            raise Stale(f"the decoded-image cache {display(cache)} does not hold this folder's {len(labels):,} images: "
                        "decoding again")
        return images

    def build(partial: Path) -> None:
        say(f"decoding {len(files):,} images from {display(base)} (once; cached in {display(cache)}) ...")
        torch.save({"images": _decode(files, base), "labels": labels}, partial)

    return build_once(cache, read, build, "the decoded-image cache")


def _folder(root: Path, split: str, drop_empty_classes: bool = False) -> ImageSet:
    one_split = split == "all" or not (root / split).is_dir()
    base = root if one_split else root / split
    if one_split and any((root / s).is_dir() for s in ("train", "test")):
        raise UserError(f"{display(root)} has no {split!r} split folder")
    folders, classes = _class_folders(base)
    if not classes:
        raise UserError(f"no class folders in {display(base)} (expected {display(base)}/<class>/*.jpg)")
    files = [(f, i) for i, d in enumerate(folders) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if one_split and split != "all":  # never evaluate on training images: hold out a fixed tenth by file-name hash
        files = [(f, i) for f, i in files if _held_out(f) == (split == "test")]
    if not files:
        raise UserError(f"no {split} images under {display(base)}" + (" (one-split folders hold out every 10th image for test)" if one_split else ""))
    dropped: tuple[str, ...] = ()
    if split in ("train", "all"):
        classes, files, dropped = _drop_empty(base, split, classes, files, drop_empty_classes)
    cache = cache_root() / "images" / f"{base.name}-{split if one_split else 'all'}-{_files_key(base, files)}.pt"
    images = _cached_images(cache, files, base)
    labels = torch.tensor([i for _, i in files], dtype=torch.long)
    kind = {"all": "all images", "test": "held-out tenth" if one_split else "test split",
            "train": "nine tenths (one-split folder)" if one_split else "train split"}[split]
    return ImageSet(images, labels, tuple(classes), f"image folder {display(base)}, {split}: {kind} ({len(labels):,} images, "
                    f"{len(classes)} classes)", dropped)


def _cifar10(split: str) -> ImageSet:
    import torchvision

    root = cache_root() / "cifar10"
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True)
    except Exception as e:  # urllib raises several types when offline
        raise UserError(f"could not download CIFAR-10 ({type(e).__name__}); offline? {OFFLINE_OPTIONS}") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(ds.targets), tuple(ds.classes), f"CIFAR-10 (torchvision), {split} split ({len(images):,} images)")


def _sizes(got: tuple[int, ...], want: tuple[int, ...]) -> tuple[str, str]:
    """'64x64', '32x32'; with the channels too when those differ."""
    text = lambda c, h, w: f"{h}x{w}" + (f" with {c} channel{'s' * (c != 1)}" if got[0] != want[0] else "")  # noqa: E731
    return text(*got), text(*want)


def check_shape(data: ImageSet, split: str, spec: str, shape: tuple[int, int, int], expected_by: str) -> None:
    """One line naming the split and both sizes when `data` does not hold images of `shape` [C, H, W]."""
    got = tuple(data.images.shape[1:])
    if got != tuple(shape):
        have, want = _sizes(got, tuple(shape))
        raise UserError(f"the {split} split of {display(spec)} holds {have} images but {expected_by} {want}: "
                        "every split must have the model's image size (resize the images)")


def load_train_test(spec: str, same_classes: bool = True, shape: tuple[int, int, int] | None = None,
                    drop_empty_classes: bool = False) -> tuple[ImageSet, ImageSet]:
    """Both splits of a training script's data, checked before any work: the test split holds
    images of the training split's size (and both of `shape`, the model's [C, H, W], when given),
    and a class with no training images is refused or, with drop_empty_classes, left out of both
    splits. With several processes rank 0 decodes into the cache first and the others then read it."""
    with main_first():
        train, test = load_images(spec, "train", drop_empty_classes), load_images(spec, "test")
    if shape is not None:
        check_shape(train, "train", spec, shape, "the model expects")
    check_shape(test, "test", spec, shape or tuple(train.images.shape[1:]),
                "the model expects" if shape is not None else "the train split holds")
    if train.dropped:
        test = test.without(train.dropped)
    if same_classes and test.classes != train.classes:
        only = sorted(set(test.classes) - set(train.classes)) or sorted(set(train.classes) - set(test.classes))
        where = "test" if set(test.classes) - set(train.classes) else "train"
        detail = f" (only in {where}: {', '.join(only[:3])})" if only else " (in another order)"
        raise UserError(f"the train and test splits of {display(spec)} have different classes{detail}")
    return train, test


def load_images(spec: str, split: str = "train", drop_empty_classes: bool = False) -> ImageSet:
    """`split` is train or test; "all" reads every image of a one-split folder (generated samples).
    A class folder with no images in the train (or "all") split is refused unless drop_empty_classes."""
    if split not in ("train", "test", "all"):
        raise UserError(f"split must be train, test or all, got {split!r}")
    if split == "all" and spec in ("builtin", "cifar10"):
        raise UserError(f"split 'all' is for image folders, not {spec!r}")
    if spec == "builtin":
        return _builtin(split)
    if spec == "cifar10":
        return _cifar10(split)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise UserError(f"image data not found: {display(spec)!r} is not builtin, cifar10 or a folder; {OFFLINE_OPTIONS}")
    return _folder(path, split, drop_empty_classes)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


class ImageBatches(BatchSource):
    """Random batches (images in [-1, 1], labels) epoch by epoch, optionally flipped left-right.

    The order and the flips are a pure function of (seed, epoch, cursor), so a checkpoint only
    needs (epoch, cursor) to continue exactly.
    """

    def __init__(self, data: ImageSet, batch_size: int, seed: int, hflip: bool = False, alternate: bool = False):
        self.data, self.hflip = data, hflip
        self.order = EpochOrder(len(data), batch_size, seed, what="images")
        self.units_per_batch = batch_size
        # Alternating flip (Jordan 2024, airbench): each image is mirrored in every other epoch, from
        # a random first choice, so two consecutive epochs always show both of its sides.
        self.first_flip = torch.rand(len(data), generator=torch.Generator().manual_seed(seed)) < 0.5 if hflip and alternate else None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx, g = self.order.next()
        images = self.data.images[idx]
        if self.hflip:
            if self.first_flip is not None:
                flip = self.first_flip[idx] ^ bool(self.order.epoch % 2)
            else:
                flip = torch.rand(len(idx), generator=g) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return to_float(images), self.data.labels[idx]

    def skip_batch(self) -> None:
        """Advance past a batch without building it (another process trains on it)."""
        self.order.next()

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


def read_image_files(paths: list[str], size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size] from image files; other sizes are resized (bicubic), with a note."""
    from PIL import Image

    out = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            raise UserError(f"{display(p)} is a folder, not an image file: name its images (e.g. {display(p)}/*.png)")
        if not p.exists():
            raise UserError(f"image not found: {display(p)}")
        if not p.is_file():
            raise UserError(f"{display(p)} is not a regular file (an image file is needed)")
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    print(f"note: {display(p)} is {im.size[0]}x{im.size[1]}; resized to {size}x{size}")
                    im = im.resize((size, size), Image.Resampling.BICUBIC)
                out.append(np.asarray(im))
        except OSError as e:
            raise UserError(f"cannot read image {display(p)}: {e}") from None
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> one uint8 grid [3, H', W'] with a 2-pixel border."""
    import torchvision

    return torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=255)


def save_png(image_chw: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_chw.permute(1, 2, 0).cpu().numpy()).save(path)


def grid_shape(n: int) -> int:
    return max(1, int(math.ceil(math.sqrt(n))))


CLASSES_FILE = "classes.json"  # a run's class names, in label order


def save_classes(classes: tuple[str, ...], run_dir: Path) -> None:
    (Path(run_dir) / CLASSES_FILE).write_text(json.dumps(list(classes)) + "\n")


def load_classes(run_dir: Path, trained_by: str) -> list[str]:
    path = Path(run_dir) / CLASSES_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: was {run_dir} trained by {trained_by}?")
    try:
        classes = json.loads(path.read_text())
    except json.JSONDecodeError:
        classes = None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path} is corrupt: expected a JSON list of class names")
    return classes
