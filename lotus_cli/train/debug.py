"""The debug preset's inputs: a tiny random SD2-like base whose VAE is fitted to synthetic scenes of known
depth and normals, so the whole training protocol runs in minutes on a CPU."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UsageError
from ..model.synthetic import write_synthetic_dataset
from .data import FolderData, to_tensors
from .preset import DEBUG, debug_paths
from .step import depth_annotation, normal_annotation
from .surgery import build_tiny_base


def build_debug_inputs(
    out: Path,
    note: Callable[[str], None] = lambda text: None,
    progress: Callable[[int, int, float], None] = lambda step, steps, loss: None,
) -> dict:
    """A tiny random SD2-like base and synthetic scenes under OUT/debug-* (``debug_paths``); built once, by
    rank 0 only (the others wait for it). ``note`` hears what is built; ``progress(step, steps, loss)``
    follows the VAE fit, the slow part."""
    paths = debug_paths(out)
    marker = out / ".debug-ready"
    if marker.exists():
        return paths
    if int(os.environ.get("RANK", "0")) != 0:
        for _ in range(600):
            if marker.exists():
                return paths
            time.sleep(0.5)
        raise UsageError(f"{marker} did not appear: rank 0 failed to build the debug inputs")
    note(f"debug preset: {DEBUG['train_scenes']} synthetic scenes and a tiny base (its VAE fitted to them) under {out}")
    write_synthetic_dataset(paths["train"], DEBUG["train_scenes"], DEBUG["size"], seed=1)
    write_synthetic_dataset(paths["val"], DEBUG["val_samples"], DEBUG["size"], seed=2, holes=False)
    images = autoencoder_images(FolderData(paths["train"]))
    build_tiny_base(paths["base"], fit_images=images, fit_steps=DEBUG["vae_steps"], progress=progress)
    marker.write_text("ok\n")
    return paths


def autoencoder_images(ds, norm: str = "trunc_disparity"):
    """Every sample of ``ds`` as VAE training images: rgb, depth annotation and normal map, float32
    [3N, 3, H, W] in [-1, 1] (for fitting the debug preset's tiny VAE)."""
    ts = [to_tensors(ds.load(i), False) for i in range(len(ds))]
    stack = lambda k: torch.stack([t[k] for t in ts])  # noqa: E731
    return torch.cat(
        [stack("rgb"), depth_annotation(stack("depth"), stack("valid"), norm), normal_annotation(stack("normal"))]
    )
