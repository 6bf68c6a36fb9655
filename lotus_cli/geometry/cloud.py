"""Depth maps -> honest metric point clouds: camera, scale and shift, cleaning, and what was assumed.

Pure numpy over camera.py; the point-cloud pipeline (run/pointcloud.py) reads files and runs the models. Points are in
metres in the OpenCV camera frame (x right, y down, z forward) unless ``up="y"`` asks for the OpenGL frame
(x right, y up, z toward the viewer), which most viewers show upright. Every number that was assumed
rather than measured is said so in the returned records, which go into the sidecar and the PLY header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, UsageError
from . import camera as g

DEFAULT_NEAR, DEFAULT_FAR = 1.0, 10.0  # metres: an indoor-to-street guess, stated as assumed in every output
FRAMES = {
    "opencv": "OpenCV camera frame: x right, y down, z forward (away from the camera), metres",
    "y": "OpenGL camera frame: x right, y up, z toward the viewer (the camera looks down -z), metres",
}


# ------------------------------------------------------------------------------------------- camera


@dataclass(frozen=True)
class CameraOptions:
    """At most one of: horizontal field of view ``fov`` (degrees), ``focal_px`` (pixels of the input image),
    ``intrinsics`` (fx, fy, cx, cy in pixels of the input image). None of them: EXIF's 35 mm equivalent
    focal length when the file has one, else a ``geometry.DEFAULT_FOV`` horizontal field of view."""

    fov: float | None = None
    focal_px: float | None = None
    intrinsics: tuple[float, float, float, float] | None = None

    def __post_init__(self):
        given = [
            n
            for n, v in (("--fov", self.fov), ("--focal-px", self.focal_px), ("--intrinsics", self.intrinsics))
            if v is not None
        ]
        if len(given) > 1:
            raise UsageError(f"{' and '.join(given)} both describe the camera", "give only one of them")
        if self.fov is not None and not 0 < self.fov < 180:
            raise UsageError(f"--fov {self.fov}: must be between 0 and 180 degrees", "e.g. --fov 60")
        if self.focal_px is not None and not self.focal_px > 0:
            raise UsageError(f"--focal-px {self.focal_px}: must be positive", "focal length in pixels, e.g. 1000")
        if self.intrinsics is not None and (len(self.intrinsics) != 4 or min(self.intrinsics[:2]) <= 0):
            raise UsageError(
                f"--intrinsics {self.intrinsics}: expected fx,fy,cx,cy with positive fx, fy",
                "e.g. --intrinsics 518.9,519.5,325.6,253.7",
            )


def parse_intrinsics(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 4:
        raise UsageError(f"--intrinsics {text!r}: expected four numbers fx,fy,cx,cy", "e.g. 518.9,519.5,325.6,253.7")
    return vals


CENTRED = "principal point at the image centre"
SQUARE = "square pixels (fy = fx)"


def camera(
    width: int,
    height: int,
    opts: CameraOptions,
    exif_f35: float | None = None,
    input_size: tuple[int, int] | None = None,
) -> tuple[g.Intrinsics, str, list[str]]:
    """The intrinsics of a ``width`` x ``height`` map, where they came from, and what about them was assumed
    (everything but --intrinsics leaves the principal point and fy to assumption). Intrinsics the user gave
    are for the input image (``input_size`` (w, h), default the map's own size) and are scaled to the map."""
    iw, ih = input_size or (width, height)
    if opts.intrinsics is not None:
        fx, fy, cx, cy = opts.intrinsics
        K, source = g.Intrinsics(fx, fy, cx, cy, iw, ih), "--intrinsics"
    elif opts.focal_px is not None:
        K, source = g.intrinsics_from_focal(iw, ih, opts.focal_px), "--focal-px"
    elif opts.fov is not None:
        K, source = g.intrinsics_from_fov(iw, ih, opts.fov), "--fov"
    elif exif_f35:
        K = g.intrinsics_from_focal(iw, ih, g.focal_px_from_35mm(exif_f35, iw, ih))
        source = f"EXIF FocalLengthIn35mmFilm {exif_f35:g} mm"
    else:
        K, source = g.intrinsics_from_fov(iw, ih, g.DEFAULT_FOV), f"assumed: default {g.DEFAULT_FOV:g} degree fov"
    assumed = [] if opts.intrinsics is not None else [CENTRED, SQUARE]
    if source.startswith("assumed"):
        assumed.insert(0, f"{g.DEFAULT_FOV:g} degree horizontal field of view")
    return (K if (iw, ih) == (width, height) else K.resized(width, height)), source, assumed


MIN_SIDE = 2  # pixels: normals and the flying-pixel test compare each pixel with a neighbour on each axis


def check_size(width: int, height: int, what: str) -> None:
    """InputError naming ``what`` when a map or image is too small to back-project."""
    if min(width, height) < MIN_SIDE:
        raise InputError(
            f"{what}: {width}x{height} pixels is too small for a point cloud",
            f"give an image or map of at least {MIN_SIDE}x{MIN_SIDE} pixels",
        )


# ------------------------------------------------------------------------------------ scale and shift


@dataclass(frozen=True)
class ScaleOptions:
    """How an affine-invariant map gets metres. One of: ``align`` (a metric map is given to the call),
    ``depth_scale``/``depth_shift`` (depth kind: z = scale * v + shift), ``shape_from_normals`` (the shift
    from the predicted normals, the scale from ``near``), or ``near``/``far`` (the nearest and farthest
    predicted values, in metres; default DEFAULT_NEAR / DEFAULT_FAR, stated as assumed)."""

    near: float | None = None
    far: float | None = None
    depth_scale: float | None = None
    depth_shift: float | None = None
    shape_from_normals: bool = False
    align: bool = False

    def __post_init__(self):
        near, far = self.near_m, self.far_m
        if not 0 < near < far:
            raise UsageError(f"--near {near:g} --far {far:g}: need 0 < near < far", "e.g. --near 0.5 --far 20")
        affine = self.depth_scale is not None or self.depth_shift is not None
        fixed = [
            n
            for n, on in (
                ("--align-to", self.align),
                ("--depth-scale/--depth-shift", affine),
                ("--shape-from-normals", self.shape_from_normals),
            )
            if on
        ]
        if len(fixed) > 1:
            raise UsageError(f"{' and '.join(fixed)} each fix the scale and shift", "give only one of them")
        unused = [n for n, v in (("--near", self.near), ("--far", self.far)) if v is not None]
        if fixed and unused and not (self.shape_from_normals and unused == ["--near"]):
            raise UsageError(
                f"{' and '.join(unused)} would be ignored: {fixed[0]} fixes the scale and shift",
                "drop them" + (" (--shape-from-normals takes only --near)" if self.shape_from_normals else ""),
            )
        if self.depth_scale is not None and not self.depth_scale > 0:
            raise UsageError(f"--depth-scale {self.depth_scale}: must be positive", "metres per unit of the map")

    def check_kind(self, kind: str) -> None:
        """UsageError for options that cannot apply to a map of ``kind`` (known once the model or map is)."""
        if kind == "depth" and math.isinf(self.far_m):
            raise UsageError(
                "--far inf: only a disparity map can put its farthest value at infinity; this map is depth",
                "give a finite --far (metres)",
            )

    @property
    def near_m(self) -> float:
        return DEFAULT_NEAR if self.near is None else self.near

    @property
    def far_m(self) -> float:
        return DEFAULT_FAR if self.far is None else self.far

    @property
    def given(self) -> list[str]:
        """The options that set scale or shift, as typed (for messages about metric maps)."""
        return [
            n
            for n, on in (
                ("--near", self.near is not None),
                ("--far", self.far is not None),
                ("--depth-scale/--depth-shift", self.depth_scale is not None or self.depth_shift is not None),
                ("--align-to", self.align),
                ("--shape-from-normals", self.shape_from_normals),
            )
            if on
        ]


MIN_NORMAL_GAIN_DEG = 1.0  # shape from normals must beat a flat scene by this much to be trusted


def metric_depth(
    values: np.ndarray,
    kind: str,
    opts: ScaleOptions,
    *,
    per_metre: float | None = None,
    units_assumed: str | None = None,
    K: g.Intrinsics | None = None,
    normals: np.ndarray | None = None,
    align: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """values [H, W] of ``kind`` (disparity / depth) -> metric depth [H, W] float32 (NaN = none) and a record
    whose "assumed" lists every number that was not measured or given (empty: none).

    ``per_metre`` not None: the map is metric already (depth in metres, or disparity in 1/metres), its units
    as ``units_assumed`` says when they were not given. ``align``: a metric depth map [H, W] to fit against
    (NaN or 0 = no measurement).
    ``normals``: [H, W, 3] OpenCV-frame unit normals for ``opts.shape_from_normals`` (with ``K``).
    Raises InputError for maps without finite values and fits that invert the depth order, UsageError for
    options the map cannot take (--far inf on depth, scale options on a metric map).
    """
    if not np.isfinite(values).any():
        raise InputError("the depth map has no finite values", "check the map and --depth-units/--depth-kind")
    if per_metre is not None:
        if opts.given:
            raise UsageError(
                f"{', '.join(opts.given)}: the map is metric already (--depth-units), so nothing is scaled",
                "drop them, or give --depth-units relative for an affine-invariant map",
            )
        return g.to_depth(values, kind), {
            "method": "metric input",
            "kind": kind,
            "assumed": [f"units {units_assumed}"] if units_assumed else [],
        }
    opts.check_kind(kind)
    if opts.align:
        fit_values = resize_to(values, align.shape, area=False)
        s, b, rmse = g.align_to_metric(fit_values, kind, align)  # at the metric map's own pixels
        if not s > 0:
            raise InputError(
                f"the --align-to map orders depth the other way (fitted scale {s:.3g} <= 0)",
                "check that it shows the same view, and --depth-kind / --align-units",
            )
        return g.to_depth(values, kind, s, b, 1e-3), {
            "method": f"least-squares scale and shift fitted in {kind} space to the --align-to map",
            "kind": kind,
            "scale": s,
            "shift": b,
            "rmse_m": rmse,
            "aligned_pixels": int((np.isfinite(align) & (align > 0)).sum()),
            "assumed": [],
        }
    if opts.depth_scale is not None or opts.depth_shift is not None:
        if kind != "depth":
            raise UsageError(
                "--depth-scale/--depth-shift apply to depth maps, and this map is disparity",
                "use --near/--far or --align-to for disparity",
            )
        s = 1.0 if opts.depth_scale is None else opts.depth_scale
        b = 0.0 if opts.depth_shift is None else opts.depth_shift
        return g.to_depth(values, kind, s, b), {
            "method": "depth = scale * value + shift, as given",
            "kind": kind,
            "scale": s,
            "shift": b,
            "assumed": [],
        }
    near = opts.near_m
    warning = None
    if opts.shape_from_normals:
        c, rec = g.shape_from_normals(values, kind, normals, K)
        gain = rec["median_angle_deg_flat"] - rec["median_angle_deg"]
        if gain >= MIN_NORMAL_GAIN_DEG and not rec["at_grid_edge"]:
            s, b = _scale_for_near(values, kind, c, near)
            depth = g.to_depth(values, kind, s, b)
            return depth, {
                "method": "shift from the predicted normals (shape from normals); scale from --near",
                "kind": kind,
                "near_m": near,
                "far_m": _finite_or_none(np.nanmax(depth)),
                "scale": s,
                "shift": b,
                "assumed": [] if opts.near is not None else [f"--near {near:g} m (the scale)"],
                **rec,
            }
        warning = (
            f"shape from normals found no shift the normals prefer (median angle {rec['median_angle_deg']:.1f}"
            f" vs {rec['median_angle_deg_flat']:.1f} degrees for a flat scene"
            f"{', at the edge of the search' if rec['at_grid_edge'] else ''}); used --near/--far instead"
        )
    far = opts.far_m
    s, b = g.near_far_affine(values, kind, near, far)
    assumed = [f"--{n} {v:g} m" for n, v, given in (("near", near, opts.near), ("far", far, opts.far)) if given is None]
    record = {
        "method": "nearest predicted value at --near, farthest at --far",
        "kind": kind,
        "near_m": near,
        "far_m": _finite_or_none(far),
        "scale": s,
        "shift": b,
        "assumed": assumed,
    }
    if warning:
        record["warning"] = warning
    return g.to_depth(values, kind, s, b), record


def resize_to(a: np.ndarray, shape, area: bool = True) -> np.ndarray:
    """An [H, W] or [H, W, C] map resized to shape[:2] with OpenCV: area averaging to shrink (``area``), else
    bilinear; float [H, W, 3] maps are taken as normals and stay unit vectors."""
    import cv2

    h, w = shape[:2]
    if a.shape[:2] == (h, w):
        return a
    if a.dtype.kind == "f":
        a = a.astype(np.float32, copy=False)
    interp = cv2.INTER_AREA if area and a.shape[0] > h else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(a), (w, h), interpolation=interp)
    if out.ndim == 3 and out.shape[-1] == 3 and out.dtype != np.uint8:
        out /= np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-6)
    return out


def _scale_for_near(values: np.ndarray, kind: str, c: float, near: float) -> tuple[float, float]:
    """(scale, shift) with shift / scale = c (disparity) or shift = scale * c (depth) and the nearest at near."""
    if kind == "disparity":  # depth = k / (v + c), nearest (max v) at near
        k = near * (float(np.nanmax(values)) + c)
        return 1 / k, c / k
    k = near / (float(np.nanmin(values)) + c)  # depth = k (v + c), nearest (min v) at near
    return k, k * c


def _finite_or_none(x: float) -> float | None:
    """JSON has no infinity: an infinitely far plane is written as null."""
    return float(x) if np.isfinite(x) else None


# ------------------------------------------------------------------------------------------- cloud


@dataclass(frozen=True)
class CloudOptions:
    """``edge_threshold``: relative depth jump to a neighbour above which a pixel is a flying pixel and
    dropped (0 = keep all); ``stride``: keep every stride-th row and column; ``max_points``: then at most this
    many, chosen at random with ``seed`` (0 = no limit); ``up``: "opencv" or "y" (see FRAMES);
    ``drop_without_normal``: drop the points that have no normal instead of giving them the fallback."""

    edge_threshold: float = 0.05
    stride: int = 1
    max_points: int = 0
    seed: int = 0
    up: str = "opencv"
    drop_without_normal: bool = False

    def __post_init__(self):
        if self.edge_threshold < 0:
            raise UsageError(f"--edge-threshold {self.edge_threshold}: must be >= 0", "0 keeps every pixel")
        if self.stride < 1:
            raise UsageError(f"--stride {self.stride}: must be >= 1", "1 keeps every pixel")
        if self.max_points < 0:
            raise UsageError(f"--max-points {self.max_points}: must be >= 0", "0 means no limit")
        if self.up not in FRAMES:
            raise UsageError(f"--up {self.up!r}: expected y (or leave it out for the OpenCV frame)")


NORMAL_FALLBACK = "the unit vector from the point toward the camera"


@dataclass
class Cloud:
    """The kept pixels of one map as points. ``pixels`` are their flat indices into the map [H, W] (row-major,
    the order of the points) and ``kept`` the full-resolution mask of pixels that passed the cleaning (before
    the stride and --max-points): a mesh over the points uses it to tell a surface from a gap."""

    points: np.ndarray  # [N, 3] float32, metres
    colors: np.ndarray  # [N, 3] uint8
    normals: np.ndarray | None  # [N, 3] float32 unit vectors facing the camera (n . p <= 0), frame as points
    record: dict
    pixels: np.ndarray | None = None  # [N] int64
    kept: np.ndarray | None = None  # [H, W] bool
    up: str = "opencv"
    K: g.Intrinsics | None = None  # the camera of the map the points came from


def build_cloud(
    rgb: np.ndarray, depth: np.ndarray, K: g.Intrinsics, normals: np.ndarray | None, opts: CloudOptions = CloudOptions()
) -> Cloud:
    """rgb uint8 [H, W, 3], metric depth [H, W] (NaN = none), normals [H, W, 3] (OpenCV frame; NaN = none) or
    None (a cloud without normals) -> the cloud of the kept pixels, in ``opts.up``'s frame.

    Every pixel with a depth that passes the flying-pixel test is kept; one without a normal (no depth
    within reach on an axis) gets NORMAL_FALLBACK, counted in the record, unless ``opts.drop_without_normal``.
    Normals that face away from the camera (n . p > 0 for the point p; a predicted normal can) are flipped:
    a surface the camera sees faces it. The record counts them ("normals_flipped").
    Raises InputError when no point is left."""
    finite = np.isfinite(depth) & (depth > 0)
    smooth = g.edge_mask(depth, opts.edge_threshold)
    points = g.backproject(np.where(finite, depth, 0), K)  # [H, W, 3]
    return gather(rgb, points, normals, finite, smooth, opts)


def gather(
    rgb: np.ndarray,
    points: np.ndarray,
    normals: np.ndarray | None,
    finite: np.ndarray,
    smooth: np.ndarray,
    opts: CloudOptions,
    frame: str | None = None,
    fallback: str = NORMAL_FALLBACK,
) -> Cloud:
    """The cloud of a map's kept pixels, whatever made its points: rgb uint8 [H, W, 3], points [H, W, 3] with
    the viewer at the origin (a camera, a panorama's centre), normals [H, W, 3] (NaN = none) or None, the pixels
    with a depth (``finite``) and those passing the flying-pixel test (``smooth``), all [H, W]. Normals that
    face away from the viewer are flipped, one missing gets ``fallback`` (counted) unless
    ``opts.drop_without_normal``; ``frame``: the record's words for the points' frame (default: the camera's)."""
    has_normal = np.isfinite(normals).all(-1) if normals is not None else np.ones_like(finite)
    keep = smooth & has_normal if opts.drop_without_normal else smooth
    chosen = g.subsample(keep, opts.stride, opts.max_points, opts.seed)
    if not chosen.any():
        raise InputError(
            f"no points left ({int(finite.sum())} of {finite.size} pixels have a depth, "
            f"{int((finite & smooth).sum())} pass --edge-threshold {opts.edge_threshold:g})",
            "check --depth-units/--depth-kind, or raise --edge-threshold (0 keeps every pixel with a depth)",
        )
    pts = points[chosen]
    nrm = None
    if normals is not None:
        nrm = normals[chosen].astype(np.float32)
        missing = ~np.isfinite(nrm).all(-1)
        nrm[missing] = -pts[missing] / np.linalg.norm(pts[missing], axis=-1, keepdims=True)
        away = (nrm * pts).sum(-1) > 0  # the viewer is at the origin: n . (0 - p) < 0
        nrm[away] *= -1
    if opts.up == "y":
        pts, nrm = pts * g.TO_OPENGL, (nrm * g.TO_OPENGL if nrm is not None else None)
    no_normal = finite & smooth & ~has_normal
    record = {
        "pixels": int(finite.size),
        "with_depth": int(finite.sum()),
        "removed_at_edges": int((finite & ~smooth).sum()),
        "removed_without_normal": int(no_normal.sum()) if opts.drop_without_normal else 0,
        "without_normal": 0 if opts.drop_without_normal else int((no_normal & chosen).sum()),
        "points": int(chosen.sum()),
        "edge_threshold": opts.edge_threshold,
        "stride": opts.stride,
        "max_points": opts.max_points,
        "frame": frame or FRAMES[opts.up],
    }
    if nrm is not None:
        record["normals_flipped"] = int(away.sum())
    if record["without_normal"]:
        record["normal_fallback"] = fallback
    return Cloud(pts, rgb[chosen], nrm, record, np.flatnonzero(chosen), keep, opts.up)


def header_comments(record: dict) -> list[str]:
    """The PLY header comments: units, frame, camera and every assumption, one line each. ``record``: the
    cloud's sidecar (``io.sidecar.sidecar``, kind "pointcloud": its ``lotus_cli`` version and ``model``, or the
    ``depth_input`` map, and ``make_cloud``'s record as sections)."""
    d, cam = record["depth"], record["camera"]
    lines = [
        f"lotus-cli {record.get('lotus_cli', '')} {record.get('model') or record.get('depth_input', '')}".strip(),
        f"frame {record['cloud']['frame']}",
        f"camera fx {cam['fx']:.3f} fy {cam['fy']:.3f} cx {cam['cx']:.3f} cy {cam['cy']:.3f} "
        f"size {cam['width']}x{cam['height']} from {record['camera_source']}",
        f"depth {d['method']} ({d['kind']})",
    ]
    if "scale" in d:
        lines.append(f"depth scale {d['scale']:.6g} shift {d['shift']:.6g}")
    lines.append("assumed " + ("; ".join(record["assumed"]) if record["assumed"] else "nothing"))
    if d.get("warning"):
        lines.append(f"warning {d['warning']}")
    lines.append(f"normals {record['normals']}")
    return lines


NORMAL_SOURCES = {
    "predict": "predicted by the normal model, converted from Lotus's frame; those facing away from the "
    "camera flipped to face it (cloud.normals_flipped counts them)",
    "depth": "from the depth (differences of the back-projected points over up to +-{w} pixels, "
    "shorter or one-sided next to holes and borders)",
    "none": "none written",
}


def make_cloud(
    rgb: np.ndarray,
    values: np.ndarray,
    kind: str,
    camera_opts: CameraOptions,
    scale_opts: ScaleOptions,
    cloud_opts: CloudOptions = CloudOptions(),
    *,
    per_metre: float | None = None,
    normals: str = "depth",
    normals_lotus: np.ndarray | None = None,
    exif_f35: float | None = None,
    input_size: tuple[int, int] | None = None,
    align: np.ndarray | None = None,
    reuse: dict | None = None,
    units_assumed: str | None = None,
) -> Cloud:
    """One frame: a map [H, W] of ``kind`` and the colours rgb [H, W, 3] (same size) -> the cloud, with the
    camera, the depth's scale/shift and the normals' source in ``record``.

    ``normals``: "predict" (``normals_lotus`` [H, W, 3], the normal model's output in Lotus's frame),
    "depth" (from the metric depth) or "none". ``reuse``: an earlier frame's depth record, whose scale, shift
    and assumptions apply instead of a new fit (a video's later frames, their maps aligned to the clip)."""
    h, w = values.shape
    check_size(w, h, "the depth map")
    K, source, camera_assumed = camera(w, h, camera_opts, exif_f35, input_size)
    predicted = g.convert_normals(normals_lotus, "opencv") if normals == "predict" else None
    if scale_opts.shape_from_normals and predicted is None:
        raise UsageError("--shape-from-normals needs predicted normals", "drop --normals depth/none")
    if reuse is not None:
        depth = g.to_depth(values, kind, reuse["scale"], reuse["shift"])
        depth_record = {
            "method": "the clip's first frame's scale and shift, this frame's map aligned to the "
            "clip (robust fit on stable pixels)",
            "kind": kind,
            "scale": reuse["scale"],
            "shift": reuse["shift"],
            "assumed": reuse["assumed"],
        }
    else:
        depth, depth_record = metric_depth(
            values,
            kind,
            scale_opts,
            per_metre=per_metre,
            K=K,
            normals=predicted,
            align=align,
            units_assumed=units_assumed,
        )
    window = max(1, round(min(h, w) / 120))  # wider differences average out quantised sensor depth (NYU: 22 -> 10 deg)
    chosen = g.normals_from_depth(depth, K, window) if normals == "depth" else predicted  # None for "none"
    cloud = build_cloud(rgb, depth, K, chosen, cloud_opts)
    cloud.K = K
    cloud.record = {
        "camera": K.to_json(),
        "camera_source": source,
        "depth": depth_record,
        "normals": NORMAL_SOURCES[normals].format(w=window),
        "cloud": cloud.record,
        "units": "metres",
        "assumed": [f"camera: {a}" for a in camera_assumed] + depth_record["assumed"],
    }
    return cloud
