"""The speed and memory code of a prediction, behind one door: how the UNet and VAE run, not what they compute.

``prepare(unet, vae, device, dtype)`` makes the loaded modules fast for their device and dtype, with the
options this machine was measured to profit from (calibrate.py): channels-last memory, convolution
weights packed for oneDNN (prepack.py), the VAE's high-resolution stages in row strips (strips.py), the
thread count; and,
always, in-place SiLU in the VAE. The returned Engine then runs the VAE (``encode``/``decode``: in strips
or as diffusers' modules), puts tensors in the chosen memory format (``fmt``), counts the weights' bytes
and hands freed memory back between the big stages (heap.py). The numbers are the modules' own up to
float rounding (docs/exactness.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import heap, prepack, strips
from .calibrate import Choices, Machine, choose, cpu_has_native_bf16, machine

__all__ = ["Engine", "prepare", "Choices", "Machine", "machine", "cpu_has_native_bf16", "release_memory"]


def release_memory() -> None:
    """Hand the heap's freed pages back to the system (CPUs with glibc; a no-op elsewhere)."""
    heap.release_freed_memory()


@dataclass
class Engine:
    """How a UNet and VAE run: ``unet_channels_last`` / ``vae_channels_last`` (each module's memory
    format), ``packed`` (weights, of either), ``strip_rows`` (output rows per strip in the VAE's
    high-resolution stages; 0 = diffusers' modules; may be changed at any time) and ``choices`` (what was
    chosen and why, with the measured times)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    device: torch.device
    unet_channels_last: bool
    vae_channels_last: bool
    packed: bool
    strip_rows: int
    choices: Choices

    @property
    def channels_last(self) -> bool:
        """Whether either module runs channels-last."""
        return self.unet_channels_last or self.vae_channels_last

    def fmt(self, x: torch.Tensor, part: str = "vae") -> torch.Tensor:
        """x [B, C, H, W] in the memory format of module ``part`` ("unet" or "vae"). An NCHW module's input is
        made NCHW too: torch runs a convolution channels-last when its input is, whatever its weight."""
        cl = self.unet_channels_last if part == "unet" else self.vae_channels_last
        return x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters: x [B, 3, H, W] in [-1, 1] -> moments [B, 2 * latent channels,
        H / f, W / f] (mean, then log-variance)."""
        x = self.fmt(x)
        heap.trim_before(x.shape[-2] * x.shape[-1], self.device.type)  # the previous stage's freed memory
        if self.strip_rows:
            return strips.encode(self.vae, x, self.strip_rows)
        return self.vae.encode(x).latent_dist.parameters

    def decode(self, z: torch.Tensor, latent_factor: int) -> torch.Tensor:
        """The VAE decoder: unscaled latent [B, C, h, w] -> image [B, 3, h * f, w * f] in about [-1, 1]
        (f = ``latent_factor``)."""
        z = self.fmt(z)
        heap.trim_before(z.shape[-2] * z.shape[-1] * latent_factor**2, self.device.type)  # the UNet's freed memory
        return strips.decode(self.vae, z, self.strip_rows) if self.strip_rows else self.vae.decode(z).sample

    def weight_bytes(self) -> int:
        """Bytes of weights the UNet and VAE hold (packed weights included)."""
        return prepack.weight_bytes(self.unet, self.vae)


def prepare(
    unet,
    vae,
    device: torch.device,
    dtype: torch.dtype,
    *,
    channels_last: bool | None = None,
    pack_weights: bool | None = None,
    processing_res: int = 768,
    borrowed: bool = False,
) -> Engine:
    """Make ``unet`` and ``vae`` (loaded, eval) fast on ``device`` in ``dtype``, in place; returns their Engine.

    ``channels_last`` / ``pack_weights``: None = as measured for this machine at ``processing_res``
    (calibrate.py); True / False fix them. Packing replaces the convolution modules, so pass
    ``pack_weights=False`` for a model in training or for torch.compile (plain modules). ``borrowed``: the
    modules are someone else's (a model in training): nothing about them or the process changes (no layout,
    packing, in-place SiLU or thread count); the Engine only runs them."""
    if borrowed:
        channels_last, pack_weights = False, False
    c = choose(
        unet, vae, device, dtype, channels_last=channels_last, pack_weights=pack_weights, processing_res=processing_res
    )
    modules = {"unet": unet, "vae": vae}
    for part, lay in (("unet", c.unet), ("vae", c.vae)):
        if lay != "nchw":
            modules[part].to(memory_format=torch.channels_last)
            if device.type == "cpu":  # torch's channels-last GroupNorm rounds more than NCHW there (float64: CPU)
                strips.precise_group_norms(modules[part])
    # In the VAE every SiLU acts on a fresh GroupNorm output (its resnets take no time embedding), so
    # computing it in place is exact and saves one full-resolution activation at the memory peak.
    # (Not in the UNet: there the same SiLU module also runs on the shared time embedding.)
    for m in vae.modules() if not borrowed else ():
        if isinstance(m, torch.nn.SiLU):
            m.inplace = True
    if device.type == "cpu" and c.threads != torch.get_num_threads() and not borrowed:  # measured faster (calibrate.py)
        torch.set_num_threads(c.threads)
    packed = c.pack_weights and prepack.available(device, dtype)
    if packed:  # replaces the convolution modules: the same numbers, no weight reorder per call
        for part, lay in (("unet", c.unet), ("vae", c.vae)):
            if lay.endswith("packed"):
                prepack.pack_convolutions(modules[part])
        release_memory()  # the dense copies' memory, freed into the heap
    return Engine(unet, vae, device, c.unet != "nchw", c.vae != "nchw", packed, c.strip_rows, c)
