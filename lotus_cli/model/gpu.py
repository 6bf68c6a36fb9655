"""What runs where on a GPU (CUDA, Apple MPS): the device decisions, each plain Python a CPU test can check.

* The VAE's dtype when a model runs in fp16. SD VAEs in fp16 can produce inf/NaN: the decoder's
  high-resolution activations grow with the image and can exceed fp16's largest value (65504), while the
  UNet is fine in fp16. bf16 has fp32's range (at less precision), so the VAE falls back to bf16 where the
  device runs it natively, else to fp32. Whether it happens depends on the weights, the size and the
  image: it is probed once per (VAE, size) at load (``vae_dtype_for``) and every decoded batch is checked
  again by the predictor, which redoes an item that overflowed in the fallback dtype.
* Which devices hold float64 (``float64_device``: not MPS) and run the antialiased resize
  (``resizes_on``: MPS only from torch 2.7).
* Out of memory: telling it from other failures (``is_out_of_memory``) and handing the cached blocks back
  (``free_cache``) before a retry.
"""

from __future__ import annotations

import gc
import weakref

import torch

# per VAE module (weakly: an id() could be reused by a later VAE): {(size, dtype): (dtype, reason)}
_CHOSEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
MPS_AA_RESIZE = "2.7"  # the first torch whose MPS backend has the antialiased bilinear resize


def bf16_supported(device: torch.device) -> bool:
    """bf16 arithmetic at full speed on ``device``: CUDA devices of compute capability 8.0 and later
    (Ampere), asked of that device itself, not of the current one; ROCm devices (torch counts them all);
    CPUs (always correct there, though fast only with native bf16). Not MPS: fp32 there.

    Not ``torch.cuda.is_bf16_supported()``: it counts emulation (True on T4, V100, RTX 20xx, whose cuDNN has
    no bf16 convolutions) and asks the current device."""
    if device.type == "cuda":
        if torch.version.hip:
            return True
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).major >= 8
    return device.type == "cpu"


def check_cuda_index(index: int, what: str, hint: str) -> None:
    """Raise UsageError unless CUDA device ``index`` is one this process sees (``what`` names the setting)."""
    import os

    from ..errors import UsageError

    count = torch.cuda.device_count()
    if 0 <= index < count:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"cuda:0 .. cuda:{count - 1}" if count > 1 else "cuda:0" if count else "none"
    raise UsageError(
        f"{what}: this process sees {count} CUDA device(s) ({seen})"
        + (f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else ""),
        hint,
    )


def float64_device(device: torch.device) -> torch.device:
    """Where float64 arithmetic for work on ``device`` runs: the device itself, except on MPS (no float64):
    there the CPU."""
    return torch.device("cpu") if device.type == "mps" else device


def resizes_on(device: torch.device, version: str | None = None) -> bool:
    """Whether torch ``version`` (default: this one) runs ``F.interpolate(..., antialias=True)`` on ``device``:
    everywhere but on MPS before torch 2.7, where the tensor is resized on the CPU instead."""
    from torch.torch_version import TorchVersion

    if device.type != "mps":
        return True
    return TorchVersion(version or torch.__version__) >= MPS_AA_RESIZE


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it wraps, as torch.compile's errors do) is the device or the host
    running out of memory: torch.cuda.OutOfMemoryError (CUDA), MPS's and the CPU allocator's RuntimeErrors."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, torch.cuda.OutOfMemoryError):  # torch.OutOfMemoryError from torch 2.5
            return True
        if isinstance(e, RuntimeError) and any(
            s in str(e) for s in ("out of memory", "DefaultCPUAllocator: can't allocate memory")
        ):
            return True
        e = getattr(e, "inner_exception", None) or e.__cause__
    return False


def free_cache(device: torch.device) -> None:
    """Hand memory that nothing holds any more back: Python's garbage first (a failed call's frames), then
    the device's cached blocks (CUDA, MPS) or the heap's free pages (CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
    else:
        from .cpu import release_memory

        release_memory()


def fallback_dtype(device: torch.device) -> torch.dtype:
    """The VAE's dtype where fp16 overflows: bf16 where ``device`` runs it natively, else fp32."""
    return torch.bfloat16 if bf16_supported(device) else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------- the fp16 VAE


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
    Returns (dtype, one-line reason or None). Probed once per (vae, size, dtype), one encode and decode;
    not at all for an empty size (a native-size run: its items are checked one by one)."""
    if dtype != torch.float16 or min(size) < 1:
        return dtype, None
    chosen = _CHOSEN.setdefault(vae, {})
    key = (tuple(size), dtype)
    if key not in chosen:
        device = next(vae.parameters()).device
        if vae_finite(vae, dtype, size, channels_last):
            chosen[key] = (dtype, None)
        else:
            fallback = fallback_dtype(device)
            why = f"the VAE overflows in fp16 at {size[1]}x{size[0]} px: running it in {dtype_name(fallback)}"
            chosen[key] = (fallback, why)
    return chosen[key]
