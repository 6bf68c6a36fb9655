"""Whether an image file is an equirectangular 360-degree panorama, from its XMP metadata and its size.

360 cameras and stitchers write Google's Photo Sphere XMP, ``GPano:ProjectionType="equirectangular"`` (as
an attribute or an element), into the file's XMP packet (a JPEG APP1 segment, a PNG iTXt chunk, a TIFF or
WebP tag): it sits before the pixel data, so reading the first ``XMP_BYTES`` of a file finds it without
decoding anything. No torch and no decoding here.
"""

from __future__ import annotations

import re
from pathlib import Path

XMP_BYTES = 1 << 20  # the packet comes before the pixels; 1 MiB covers thumbnails and EXIF ahead of it
RATIO_TOLERANCE = 0.01  # a full sphere is W = 2 H; stitchers round to even sizes
_PROJECTION = re.compile(rb"GPano:ProjectionType\s*(?:=\s*[\"']([^\"']*)[\"']|>\s*([^<\s]*)\s*<)")


def xmp_projection(path: Path) -> str | None:
    """The XMP ``GPano:ProjectionType`` of the file at ``path`` (e.g. "equirectangular"), or None without one
    (or when the file cannot be read: reading it for the prediction then says why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(XMP_BYTES)
    except OSError:
        return None
    m = _PROJECTION.search(head)
    return None if m is None else (m.group(1) or m.group(2) or b"").decode("ascii", "replace").strip().lower()


def is_two_to_one(width: int, height: int) -> bool:
    return height > 0 and abs(width / height - 2.0) <= 2.0 * RATIO_TOLERANCE


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # unreadable here is reported when the image is read for the prediction
        return None


def auto_projection(path: Path) -> tuple[str, str]:
    """``--projection auto`` for one image file -> ("equirect" | "perspective", the rule that decided, for
    the sidecar): equirect only for a 2:1 image whose XMP says GPano:ProjectionType equirectangular."""
    tag = xmp_projection(path)
    size = image_size(path)
    two_to_one = size is not None and is_two_to_one(*size)
    said = tag == "equirectangular"
    if said and two_to_one:
        return "equirect", "auto: 2:1 and XMP GPano:ProjectionType equirectangular"
    if said:
        shape = f"{size[0]}x{size[1]}" if size else "of unknown size"
        return "perspective", f"auto: XMP says equirectangular but the image is {shape}, not 2:1 (a partial sphere)"
    if two_to_one:
        why = f"XMP GPano:ProjectionType is {tag}" if tag else "no XMP GPano:ProjectionType"
        return "perspective", f"auto: 2:1 but {why}"
    return "perspective", "auto: not a 2:1 image with XMP GPano:ProjectionType equirectangular"
