"""Camera-frame conventions, as pure numpy functions with stated axes.

Lotus predicts normals in its own camera frame: x LEFT, y UP, z TOWARD the camera (a wall facing the
camera is (0, 0, 1), a floor (0, 1, 0)). Other tools expect other frames; every frame here is the
Lotus frame with some axes reversed, so conversion is a sign flip per axis, its own inverse.
"""

from __future__ import annotations

import numpy as np

# name -> (signs applied to Lotus's (x, y, z), description)
NORMAL_FRAMES: dict[str, tuple[tuple[int, int, int], str]] = {
    "lotus": ((1, 1, 1), "x left, y up, z toward the camera (Lotus camera frame)"),
    "opengl": ((-1, 1, 1), "x right, y up, z toward the camera (OpenGL / Blender camera frame)"),
    "opencv": ((-1, -1, -1), "x right, y down, z away from the camera (OpenCV camera frame)"),
}


def convert_normals(n: np.ndarray, frame: str, source: str = "lotus") -> np.ndarray:
    """Normals [..., 3] from frame ``source`` to frame ``frame`` (names in NORMAL_FRAMES)."""
    a, b = np.asarray(NORMAL_FRAMES[source][0]), np.asarray(NORMAL_FRAMES[frame][0])
    signs = (a * b).astype(n.dtype)  # each frame's signs are their own inverse
    return n * signs
