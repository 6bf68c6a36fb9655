"""What the app accepts: uploads checked before decoding, the address it binds to, and --auth.

An upload is refused on its file size first (``stat``), then on its pixel count read from the image header
(PIL's ``Image.open`` parses the header and decodes no pixels until ``load``), so a decompression bomb
never reaches the decoder. Videos are size-checked on the file only; each frame's size is checked as it is
read (``io.sources``). No Gradio here: the checks are plain functions, testable on their own.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, UsageError
from ..io.sources import IMAGE_EXTS, VIDEO_EXTS

LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class Limits:
    """Upload limits: ``max_pixels`` per image (0 = none), ``max_upload_mb`` per file (0 = none)."""

    max_pixels: int = 100_000_000
    max_upload_mb: float = 50.0

    def __post_init__(self):
        if self.max_pixels < 0:
            raise UsageError(f"--max-pixels must be >= 0, not {self.max_pixels}", "0 means no limit")
        if self.max_upload_mb < 0:
            raise UsageError(f"--max-upload-mb must be >= 0, not {self.max_upload_mb}", "0 means no limit")

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def check_upload(path: Path, limits: Limits) -> tuple[int, int] | None:
    """Check the uploaded file ``path`` before anything decodes it: its extension, its size on disk, and for
    an image the width x height its header states. Returns (width, height) of an image, None for a video.
    Raises InputError naming the file and the limit."""
    path = Path(path)
    name = path.name
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTS + VIDEO_EXTS:
        raise InputError(
            f"{name}: not an image or video file ({suffix or 'no extension'})",
            f"upload one of {', '.join(IMAGE_EXTS + VIDEO_EXTS)}",
        )
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"{name}: cannot read the upload ({e.strerror})") from e
    if size == 0:
        raise InputError(f"{name}: empty file (0 bytes)", "upload another file")
    if limits.max_bytes and size > limits.max_bytes:
        raise InputError(
            f"{name}: {size / 2**20:.1f} MB is above the app's {limits.max_upload_mb:g} MB upload limit",
            "upload a smaller file, or start the app with a higher --max-upload-mb",
        )
    if suffix in VIDEO_EXTS:
        return None
    return header_size(path, limits.max_pixels)


def header_size(path: Path, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image header alone, refused above ``max_pixels`` (0 = no limit)."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # our limit below names the option that lifts it
    try:
        with Image.open(path) as img:  # parses the header; no pixel is decoded before img.load()
            w, h = img.size
    except UnidentifiedImageError as e:
        raise InputError(f"{path.name}: not a readable image", "upload a jpg, png, webp, bmp or tiff image") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path.name}: not a readable image ({e})", "upload another file") from e
    if max_pixels and w * h > max_pixels:
        raise InputError(
            f"{path.name}: {w}x{h} is {w * h / 1e6:.1f} MP, above the app's {max_pixels / 1e6:g} MP limit",
            "downscale the image, or start the app with a higher --max-pixels (0 = no limit)",
        )
    return w, h


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds to this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, auth: tuple[str, str] | None) -> str | None:
    """The warning for an app reachable from other machines without a password, else None."""
    if is_loopback(host) or auth is not None:
        return None
    return (
        f"--host {host} makes the app reachable from other machines, and it has no authentication: "
        "anyone who can reach the port can run the model (add --auth user:pass)"
    )


def parse_auth(spec: str | None) -> tuple[str, str] | None:
    """'user:pass' -> ("user", "pass"); None stays None. The password may hold further colons."""
    if spec is None:
        return None
    user, sep, password = spec.partition(":")
    if not sep or not user or not password:
        raise UsageError(f"--auth {spec!r}: expected user:pass", "e.g. --auth alice:a-long-password")
    return user, password
