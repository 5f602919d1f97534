"""Image folders: the decoded-image cache follows every file, not only the first."""

import os

import numpy as np
import torch
from PIL import Image

from shared.images import load_images


def write(path, value: int, mtime: int | None = None) -> None:
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def test_a_changed_image_anywhere_is_decoded_again(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            write(tmp_path / "train" / c / f"{i}.png", 10 * i, mtime=1_700_000_000)
    first = load_images(str(tmp_path), "train")
    assert first.images.shape == (6, 3, 8, 8) and first.classes == ("cat", "dog")
    write(tmp_path / "train" / "dog" / "2.png", 200, mtime=1_700_000_100)  # the last file, same size
    again = load_images(str(tmp_path), "train")
    assert int(again.images[5, 0, 0, 0]) == 200 and torch.equal(again.images[:5], first.images[:5])
