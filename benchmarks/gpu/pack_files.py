"""Pack a folder tree into one .npz (and back), so that tens of thousands of small files travel to
the GPU machine as one carried file: a zip adds ~120 bytes per file, 7 MB for CIFAR-10's 60,000
JPEGs, which the 64 MiB carry limit cannot spare.

    python benchmarks/gpu/pack_files.py pack SRC_DIR OUT.npz
    python benchmarks/gpu/pack_files.py unpack OUT.npz DEST_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def pack(src: Path, out: Path) -> None:
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        sys.exit(f"error: no files under {src}")
    blobs = [p.read_bytes() for p in files]
    sizes = np.array([len(b) for b in blobs], dtype=np.int64)
    names = "\n".join(p.relative_to(src).as_posix() for p in files).encode()  # not a <U array: 4 bytes a character
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, data=np.frombuffer(b"".join(blobs), dtype=np.uint8), sizes=sizes, names=np.frombuffer(names, dtype=np.uint8))
    print(f"packed {len(files):,} files, {sizes.sum() / 1e6:.1f} MB, into {out}")


def unpack(npz: Path, dest: Path) -> None:
    with np.load(npz) as z:
        data, sizes, names = z["data"], z["sizes"], z["names"].tobytes().decode().split("\n")
    ends = np.cumsum(sizes)
    for name, end, size in zip(names, ends, sizes):
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[end - size:end].tobytes())
    print(f"unpacked {len(names):,} files into {dest}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["pack", "unpack"])
    p.add_argument("src", type=Path)
    p.add_argument("dest", type=Path)
    a = p.parse_args()
    if not a.src.exists():
        sys.exit(f"error: {a.src} does not exist")
    (pack if a.mode == "pack" else unpack)(a.src, a.dest)
