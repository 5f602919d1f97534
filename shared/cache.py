"""Where derived data lives: token caches, decoded images, FID statistics, downloads."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$BLUEBERRY_CACHE, or .cache/blueberry under the working directory."""
    return Path(os.environ.get("BLUEBERRY_CACHE", ".cache/blueberry"))
