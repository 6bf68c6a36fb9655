"""Equirectangular panoramas as a set of overlapping perspective views, in pure numpy.

Panorama frame. The OpenCV axes of a camera at the panorama's centre looking at its middle column: x right,
y down, z forward (longitude 0, latitude 0). A direction of longitude ``lon`` (radians, -pi at the left
edge, 0 in the middle, increasing to the right: turning right) and latitude ``lat`` (+pi/2 up, -pi/2 down) is
``(cos lat sin lon, -sin lat, cos lat cos lon)``.

Pixels. An equirectangular image is H x W (W = 2H for a full sphere); pixel centres at integer (u, v) as in
camera.py, so pixel (u, v) looks along ``lon = 2 pi (u + 0.5) / W - pi``, ``lat = pi / 2 - pi (v + 0.5) / H``.
Column W - 1 and column 0 are neighbours (the longitude wrap); the top and bottom rows circle the poles.

Views. A ``View`` is a square pinhole camera (``camera.Intrinsics``) turned by ``yaw`` (right) then
``pitch`` (up) from the panorama's forward axis; its rotation takes view-camera vectors (OpenCV axes) to
the panorama frame. Normals in Lotus's axes (x left, y up, z toward the camera) are the OpenCV ones negated,
which commutes with a rotation, so the same matrix rotates them: the panorama's normals are stated in Lotus's
axes of the forward view (longitude 0, latitude 0).

Depth along a view's axis z and distance along the ray r differ by the ray's angle to the axis:
``z = r cos(theta)``. A view's disparity 1/z therefore becomes the ray's inverse distance 1/r by a factor
cos(theta), and a depth z becomes r by 1/cos(theta) (``ray_factor``): the quantity every view shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from . import camera as g
from .camera import Intrinsics, edge_mask, intrinsics_from_fov
from .cloud import FRAMES, NORMAL_FALLBACK, NORMAL_SOURCES, CloudOptions, check_size, gather, metric_depth
from .mesh import Mesh

CUBE = (("front", 0.0, 0.0), ("right", 90.0, 0.0), ("back", 180.0, 0.0), ("left", -90.0, 0.0))
POLES = (("up", 0.0, 90.0), ("down", 0.0, -90.0))
LTS_KEEP = 0.5  # the share of the pairs least trimmed squares fits: tolerates up to half of them being wrong
LTS_STEPS = 20
TOLERANCE = 1e-4  # of the shared quantity: pairs of views agreeing this well are never trimmed


# ------------------------------------------------------------------------------------- directions


def equirect_angles(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(lon [W], lat [H]) in radians of the pixel centres of an H x W equirectangular image (module doc)."""
    lon = 2 * math.pi * (np.arange(width) + 0.5) / width - math.pi
    lat = math.pi / 2 - math.pi * (np.arange(height) + 0.5) / height
    return lon, lat


def directions(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Unit directions [..., 3] in the panorama frame (x right, y down, z forward) of broadcast lon, lat."""
    lon, lat = np.broadcast_arrays(lon, lat)
    c = np.cos(lat)
    return np.stack([c * np.sin(lon), -np.sin(lat), c * np.cos(lon)], axis=-1)


def pixel_directions(height: int, width: int, rows: tuple[int, int] | None = None, dtype=np.float32) -> np.ndarray:
    """Directions [r, W, 3] of the pixel centres of rows ``rows`` = (y0, y1) (default: all) of an H x W panorama."""
    lon, lat = equirect_angles(height, width)
    y0, y1 = rows or (0, height)
    return directions(lon[None, :], lat[y0:y1, None]).astype(dtype)


def to_equirect(d: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Directions [..., 3] (any length) -> their (x, y) pixel coordinates [...] in an H x W panorama, pixel
    centres at integers; x in [-0.5, W - 0.5) (the wrap is the sampler's), y in [-0.5, H - 0.5]."""
    lon = np.arctan2(d[..., 0], d[..., 2])
    lat = np.arctan2(-d[..., 1], np.hypot(d[..., 0], d[..., 2]))
    x = (lon + math.pi) / (2 * math.pi) * width - 0.5
    y = (math.pi / 2 - lat) / math.pi * height - 0.5
    return x, y


# ------------------------------------------------------------------------------------------ views


def rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """[3, 3] taking a view camera's vectors (OpenCV axes) to the panorama frame: pitch up, then yaw right.
    Its forward axis (0, 0, 1) becomes (cos p sin y, -sin p, cos p cos y)."""
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    return ry @ rx


@dataclass(frozen=True)
class View:
    """A square perspective view of the sphere: ``fov`` degrees edge to edge on both axes, ``size`` pixels a
    side, looking ``yaw`` degrees right and ``pitch`` degrees up of the panorama's forward axis. ``core``
    (degrees wide, <= fov) and ``core_v`` (degrees high; None: as wide) frame the rectangle around its centre
    where its weight is 1; from there its weight falls to 0 at its border (``border_ramp``)."""

    name: str
    yaw: float
    pitch: float
    fov: float
    core: float
    size: int
    core_v: float | None = None

    @property
    def rotation(self) -> np.ndarray:
        return rotation(self.yaw, self.pitch)

    @property
    def intrinsics(self) -> Intrinsics:
        return intrinsics_from_fov(self.size, self.size, self.fov)

    def rays(self) -> np.ndarray:
        """Directions [S, S, 3] of the view's pixel centres in its own camera frame, z = 1 (not unit)."""
        K = self.intrinsics
        u = (np.arange(self.size) - K.cx) / K.fx
        return np.stack(np.broadcast_arrays(u[None, :], u[:, None], np.ones((self.size, self.size))), -1)

    def project(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Panorama directions [..., 3] -> (u, v, ahead) in this view: pixel coordinates (centres at
        integers) and whether the direction points ahead of the camera (else u, v are meaningless)."""
        c = d @ self.rotation.astype(d.dtype)  # row vectors: R^T d, the direction in the view's frame
        z = c[..., 2]
        ahead = z > 1e-6
        zs = np.where(ahead, z, 1)
        K = self.intrinsics
        return K.fx * c[..., 0] / zs + K.cx, K.fy * c[..., 1] / zs + K.cy, ahead

    def inside(self, u: np.ndarray, v: np.ndarray, ahead: np.ndarray) -> np.ndarray:
        """Where (u, v) lies on the view's image (pixel edges at -0.5 and S - 0.5)."""
        lim = self.size - 0.5
        return ahead & (u >= -0.5) & (u <= lim) & (v >= -0.5) & (v <= lim)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "yaw_deg": self.yaw,
            "pitch_deg": self.pitch,
            "fov_deg": self.fov,
            "core_deg": [self.core, self.core if self.core_v is None else self.core_v],
            "size": self.size,
        }


def cube_views(fov: float, size: int) -> list[View]:
    """The six faces of a cube (front, right, back, left, up, down), each widened to ``fov`` degrees (> 90:
    neighbours then share a band of (fov - 90) / 2 degrees beyond each edge), core the 90 degree face."""
    if not 90 < fov < 180:
        raise ValueError(f"a cube face must be widened to between 90 and 180 degrees, not {fov}")
    return [View(n, y, p, fov, 90.0, size) for n, y, p in CUBE + POLES]


def ring_views(count: int, fov: float, size: int) -> list[View]:
    """``count`` views around the horizon, each with a core 360 / count degrees wide and 90 high, plus the
    cube's up and down faces (core 90 degrees): every ray lies in some view's core, and most in the blend
    bands of two or three views. More views than the cube's six, each sharing more with its neighbours."""
    core = 360.0 / count
    if not 90 < fov < 180 or count < 4:
        raise ValueError(f"a ring needs 4 or more views of 90 to 180 degrees, not {count} of {fov}")
    ring = [View(f"h{i}", (i * core + 180.0) % 360.0 - 180.0, 0.0, fov, core, size, 90.0) for i in range(count)]
    return ring + [View(n, y, p, fov, 90.0, size) for n, y, p in POLES]


def native_view_size(width: int, fov: float) -> int:
    """Pixels a side at which a view of ``fov`` degrees samples the sphere as densely as an equirectangular
    image ``width`` pixels wide does at its equator (W / 2 pi pixels per radian at the view's centre)."""
    return max(8, round(width / math.pi * math.tan(math.radians(fov) / 2)))


def ray_cos(view: View, u: np.ndarray | None = None, v: np.ndarray | None = None) -> np.ndarray:
    """cos(theta) of the rays through view pixel coordinates (u, v) [...] against the view's optical axis
    (default: every pixel centre, [S, S])."""
    if u is None or v is None:
        v, u = np.mgrid[0 : view.size, 0 : view.size].astype(np.float64)
    K = view.intrinsics
    return 1.0 / np.sqrt(1.0 + ((u - K.cx) / K.fx) ** 2 + ((v - K.cy) / K.fy) ** 2)


def ray_factor(kind: str, cos: np.ndarray) -> np.ndarray:
    """The factor taking a view's map of ``kind`` to the shared per-ray quantity: disparity 1/z -> 1/r is
    x cos(theta); depth z -> r is x 1/cos(theta)."""
    if kind == "disparity":
        return cos
    if kind == "depth":
        return 1.0 / cos
    raise ValueError(f"kind must be depth or disparity, not {kind!r}")


def border_ramp(view: View, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where (u, v) lies between the view's core (1) and its border (0), linearly in the tangent plane, by
    the axis nearer its border; callers shape it (a smoothstep) and normalise over the views."""
    K = view.intrinsics
    half = view.size / 2  # pixel edges at +-half from the centre
    edge = math.tan(math.radians(view.fov) / 2)
    t = None
    for d, core in (
        (np.abs(u - K.cx), view.core),
        (np.abs(v - K.cy), view.core if view.core_v is None else view.core_v),
    ):
        a_core = math.tan(math.radians(core) / 2) / edge  # where the core ends, as a fraction of the half side
        ti = (1 - d / half) / max(1 - a_core, 1e-9)  # 1 at the core's edge, 0 at the view's border
        t = ti if t is None else np.minimum(t, ti)
    return np.clip(t, 0.0, 1.0)


# ---------------------------------------------------------------------------------------- sampling


def sample_bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray, wrap_x: bool = False) -> np.ndarray:
    """Bilinear samples of ``img`` [H, W] or [H, W, C] at pixel coordinates (x, y) [...] (centres at
    integers) -> [...] or [..., C] float32. With ``wrap_x`` columns wrap (column -1 is W - 1: a panorama's
    longitude); rows, and columns without it, clamp at the edge pixels."""
    h, w = img.shape[:2]
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx = (x - x0).astype(np.float32)
    fy = (y - y0).astype(np.float32)
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    if wrap_x:
        xa, xb = x0 % w, (x0 + 1) % w
    else:
        xa, xb = np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)
    ya, yb = np.clip(y0, 0, h - 1), np.clip(y0 + 1, 0, h - 1)
    if img.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]

    def at(yy, xx):  # gathered first, then made float: never a float copy of a whole (uint8) panorama
        return img[yy, xx].astype(np.float32, copy=False)

    top = at(ya, xa) * (1 - fx) + at(ya, xb) * fx
    bottom = at(yb, xa) * (1 - fx) + at(yb, xb) * fx
    return top * (1 - fy) + bottom * fy


def equirect_to_view(pano: np.ndarray, view: View) -> np.ndarray:
    """The view's image [S, S, ...] resampled bilinearly from an equirectangular ``pano`` [H, W, ...] (the
    longitude wraps); uint8 stays uint8 (rounded), anything else comes back float32."""
    h, w = pano.shape[:2]
    d = view.rays() @ view.rotation.T  # [S, S, 3] in the panorama frame (length is irrelevant)
    x, y = to_equirect(d, h, w)
    out = sample_bilinear(pano, x, y, wrap_x=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8) if pano.dtype == np.uint8 else out


def rotate_normals(n: np.ndarray, view: View) -> np.ndarray:
    """Normals [..., 3] in a view's frame (Lotus axes, or OpenCV axes) -> the panorama's (the same axes)."""
    return (n @ view.rotation.T.astype(np.float32)).astype(np.float32)


# ------------------------------------------------------------------------------------------- fitting


def joint_scale_shift(
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    views: int,
    fixed: int = 0,
    iters: int = 3,
    k: float = 2.5,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Every view's (scale, shift) at once, so that where two views see the same ray they agree.

    ``pairs`` = (i, j, mi, mj, fi, fj), arrays [P]: views i and j see one ray; their maps there are mi, mj and
    their ray factors fi, fj (``ray_factor``). Unknowns s, b [views] minimise the sum over pairs of
    ``(fi (s_i mi + b_i) - fj (s_j mj + b_j))^2`` with ``s[fixed] = 1``: one linear least-squares system.
    Only the scale needs fixing: as the ray factor varies across an overlap, a shift of a view's map is not
    a shift of the shared quantity, so the overlaps determine the shifts (exactly, for exact maps).
    Robust to outliers: least trimmed squares (the best-fitting half of each pair of views' rays, LTS_STEPS
    refits at most), then ``iters`` refits on the rays whose residual lies within ``k`` robust sigmas of
    their pair of views (median and MAD of the kept residuals). Returns (s, b, record): the residuals' RMS,
    absolute and relative to the shared quantity, and the pairs kept.
    """
    i, j, mi, mj, fi, fj = (np.asarray(a) for a in pairs)
    n = len(i)
    a = np.zeros((n, 2 * views))
    rows = np.arange(n)
    a[rows, i] += fi * mi
    a[rows, views + i] += fi
    a[rows, j] -= fj * mj
    a[rows, views + j] -= fj
    rhs = -a[:, fixed]  # s_fixed = 1 moves to the right-hand side
    cols = [c for c in range(2 * views) if c != fixed]
    a = a[:, cols]
    keep = np.ones(n, bool)
    x = np.zeros(len(cols))
    # residuals below this agree as well as the maps can be read (float32 maps, bilinear samples): trimming
    # them would only make the kept rays arbitrary, and a view whose overlaps see one flat surface undetermined
    floor = TOLERANCE * float(np.median(np.abs(fi * mi))) if n else 0.0

    def solve(rows):
        return np.linalg.lstsq(a[rows], rhs[rows], rcond=None)[0] if rows.sum() >= len(cols) else x

    # Least trimmed squares first (refits on the half of each pair of views' rays that fit best, until they
    # stop changing): least squares over every pair can be pulled so far by gross outliers that a threshold
    # around it keeps them. Trimmed per pair of views, never over all: the best half overall could be the
    # pairs between views collapsed to s = b = 0 (0 = 0 fits perfectly), leaving the fixed view out. Then
    # the inliers by each pair of views' robust sigma around that solution.
    groups = [np.flatnonzero((i == gi) & (j == gj)) for gi, gj in sorted(set(zip(i.tolist(), j.tolist())))]
    x = solve(keep)
    for _ in range(LTS_STEPS):
        r = np.abs(a @ x - rhs)
        best = np.zeros(n, bool)
        for group in groups:
            best[group] = r[group] <= max(np.quantile(r[group], LTS_KEEP), floor)
        if np.array_equal(best, keep):
            break
        keep = best
        x = solve(keep)
    for _ in range(iters):
        r = a @ x - rhs
        for group in groups:
            rg = r[group][keep[group]] if keep[group].any() else r[group]
            med = np.median(rg)
            keep[group] = np.abs(r[group] - med) <= k * 1.4826 * np.median(np.abs(rg - med)) + floor
        x = solve(keep)
    r = a @ x - rhs
    full = np.insert(x, fixed, 1.0)
    s, b = full[:views], full[views:]
    rk = r[keep]
    q = (fi * (s[i] * mi + b[i]))[keep]  # the shared quantity the kept pairs agree on
    rms, size = (float(np.sqrt(np.mean(rk**2))), float(np.sqrt(np.mean(q**2)))) if rk.size else (0.0, 0.0)
    record = {
        "pairs": int(n),
        "pairs_kept": int(keep.sum()),
        "rms_residual": rms,
        "relative_rms_residual": rms / size if size > 0 else None,
    }
    return s, b, record


# ------------------------------------------------------------------------------ clouds on the sphere

SPHERE_FRAME = "panorama frame: x right, y down, z forward (the panorama's middle column), metres"
SPHERE_CAMERA = "equirectangular: each pixel's ray by its longitude and latitude (geometry/panorama.py)"


def sphere_points(distance: np.ndarray) -> np.ndarray:
    """Distance along the ray [H, W] (metres; NaN or <= 0 = none, giving NaN) of an equirectangular map ->
    points [H, W, 3] float32 in the panorama frame."""
    h, w = distance.shape
    r = np.where(np.isfinite(distance) & (distance > 0), distance, np.nan)
    return (pixel_directions(h, w, dtype=np.float64) * r[..., None]).astype(np.float32)


def wrapped_edge_mask(distance: np.ndarray, threshold: float) -> np.ndarray:
    """``camera.edge_mask`` of an equirectangular map, column W - 1 compared with column 0 too (the longitude
    wrap): [H, W] True where a pixel has a distance and no relative jump above ``threshold`` to a neighbour."""

    ext = edge_mask(np.concatenate([distance, distance[:, :1]], axis=1), threshold)  # column W = column 0
    keep = ext[:, :-1]
    keep[:, 0] &= ext[:, -1]
    return keep


def sphere_normals(points: np.ndarray) -> np.ndarray:
    """Unit normals [H, W, 3] of the surface through points [H, W, 3] (panorama frame; NaN = none) from
    central differences along the rows (wrapping at the longitude seam) and the columns (one-sided at the
    top and bottom rows), facing the panorama's centre; NaN where a difference has no valid end."""
    p = points.astype(np.float64)
    du = np.roll(p, -1, axis=1) - np.roll(p, 1, axis=1)
    dv = np.empty_like(p)
    dv[1:-1] = p[2:] - p[:-2]
    dv[0], dv[-1] = p[1] - p[0], p[-1] - p[-2]
    n = np.cross(dv, du)
    with np.errstate(invalid="ignore", divide="ignore"):
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        n[(n * p).sum(-1) > 0] *= -1  # a surface seen from the centre faces it
    return n.astype(np.float32)


def make_sphere_cloud(
    rgb: np.ndarray,
    values: np.ndarray,
    kind: str,
    camera_opts,
    scale_opts,
    cloud_opts=None,
    *,
    per_metre: float | None = None,
    normals: str = "depth",
    normals_lotus: np.ndarray | None = None,
    exif_f35: float | None = None,
    input_size: tuple[int, int] | None = None,
    align: np.ndarray | None = None,
    reuse: dict | None = None,
    units_assumed: str | None = None,
    projection_rule: str = "--projection equirect",
):
    """``cloud.make_cloud`` for an equirectangular map [H, W] of ``kind`` along the ray (disparity: inverse
    distance; depth: distance) coloured by rgb [H, W, 3]: each kept pixel at its distance along its own ray,
    in the panorama frame (or OpenGL's with ``cloud_opts.up`` "y"). The scale and shift come as for a
    perspective map (``cloud.metric_depth``: --near/--far, --align-to with a metric distance map, ...);
    no camera applies (``camera_opts``, ``exif_f35`` and ``input_size`` are taken for the same call and
    unused). ``normals``: "predict" (``normals_lotus``, the panorama's normals in Lotus axes), "depth" or
    "none"."""

    cloud_opts = cloud_opts or CloudOptions()
    h, w = values.shape
    check_size(w, h, "the depth map")
    if scale_opts.shape_from_normals:
        raise UsageError("--shape-from-normals needs a pinhole camera; a panorama has none", "use --near/--far")
    if reuse is not None:
        distance = g.to_depth(values, kind, reuse["scale"], reuse["shift"])
        depth_record = {
            "method": "the clip's first frame's scale and shift, this frame's map aligned to the clip",
            **{k: reuse[k] for k in ("scale", "shift", "assumed")},
            "kind": kind,
        }
    else:
        distance, depth_record = metric_depth(
            values, kind, scale_opts, per_metre=per_metre, align=align, units_assumed=units_assumed
        )
    depth_record["along"] = "the ray (distance from the panorama's centre), not an optical axis"
    finite = np.isfinite(distance) & (distance > 0)
    smooth = wrapped_edge_mask(distance, cloud_opts.edge_threshold)
    pts_all = sphere_points(distance)
    if normals == "predict":
        nrm_all = g.convert_normals(normals_lotus.astype(np.float32), "opencv")
    elif normals == "depth":
        nrm_all = sphere_normals(pts_all)
    else:
        nrm_all = None
    frame = SPHERE_FRAME if cloud_opts.up == "opencv" else FRAMES["y"].replace("camera frame", "panorama frame")
    fallback = NORMAL_FALLBACK.replace("camera", "panorama's centre")
    cloud = gather(rgb, pts_all, nrm_all, finite, smooth, cloud_opts, frame, fallback)
    normals_text = (
        "from the distances (differences of the points on the sphere, wrapping at the longitude seam)"
        if normals == "depth"
        else NORMAL_SOURCES[normals].replace("camera", "panorama's centre")
    )
    cloud.record = {
        "camera": {"projection": "equirect", "width": w, "height": h, "model": SPHERE_CAMERA},
        "camera_source": projection_rule,
        "depth": depth_record,
        "normals": normals_text,
        "cloud": cloud.record,
        "units": "metres",
        "assumed": list(depth_record["assumed"]),
    }
    return cloud


def sphere_header_comments(record: dict) -> list[str]:
    """``cloud.header_comments`` for a panorama's cloud (no pinhole camera to state)."""
    d = record["depth"]
    lines = [
        f"lotus-cli {record.get('lotus_cli', '')} {record.get('model') or record.get('depth_input', '')}".strip(),
        f"frame {record['cloud']['frame']}",
        f"camera {SPHERE_CAMERA}, {record['camera']['width']}x{record['camera']['height']}",
        f"depth {d['method']} ({d['kind']} along the ray)",
    ]
    if "scale" in d:
        lines.append(f"depth scale {d['scale']:.6g} shift {d['shift']:.6g}")
    lines.append("assumed " + ("; ".join(record["assumed"]) if record["assumed"] else "nothing"))
    lines.append(f"normals {record['normals']}")
    return lines


def sphere_mesh(cloud, stride: int = 1):
    """``mesh.from_cloud`` on the sphere: two triangles per 2 x 2 block of grid points (every ``stride``-th
    row and column) whose pixels all passed the cleaning, including the blocks across the longitude wrap
    (the last grid column joined to column 0), and at each pole a fan over the first (last) grid row when
    every pixel of that row passed (so no cap bridges a depth edge). Vertices of column 0 in the wrap blocks
    are duplicated with u + 1, so the texture runs on across the seam instead of back over the image."""

    h, w = cloud.kept.shape
    s = stride
    index = np.full(h * w, -1, np.int64)
    index[cloud.pixels] = np.arange(len(cloud.pixels))
    index = index.reshape(h, w)
    kept = np.concatenate([cloud.kept, cloud.kept[:, :1]], axis=1)  # column W is column 0 again
    bad = np.zeros((h + 1, w + 2), np.int64)  # summed-area table of the pixels not kept
    bad[1:, 1:] = np.cumsum(np.cumsum(~kept, 0), 1)
    rows = np.arange(0, h - s, s)
    gcols = np.arange(0, w, s)
    c0 = gcols
    c1 = np.append(gcols[1:], w)  # the last grid column's block closes onto column 0 (= W)

    def clean(r0, r1, a, b):  # every pixel of rows r0..r1, columns a..b (inclusive) kept
        return bad[r1 + 1][:, b + 1] - bad[r0][:, b + 1] - bad[r1 + 1][:, a] + bad[r0][:, a] == 0

    ok = clean(rows, rows + s, c0, c1)  # [rows, cols]
    bi, bj = np.nonzero(ok)
    r, a, b = rows[bi], c0[bj], c1[bj]
    wrap = b == w
    n = len(cloud.points)
    right = np.where(wrap, n + index[r, 0], index[r, b % w])  # column 0 in a wrap block: its duplicate
    right_down = np.where(wrap, n + index[r + s, 0], index[r + s, b % w])
    tl, bl = index[r, a], index[r + s, a]
    tri = [np.stack([tl, bl, right], -1), np.stack([bl, right_down, right], -1)]
    blocks = 2 * len(r)
    for row in [0, rows[-1] + s] if len(rows) else []:  # the poles' rings: the first and last grid rows
        ring = index[row, gcols]
        if cloud.kept[row].all() and (ring >= 0).all() and len(ring) >= 3:
            tri.append(np.stack([np.full(len(ring) - 2, ring[0]), ring[1:-1], ring[2:]], -1))
    tri = np.concatenate(tri) if tri else np.zeros((0, 3), np.int64)
    if len(tri) and tri.min() < 0:
        raise ValueError("the cloud lacks points of its kept grid: build it with max_points=0 and the same stride")
    points = np.concatenate([cloud.points, cloud.points])  # a duplicate of each, used for column 0 at the wrap
    p = points[tri].astype(np.float64)
    normal = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    away = (normal * p.mean(1)).sum(-1) > 0  # the caps' fans wind either way: every face is seen from inside
    tri[away] = tri[away][:, ::-1]
    used = np.unique(tri)
    remap = np.full(2 * n, -1, np.int64)
    remap[used] = np.arange(len(used))
    source = used % n  # the cloud point each vertex is
    rows_, cols_ = np.divmod(cloud.pixels[source], w)
    u = (cols_ + 0.5) / w + (used >= n)  # duplicates: one texture width on
    uvs = np.stack([u, 1 - (rows_ + 0.5) / h], -1).astype(np.float32)
    record = {
        "vertices": len(used),
        "triangles": len(tri),
        "wrap_triangles": int(2 * wrap.sum()),
        "pole_triangles": len(tri) - blocks,
        "points_in_no_triangle": n - len(np.unique(source)),
        "stride": s,
        "rule": "two triangles per 2x2 block of grid points whose pixels all passed the flying-pixel test, "
        "across the longitude wrap too; a fan over each pole's ring when every pixel of its row passed",
    }
    normals = cloud.normals[source] if cloud.normals is not None else None
    return Mesh(
        cloud.points[source], remap[tri].astype(np.int32), normals, cloud.colors[source], uvs, source, cloud.up, record
    )
