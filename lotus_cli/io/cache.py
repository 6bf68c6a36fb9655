"""lotus-cli's own cache folder (embeddings, calibrations, remote inputs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """lotus-cli's own cache (empty-prompt embeddings): $LOTUS_CACHE, else $XDG_CACHE_HOME/lotus."""
    if os.environ.get("LOTUS_CACHE"):
        return Path(os.environ["LOTUS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lotus"
