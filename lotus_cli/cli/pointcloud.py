"""`lotus pointcloud`: parse, build the request, run it (``run.pointcloud``), report.

The shared options (inputs, --out, --model, --output-kind, video range, --skip-existing, ...) come from
options.py; the ones below are this command's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from .application import app
from .options import (
    Device,
    Dtype,
    End,
    Fps,
    Inputs,
    Json,
    MaxFrames,
    MaxPixels,
    Model,
    Out,
    OutputKind,
    ProcRes,
    Seed,
    Skip,
    Start,
    flag,
    option,
)
from .predict_options import Backend
from .report import Report


def _opt(*names: str, help: str, **kw):
    """A value option of this command; its default is shown only when asked (most are None = "not given")."""
    return option(*names, help=help, show_default=kw.pop("show_default", False), **kw)


Normals = Annotated[
    str,
    _opt(
        "--normals",
        help="Per-point normals: predict (the normal model), depth (from the "
        "depth map), none, or auto (predict when the normal model is at hand, else depth).",
        show_default=True,
    ),
]
NormalModel = Annotated[
    str | None, _opt("--normal-model", help="Normal model for --normals predict (default normal-d).")
]
Fov = Annotated[float | None, _opt("--fov", help="Horizontal field of view in degrees.")]
FocalPx = Annotated[float | None, _opt("--focal-px", help="Focal length in pixels of the input image.")]
IntrinsicsOpt = Annotated[
    str | None,
    _opt(
        "--intrinsics",
        help="fx,fy,cx,cy in pixels of the input image. "
        "Without --fov/--focal-px/--intrinsics: EXIF's 35 mm focal length, "
        "else 60 degrees (stated as assumed).",
    ),
]
Up = Annotated[
    str | None,
    _opt(
        "--up",
        help="y: write the OpenGL frame (x right, y up, z toward the viewer) for "
        "viewers; default: the OpenCV frame (x right, y down, z forward).",
    ),
]
Near = Annotated[float | None, _opt("--near", help="Metres of the nearest predicted point (default 1, assumed).")]
Far = Annotated[
    float | None,
    _opt(
        "--far",
        help="Metres of the farthest predicted point (default 10, assumed; inf for disparity puts it at infinity).",
    ),
]
DepthScale = Annotated[float | None, _opt("--depth-scale", help="Affine depth maps: metres = scale * value + shift.")]
DepthShift = Annotated[float | None, _opt("--depth-shift", help="See --depth-scale.")]
AlignTo = Annotated[
    Path | None,
    _opt(
        "--align-to",
        help="Metric depth map (npy, or 16-bit png) of the same view, "
        "dense or sparse (0 = none): fit scale and shift to it; one input only.",
    ),
]
AlignUnits = Annotated[
    str | None,
    _opt(
        "--align-units",
        help="Units of --align-to: m, mm, or values per metre "
        "(default: m for float maps, mm for integer ones such as 16-bit PNG).",
    ),
]
ShapeFromNormals = Annotated[
    bool,
    flag(
        "--shape-from-normals",
        help="Fit the depth's unknown shift so the surface's "
        "normals agree with the normal model's; the scale still comes from --near.",
    ),
]
DepthIn = Annotated[
    Path | None,
    _opt(
        "--depth",
        help="Back-project this map instead of running the depth model: "
        "a `lotus depth` .npy or .16bit.png (with its sidecar), or your own map.",
    ),
]
DepthKind = Annotated[
    str | None,
    _opt("--depth-kind", help="Kind of a --depth map without a sidecar: depth or disparity (default depth)."),
]
DepthUnits = Annotated[
    str | None,
    _opt(
        "--depth-units",
        help="Units of a --depth map without a sidecar: m, mm, "
        "values per metre (e.g. 5000), or relative (affine-invariant); default m "
        "for float maps, mm for integer ones, recorded as assumed.",
    ),
]
Edge = Annotated[
    float,
    _opt(
        "--edge-threshold",
        help="Drop flying pixels whose depth jumps by more than this fraction to a neighbour (0 = keep all).",
        show_default=True,
    ),
]
Stride = Annotated[int, _opt("--stride", help="Keep every N-th row and column.", show_default=True)]
MaxPoints = Annotated[
    int,
    _opt(
        "--max-points",
        help="At most this many points, chosen at random with --seed "
        "(0 = no limit; not with --mesh, which needs the grid: use --stride).",
        show_default=True,
    ),
]
DropWithoutNormal = Annotated[
    bool,
    flag(
        "--drop-without-normal",
        help="Drop the points that have no normal (no "
        "depth within reach on an axis) instead of giving them one facing the "
        "camera.",
    ),
]
MeshOpt = Annotated[
    bool,
    flag(
        "--mesh",
        help="Also write a triangle mesh of the pixel grid (see --mesh-format): two "
        "triangles per 2x2 block of kept pixels, none across holes or flying pixels.",
    ),
]
MeshFormat = Annotated[
    str | None,
    _opt(
        "--mesh-format",
        help="Mesh files, a comma list of glb (textured, y up: "
        "Blender, web viewers), obj (textured) and ply (vertex colours; "
        "x.mesh.ply). Implies --mesh. Default glb.",
    ),
]
Preview = Annotated[
    bool,
    flag(
        "--preview",
        help="Also write x.preview.png: the cloud (or the mesh) seen from a few "
        "degrees off the input view, in colour and shaded.",
    ),
]


Projection = Annotated[
    str,
    _opt(
        "--projection",
        help="perspective, equirect (a 360-degree equirectangular panorama: predicted as overlapping views, "
        "back-projected on the sphere, the mesh closed at the seam and the poles; docs/panoramas.md), or auto "
        "(equirect for a 2:1 image whose XMP says GPano:ProjectionType equirectangular).",
        show_default=True,
    ),
]


@app.command()
def pointcloud(
    inputs: Inputs = None,
    out: Out = None,
    model: Model = None,
    output_kind: OutputKind = None,
    normals: Normals = "auto",
    normal_model: NormalModel = None,
    fov: Fov = None,
    focal_px: FocalPx = None,
    intrinsics: IntrinsicsOpt = None,
    up: Up = None,
    near: Near = None,
    far: Far = None,
    depth_scale: DepthScale = None,
    depth_shift: DepthShift = None,
    align_to: AlignTo = None,
    align_units: AlignUnits = None,
    shape_from_normals: ShapeFromNormals = False,
    depth: DepthIn = None,
    depth_kind: DepthKind = None,
    depth_units: DepthUnits = None,
    edge_threshold: Edge = 0.05,
    stride: Stride = 1,
    max_points: MaxPoints = 0,
    drop_without_normal: DropWithoutNormal = False,
    mesh: MeshOpt = False,
    mesh_format: MeshFormat = None,
    preview: Preview = False,
    projection: Projection = "perspective",
    max_pixels: MaxPixels = 100_000_000,
    processing_res: ProcRes = 768,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    backend: Backend = None,
    fps: Fps = None,
    start: Start = None,
    end: End = None,
    max_frames: MaxFrames = None,
    skip_existing: Skip = False,
    json: Json = False,
):
    """Metric point clouds (PLY) from images, videos or depth maps, with every assumption stated.

    Binary PLY via Open3D: positions in metres, colours, normals; one PLY per sampled video frame (and one
    mesh and preview, when asked). Lotus predicts affine-invariant disparity, so the scale and shift come
    from --near/--far (defaults assumed), --align-to, --depth-scale/--depth-shift or --shape-from-normals;
    every assumption is written into the sidecar and the PLY header."""
    options = dict(locals())  # the parsed options, before anything else is bound here
    from ..run.pointcloud import PointcloudRequest, pointclouds

    json, inputs = options.pop("json"), options.pop("inputs")
    request = PointcloudRequest(tuple(inputs or ()), **options)
    Report(json).run(lambda report: pointclouds(request, report), request.out_dir)
