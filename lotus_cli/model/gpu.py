"""The VAE's dtype when a model runs in fp16 (GPUs): fp16 unless fp16 overflows at the processing size.

SD VAEs in fp16 can produce inf/NaN: the decoder's high-resolution activations grow with the image and
can exceed fp16's largest value (65504), while the UNet is fine in fp16. bf16 has fp32's range (at less
precision), so the VAE falls back to bf16 where the device supports it, else to fp32. Whether it happens
depends on the weights and the size, so it is probed once per (VAE, size) with a real encode and decode.
"""

from __future__ import annotations

import weakref

import torch

# per VAE module (weakly: an id() could be reused by a later VAE): {(size, dtype): (dtype, reason)}
_CHOSEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bf16_supported(device: torch.device) -> bool:
    """bf16 arithmetic at full speed: CUDA devices that report it (Ampere and later) and CPUs (always
    correct there, though fast only with native bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def probe_image(height: int, width: int, device=None) -> torch.Tensor:
    """A deterministic test image [1, 3, H, W] in [-1, 1]: smooth ramps with full-range texture, so the
    VAE sees both large flat areas and strong edges, as photos have."""
    g = torch.Generator("cpu").manual_seed(0)
    yy = torch.linspace(-1, 1, height).view(1, 1, height, 1)
    xx = torch.linspace(-1, 1, width).view(1, 1, 1, width)
    ramps = torch.cat([xx.expand(1, 1, height, width), yy.expand(1, 1, height, width), (xx * yy)], dim=1)
    x = 0.7 * ramps + 0.3 * (2 * torch.rand(1, 3, height, width, generator=g) - 1)
    return x.clamp(-1, 1).to(device)


@torch.inference_mode()
def vae_finite(vae, dtype: torch.dtype, size: tuple[int, int], channels_last: bool = False) -> bool:
    """Whether ``vae`` (already on its device) gives finite latents and a finite image for ``probe_image``
    of ``size`` (h, w) when run in ``dtype``. The VAE is cast to ``dtype`` for the probe and cast back."""
    before = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    vae.to(dtype)
    try:
        x = probe_image(*size, device=device).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        z = vae.encode(x).latent_dist.mean  # [1, C, h/f, w/f]
        if not torch.isfinite(z).all():
            return False
        return bool(torch.isfinite(vae.decode(z).sample).all())
    finally:
        vae.to(before)


def vae_dtype_for(
    vae, dtype: torch.dtype, size: tuple[int, int], *, channels_last: bool = False
) -> tuple[torch.dtype, str | None]:
    """The dtype to run ``vae`` in at processing size ``size`` (h, w) when the model runs in ``dtype``:
    ``dtype`` itself unless it is fp16 and fp16 gives inf/NaN there; then bf16 where supported, else fp32.
    Returns (dtype, one-line reason or None). Probed once per (vae, size, dtype), one encode and decode."""
    if dtype != torch.float16:
        return dtype, None
    chosen = _CHOSEN.setdefault(vae, {})
    key = (tuple(size), dtype)
    if key not in chosen:
        device = next(vae.parameters()).device
        if vae_finite(vae, dtype, size, channels_last):
            chosen[key] = (dtype, None)
        else:
            fallback = torch.bfloat16 if bf16_supported(device) else torch.float32
            name = str(fallback).replace("torch.", "")
            chosen[key] = (fallback, f"the VAE overflows in fp16 at {size[1]}x{size[0]} px: running it in {name}")
    return chosen[key]
