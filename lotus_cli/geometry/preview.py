"""A preview picture of a cloud or mesh from a camera turned a few degrees off the input view (pure numpy).

Open3D's offscreen renderer needs a GPU context (EGL, OSMesa or Vulkan) that headless machines and CI
lack, so this is a plain z-buffer: points are splatted as small squares, meshes are sampled densely over
each triangle, and the nearest sample wins each pixel. The picture has two panels side by side: the
colours, and grey shading by the normals under a light from above left of the viewer (the shape,
without the texture).

The preview camera has the input camera's intrinsics and is turned by ``yaw`` (about the vertical axis,
positive: the viewer moves right) and ``pitch`` (positive: the viewer moves up) around a pivot on the
optical axis at the scene's median depth, so the scene stays in the middle of the picture.
"""

from __future__ import annotations

import math

import numpy as np

from .camera import TO_OPENGL, Intrinsics, edge_lengths

YAW, PITCH = 12.0, 6.0  # degrees: enough parallax to show depth, little enough to keep the input's framing

BACKGROUND = 24  # grey level of pixels nothing covers
AMBIENT = 0.25  # share of light that reaches surfaces facing away from the lamp
LAMP = np.array([-0.4, -0.6, -1.0]) / np.linalg.norm([-0.4, -0.6, -1.0])  # toward the lamp: up, left, at the viewer


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """[3, 3] rotation taking OpenCV camera coordinates of the input camera to the preview camera's."""
    a, b = -math.radians(yaw_deg), -math.radians(pitch_deg)  # the scene turns the other way than the viewer
    ry = np.array([[math.cos(a), 0, -math.sin(a)], [0, 1, 0], [math.sin(a), 0, math.cos(a)]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), math.sin(b)], [0, -math.sin(b), math.cos(b)]])
    return rx @ ry


def _samples(vertices: np.ndarray, faces: np.ndarray, pixel_len: np.ndarray, *extra: np.ndarray):
    """Points spread over each triangle (barycentric grids of n + 1 rows, n = its longest projected edge in
    pixels, 1..32), with ``extra`` per-vertex attributes interpolated the same way. Returns (points, *extra)."""
    n_per = np.clip(np.ceil(pixel_len), 1, 32).astype(int)
    out = [[] for _ in range(1 + len(extra))]
    for n in np.unique(n_per):
        f = faces[n_per == n]
        i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
        keep = i + j <= n
        w = np.stack([n - i[keep] - j[keep], i[keep], j[keep]], -1) / n  # [S, 3] barycentric weights
        for k, attr in enumerate((vertices, *extra)):
            out[k].append(np.einsum("sk,fkc->fsc", w, attr[f].astype(np.float32)).reshape(-1, attr.shape[-1]))
    return [np.concatenate(o) if o else np.zeros((0, a.shape[-1]), np.float32) for o, a in zip(out, (vertices, *extra))]


def render(
    points: np.ndarray,
    colors: np.ndarray,
    normals: np.ndarray | None,
    K: Intrinsics,
    faces: np.ndarray | None = None,
    yaw: float = YAW,
    pitch: float = PITCH,
    splat: int = 1,
    max_side: int = 1024,
) -> np.ndarray | None:
    """The preview, uint8 [h, 2 w, 3] (colours | shading), of points [N, 3] (metres, OpenCV camera frame of
    the camera ``K``), colors [N, 3] uint8 and unit normals [N, 3] (None: shading by depth, near bright).
    With ``faces`` [F, 3] the points are a mesh's vertices and its triangles are drawn; else each point
    covers a square of 2 ``splat`` + 1 pixels. The picture is K's size, scaled down to ``max_side``
    (``scale``). None when there is nothing to show: no points, or none in front of the preview camera."""
    finite = np.isfinite(points).all(-1) if len(points) else np.zeros(0, bool)
    if not finite.any():
        return None
    f = scale(K, max_side)
    w, h = max(1, round(K.width * f)), max(1, round(K.height * f))
    Kp = K.resized(w, h)
    pivot = np.array([0.0, 0.0, float(np.median(points[finite, 2]))])
    R = _rotation(yaw, pitch)
    q = (points.astype(np.float64) - pivot) @ R.T + pivot  # [N, 3] in the preview camera's frame
    nr = normals.astype(np.float64) @ R.T if normals is not None else None
    col = colors.astype(np.float32)
    if faces is not None and len(faces):
        uv = np.stack([Kp.fx * q[:, 0] / q[:, 2] + Kp.cx, Kp.fy * q[:, 1] / q[:, 2] + Kp.cy], -1)
        longest = edge_lengths(uv, faces).max(-1)  # [F], in preview pixels
        attrs = (col, nr) if nr is not None else (col,)
        q, col, *rest = _samples(q, faces, longest, *attrs)
        nr = rest[0] if rest else None
        splat = 0
    front = q[:, 2] > 1e-6  # NaN compares False: a point without a position is not drawn
    if not front.any():
        return None
    q, col = q[front], col[front]
    nr = nr[front] if nr is not None else None
    u = np.round(Kp.fx * q[:, 0] / q[:, 2] + Kp.cx).astype(np.int64)
    v = np.round(Kp.fy * q[:, 1] / q[:, 2] + Kp.cy).astype(np.int64)
    if nr is not None:
        light = AMBIENT + (1 - AMBIENT) * np.clip(nr @ LAMP, 0, 1)  # walls, floor and sides differ in grey
    else:
        z = q[:, 2]
        light = 1 - 0.75 * (z - z.min()) / max(float(np.ptp(z)), 1e-9)
    shade = np.repeat((light * 255)[:, None], 3, axis=1)
    pictures = [np.full((h, w, 3), BACKGROUND, np.uint8) for _ in range(2)]
    offsets = [(dy, dx) for dy in range(-splat, splat + 1) for dx in range(-splat, splat + 1)]
    pu = np.concatenate([u + dx for _, dx in offsets])
    pv = np.concatenate([v + dy for dy, _ in offsets])
    pz = np.tile(q[:, 2], len(offsets))
    src = np.tile(np.arange(len(q)), len(offsets))
    inside = (pu >= 0) & (pu < w) & (pv >= 0) & (pv < h)
    if not inside.any():
        return None
    pix, pz, src = (pv * w + pu)[inside], pz[inside], src[inside]
    order = np.lexsort((pz, pix))  # by pixel, nearest first
    pix, src = pix[order], src[order]
    first = np.ones(len(pix), bool)
    first[1:] = pix[1:] != pix[:-1]
    for picture, value in zip(pictures, (col, shade)):
        picture.reshape(-1, 3)[pix[first]] = np.clip(value[src[first]], 0, 255).astype(np.uint8)
    return np.concatenate(pictures, axis=1)


def scale(K: Intrinsics, max_side: int = 1024) -> float:
    """Preview pixels per pixel of ``K``'s image: 1, or less for an image larger than ``max_side``."""
    return min(1.0, max_side / max(K.width, K.height))


def splat_for(stride: int, K: Intrinsics, max_side: int = 1024) -> int:
    """The half-width (preview pixels) of the square each point of a cloud thinned by ``stride`` covers: the
    points' spacing in the preview, so neighbouring squares overlap by half and a surface seen more obliquely
    by the turned preview camera (rows of a floor spread apart) stays closed, as at stride 1; at least 1."""
    return max(1, math.ceil(stride * scale(K, max_side)))


def render_cloud(shown, K: Intrinsics, stride: int = 1) -> np.ndarray | None:
    """``render`` for a ``pointcloud.Cloud`` or a ``mesh.Mesh`` (either frame), points splatted over the
    ``stride`` they were thinned by (``splat_for``). None when there is nothing to show (an empty cloud or
    mesh): write no picture then."""
    faces = getattr(shown, "faces", None)
    pts = shown.vertices if faces is not None else shown.points
    flip = TO_OPENGL if shown.up == "y" else np.ones(3, np.float32)  # back to OpenCV (the flip is its own inverse)
    normals = shown.normals * flip if shown.normals is not None else None
    return render(pts * flip, shown.colors, normals, K, faces, splat=splat_for(stride, K))


def describe() -> dict:
    """What the preview shows, for the sidecar."""
    return {
        "panels": "colours | grey shading by the normals (lamp above left of the viewer)",
        "view": f"the input camera turned {YAW:g} degrees right and {PITCH:g} degrees up around the scene's "
        "median depth",
        "renderer": "numpy z-buffer (points as squares, mesh triangles sampled)",
    }
