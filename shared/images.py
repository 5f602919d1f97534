"""Image data for every image package: one place that turns a data spec into uint8 tensors.

Data specs (`--data`):
  builtin      a small class-labelled set of 32x32 shapes generated here (offline, no third-party data)
  cifar10      CIFAR-10 through torchvision (downloads once into $BLUEBERRY_CACHE/cifar10)
  PATH         an image folder: PATH/<split>/<class>/*.jpg|png (or PATH/<class>/... for one split)

Images are decoded once and kept as a uint8 tensor [N, 3, H, W] (decoded folders are cached on
disk), so a GPU trainer indexes memory instead of decoding files.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cache import cache_root
from .distributed import main_first
from .epochs import EpochOrder
from .errors import UserError

BUILTIN_CLASSES = ("disc", "square", "ring", "cross", "h-stripes", "v-stripes", "checker", "triangle", "gradient", "dots")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
OFFLINE_OPTIONS = "use --data builtin (generated offline set) or --data PATH (an image folder such as <root>/cifar10-jpeg)"


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: tuple[str, ...]
    description: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int) -> "ImageSet":
        idx = subset_indices(len(self), n)
        return self if idx is None else ImageSet(self.images[idx], self.labels[idx], self.classes, self.description)


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


def _held_out(path: Path) -> bool:
    return hashlib.blake2b(f"{path.parent.name}/{path.name}".encode(), digest_size=8).digest()[0] % HELD_OUT == 0


def _files_key(base: Path, files: list[tuple[Path, int]]) -> str:
    """The decoded-image cache's name: every file's path, class, size and modification time, so a
    changed, added or removed image anywhere is decoded again (60,000 stat calls take well under a second)."""
    h = hashlib.sha256(str(base.resolve()).encode())
    for f, label in files:
        st = f.stat()
        h.update(f"{f.relative_to(base)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _folder(root: Path, split: str) -> ImageSet:
    one_split = split == "all" or not (root / split).is_dir()
    base = root if one_split else root / split
    if one_split and any((root / s).is_dir() for s in ("train", "test")):
        raise UserError(f"{root} has no {split!r} split folder")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"no class folders in {base} (expected {base}/<class>/*.jpg)")
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((base / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if one_split and split != "all":  # never evaluate on training images: hold out a fixed tenth by file-name hash
        files = [(f, i) for f, i in files if _held_out(f) == (split == "test")]
    if not files:
        raise UserError(f"no {split} images under {base}" + (" (one-split folders hold out every 10th image for test)" if one_split else ""))
    key = _files_key(base, files)
    cache = cache_root() / "images" / f"{base.name}-{split if one_split else 'all'}-{key}.pt"
    saved = None
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
        except Exception:  # a damaged cache is rebuilt from the images
            print(f"decoded-image cache {cache} is unreadable; decoding again", flush=True)
    if saved is not None:
        images, labels = saved["images"], saved["labels"]
    else:
        from PIL import Image

        print(f"decoding {len(files):,} images from {base} (once; cached in {cache}) ...", flush=True)
        arrays = []
        for f, _ in files:
            try:
                with Image.open(f) as im:
                    arrays.append(np.asarray(im.convert("RGB")))
            except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
                raise UserError(f"cannot read image {f}: {e}") from None
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise UserError(f"images under {base} have different sizes ({sorted(shapes)[:3]}...); resize them first")
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor([i for _, i in files])
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": images, "labels": labels}, cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)
    kind = {"all": "all images", "test": "held-out tenth" if one_split else "test split",
            "train": "nine tenths (one-split folder)" if one_split else "train split"}[split]
    return ImageSet(images, labels, tuple(classes), f"image folder {base}, {split}: {kind} ({len(labels):,} images, {len(classes)} classes)")


def _cifar10(split: str) -> ImageSet:
    import torchvision

    root = cache_root() / "cifar10"
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True)
    except Exception as e:  # urllib raises several types when offline
        raise UserError(f"could not download CIFAR-10 ({type(e).__name__}); offline? {OFFLINE_OPTIONS}") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(ds.targets), tuple(ds.classes), f"CIFAR-10 (torchvision), {split} split ({len(images):,} images)")


def load_train_test(spec: str, same_classes: bool = True) -> tuple[ImageSet, ImageSet]:
    """Both splits of a training script's data. With several processes rank 0 decodes into the
    cache first and the others then read it."""
    with main_first():
        train, test = load_images(spec, "train"), load_images(spec, "test")
    if same_classes and test.classes != train.classes:
        raise UserError(f"the train and test splits of {spec} have different classes")
    return train, test


def load_images(spec: str, split: str = "train") -> ImageSet:
    """`split` is train or test; "all" reads every image of a one-split folder (generated samples)."""
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
        raise UserError(f"image data not found: {spec!r} is not builtin, cifar10 or a folder; {OFFLINE_OPTIONS}")
    return _folder(path, split)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


class ImageBatches:
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
        if not p.is_file():
            raise UserError(f"image not found: {p}")
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    print(f"note: {p} is {im.size[0]}x{im.size[1]}; resized to {size}x{size}")
                    im = im.resize((size, size), Image.Resampling.BICUBIC)
                out.append(np.asarray(im))
        except OSError as e:
            raise UserError(f"cannot read image {p}: {e}") from None
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
