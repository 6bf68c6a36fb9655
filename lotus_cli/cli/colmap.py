"""`lotus colmap`: parse, build the request, run it (``run.colmap``), report.

The shared options (--out, --model, --output-kind, --skip-existing, --json, ...) come from options.py and
predict_options.py; the ones below are this command's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .application import app
from .options import Device, Dtype, Json, MaxPixels, Model, OutputKind, ProcRes, Seed, Skip, flag, option
from .predict_options import ShardOpt, Tile
from .report import Report


def _opt(*names: str, help: str, **kw):
    """A value option of this command; its default is shown only when asked (most are None = "not given")."""
    return option(*names, help=help, show_default=kw.pop("show_default", False), **kw)


Scene = Annotated[
    Path,
    typer.Argument(
        help="The COLMAP workspace: a folder with images/ and sparse/0/ (binary or text), as COLMAP, gsplat's "
        "examples and nerfstudio's ns-process-data (colmap/sparse/0) write it.",
        show_default=False,
    ),
]
SceneOut = Annotated[
    Path | None,
    _opt("--out", "-o", help="Output folder. Default: the workspace itself, where nerfstudio and dn-splatter look."),
]
Images = Annotated[Path | None, _opt("--images", help="The images' folder (default SCENE/images).")]
Sparse = Annotated[
    Path | None,
    _opt("--sparse", help="The model's folder (default: SCENE/sparse/0, SCENE/colmap/sparse/0 or SCENE/sparse)."),
]
Normals = Annotated[str, _opt("--normals", help="predict (the normal model) or none.", show_default=True)]
NormalModel = Annotated[str | None, _opt("--normal-model", help="Normal model (default normal-d).")]
DepthDir = Annotated[
    Path | None,
    _opt(
        "--depth",
        help="Align maps made already instead of running the depth model: a folder of .npy / .exr / "
        "16-bit .png maps (with their `lotus depth` sidecars, or --depth-kind) named by the images' stems.",
    ),
]
DepthKind = Annotated[
    str | None, _opt("--depth-kind", help="Kind of --depth maps without a sidecar: depth or disparity (default depth).")
]
NormalsFrom = Annotated[
    Path | None,
    _opt(
        "--normals-from",
        help="Normal maps made already (`lotus normal` output, or .npy in Lotus's frame), named by stem.",
    ),
]
WorldNormals = Annotated[
    bool, flag("--world-normals", help="Also write normals in the reconstruction's world frame (normals_world/).")
]
SceneUnits = Annotated[
    str | None,
    _opt(
        "--scene-units",
        help="What one unit of the reconstruction is (m when it was scaled or georeferenced); "
        "recorded, as SfM alone fixes scale only up to its own unit.",
    ),
]
MinPoints = Annotated[
    int, _opt("--min-points", help="Refuse an image whose map meets fewer SfM points than this.", show_default=True)
]
Fuse = Annotated[bool, option("--fuse/--no-fuse", help="Write fused.ply, the views fused into one cloud.")]
MinViews = Annotated[
    int,
    _opt("--min-views", help="Fusion: keep a point where at least this many other views agree.", show_default=True),
]
Tolerance = Annotated[
    float,
    _opt("--tolerance", help="Fusion: agreement within this fraction of a view's depth.", show_default=True),
]
FusionStride = Annotated[
    int, _opt("--fusion-stride", help="Fusion: every N-th row and column of each view.", show_default=True)
]
Neighbours = Annotated[
    int,
    _opt("--neighbours", help="Fusion: views checked per view (those sharing the most SfM points).", show_default=True),
]
Exr = Annotated[bool, flag("--exr", help="Also depth_exr/<stem>.exr: float32 depth in --scene-units (which it needs).")]
Transforms = Annotated[
    bool,
    option("--transforms/--no-transforms", help="Write (or add depth_file_path to) nerfstudio's transforms.json."),
]


@app.command()
def colmap(
    scene: Scene,
    out: SceneOut = None,
    images: Images = None,
    sparse: Sparse = None,
    model: Model = None,
    output_kind: OutputKind = None,
    normals: Normals = "predict",
    normal_model: NormalModel = None,
    depth: DepthDir = None,
    depth_kind: DepthKind = None,
    normals_from: NormalsFrom = None,
    world_normals: WorldNormals = False,
    scene_units: SceneUnits = None,
    min_points: MinPoints = 20,
    fuse: Fuse = True,
    min_views: MinViews = 2,
    tolerance: Tolerance = 0.01,
    fusion_stride: FusionStride = 2,
    neighbours: Neighbours = 8,
    transforms: Transforms = True,
    exr: Exr = False,
    tile: Tile = None,
    processing_res: ProcRes = 768,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    max_pixels: MaxPixels = 100_000_000,
    skip_existing: Skip = False,
    shard: ShardOpt = None,
    json: Json = False,
):
    """Depth in the reconstruction's units and normal priors for every image of a COLMAP workspace.

    Each registered image's depth (Lotus's, or --depth maps) is fitted to the SfM points it sees (scale and
    shift, outliers rejected; an image with too few points is refused, nothing written), then written where
    nerfstudio (transforms.json depth_file_path) and dn-splatter read depth and normal priors, leaving the
    workspace as gsplat's COLMAP trainer reads it, and the views are fused into fused.ply where they agree
    (docs/colmap.md)."""
    options = dict(locals())  # the parsed options, before anything else is bound here
    from ..run.colmap import ColmapRequest, colmap_scene
    from ..scale.shard import resolve_shard, select

    json, spec = options.pop("json"), options.pop("shard")

    def run(report):
        chosen = resolve_shard(spec)
        pick = None if chosen is None else (lambda items: select(items, chosen))
        return colmap_scene(request, report, pick)

    request = ColmapRequest(**options)
    Report(json).run(run, request.out_dir)
