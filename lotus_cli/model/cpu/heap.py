"""Handing freed heap memory back to the system between the big stages of a CPU prediction."""

from __future__ import annotations

_LIBC = None

TRIM_PIXELS = 512 * 512  # stages below this many pixels are too small for a trim (~5-20 ms) to pay


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Activations freed by one stage (encode, UNet, a VAE block) stay in the process's heap and count in its
    RSS while the next stage allocates its own: trimming between the model's stages, and before each VAE
    block of ``TRIM_PIXELS`` or more (strips.py), takes milliseconds and lowers the peak (docs/performance.md
    and memory"). A fixed mmap threshold, tried instead, cost far more time."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - the lookup is the check (AttributeError without it)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def trim_before(pixels: int, device_type: str = "cpu") -> None:
    """``release_freed_memory`` before a stage over ``pixels`` pixels on the CPU, when that is worth it."""
    if device_type == "cpu" and pixels >= TRIM_PIXELS:
        release_freed_memory()
