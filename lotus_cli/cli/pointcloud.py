"""`lotus pointcloud`: images, videos or existing depth maps -> metric PLY point clouds with their assumptions.

The shared options (inputs, --out, --model, --output-kind, video range, --skip-existing, ...) come from
options.py; the ones below are this command's. One frozen ``PointcloudArgs`` holds a call's options; the
sidecars are ``sidecar``'s (kind "pointcloud"), so --skip-existing keeps a cloud only when its run
completed with the same models and options (``reusable``) and otherwise says why it is redone.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError, LotusError, UsageError
from . import app, fail, load_predictor, say, write_record
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
    check_output_kind,
    flag,
    option,
)


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

KIND = "pointcloud"  # the sidecars' kind


@dataclass(frozen=True)
class PointcloudArgs:
    """The options of one `lotus pointcloud` call, as given on the command line (defaults: the command's)."""

    inputs: tuple[str, ...] = ()
    out: Path | None = None
    model: str | None = None
    output_kind: str | None = None
    normals: str = "auto"
    normal_model: str | None = None
    fov: float | None = None
    focal_px: float | None = None
    intrinsics: str | None = None
    up: str | None = None
    near: float | None = None
    far: float | None = None
    depth_scale: float | None = None
    depth_shift: float | None = None
    align_to: Path | None = None
    align_units: str | None = None
    shape_from_normals: bool = False
    depth: Path | None = None
    depth_kind: str | None = None
    depth_units: str | None = None
    edge_threshold: float = 0.05
    stride: int = 1
    max_points: int = 0
    drop_without_normal: bool = False
    mesh: bool = False
    mesh_format: str | None = None
    preview: bool = False
    max_pixels: int = 100_000_000
    processing_res: int = 768
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    fps: float | None = None
    start: float | None = None
    end: float | None = None
    max_frames: int | None = None
    skip_existing: bool = False
    json: bool = False


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
    max_pixels: MaxPixels = 100_000_000,
    processing_res: ProcRes = 768,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
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
    args = PointcloudArgs(
        inputs=tuple(inputs or ()),
        out=out,
        model=model,
        output_kind=output_kind,
        normals=normals,
        normal_model=normal_model,
        fov=fov,
        focal_px=focal_px,
        intrinsics=intrinsics,
        up=up,
        near=near,
        far=far,
        depth_scale=depth_scale,
        depth_shift=depth_shift,
        align_to=align_to,
        align_units=align_units,
        shape_from_normals=shape_from_normals,
        depth=depth,
        depth_kind=depth_kind,
        depth_units=depth_units,
        edge_threshold=edge_threshold,
        stride=stride,
        max_points=max_points,
        drop_without_normal=drop_without_normal,
        mesh=mesh,
        mesh_format=mesh_format,
        preview=preview,
        max_pixels=max_pixels,
        processing_res=processing_res,
        seed=seed,
        device=device,
        dtype=dtype,
        fps=fps,
        start=start,
        end=end,
        max_frames=max_frames,
        skip_existing=skip_existing,
        json=json,
    )
    try:
        job = _Job(args)
    except LotusError as e:
        fail(e)
    job.run()


class _Job:
    """One validated `lotus pointcloud` call: every option checked here, before any model loads."""

    def __init__(self, a: PointcloudArgs):
        from ..geometry import mesh
        from ..geometry.cloud import CameraOptions, CloudOptions, ScaleOptions, parse_intrinsics
        from ..io import sources
        from ..io.atomic import check_out_dir
        from ..io.video import FrameSelect
        from ..model import registry
        from ..model.predictor import PredictOptions

        self.a = a
        self.camera = CameraOptions(a.fov, a.focal_px, parse_intrinsics(a.intrinsics))
        self.scale = ScaleOptions(
            a.near, a.far, a.depth_scale, a.depth_shift, a.shape_from_normals, a.align_to is not None
        )
        self.cloud = CloudOptions(
            a.edge_threshold, a.stride, a.max_points, a.seed, a.up or "opencv", a.drop_without_normal
        )
        want_mesh = a.mesh or a.mesh_format is not None
        self.mesh_formats = mesh.parse_formats(a.mesh_format or "glb") if want_mesh else ()
        if self.mesh_formats and a.max_points:
            raise UsageError(
                "--max-points thins the cloud at random, and a mesh needs the pixel grid",
                "decimate with --stride instead",
            )
        if a.max_pixels < 0:
            raise UsageError(f"--max-pixels must be >= 0, not {a.max_pixels}", "0 means no limit")
        if a.normals not in ("auto", "predict", "depth", "none"):
            raise UsageError(f"--normals {a.normals!r}: expected auto, predict, depth or none")
        if a.shape_from_normals and a.normals in ("depth", "none"):
            raise UsageError("--shape-from-normals needs the normal model's normals", "use --normals predict or auto")
        if a.depth_kind not in (None, "depth", "disparity"):
            raise UsageError(f"--depth-kind {a.depth_kind!r}: expected depth or disparity")
        check_output_kind(a.output_kind, "depth")
        if a.depth is not None and a.output_kind is not None:
            raise UsageError(
                "--output-kind describes the depth model, and --depth runs none",
                "state the map's kind with --depth-kind",
            )
        sources.parse_units(a.depth_units)
        sources.parse_units(a.align_units, "--align-units")
        if a.align_to is not None and not Path(a.align_to).is_file():
            raise UsageError(f"--align-to {a.align_to}: no such file", "give a metric depth map (.npy or 16-bit .png)")
        self.opts = PredictOptions(processing_res=a.processing_res, seed=a.seed)
        self.select = FrameSelect(a.fps, a.start, a.end, a.max_frames)
        # an unknown or wrong-task model (or one nothing describes) fails before any input is read
        self.depth_ref = None if a.depth is not None else registry.resolve(a.model, "depth", a.output_kind)
        self.out = a.out if a.out is not None else Path("lotus-pointcloud")
        inputs, self.problems = list(a.inputs), []
        if a.depth is not None:
            if len(inputs) > 1:
                raise UsageError("--depth back-projects one map: give at most one image (for the colours)")
            self.map_key = Path(a.depth).name.split(".")[0]  # x.16bit.png -> x: the outputs' name
            self.items = [sources.Item(Path(inputs[0]), self.map_key)] if inputs else []
        else:
            if not inputs:
                raise UsageError("no inputs given", "pass images, videos, folders, or --depth MAP")
            self.items, self.problems = sources.expand(
                inputs,
                exts=sources.MEDIA_EXTS,
                exclude=(self.out,),
                on_warning=lambda w: say(f"warning: {w}", "yellow"),
            )
        if a.align_to is not None and (
            len(self.items) + len(self.problems) > 1 or any(sources.is_video(i.path) for i in self.items)
        ):
            raise UsageError("--align-to fits one metric map to one view", "give a single image or --depth map")
        check_out_dir(self.out)
        self.failed = len(self.problems)
        self.done = self.skipped = 0

    # -- running ---------------------------------------------------------------------------------------

    def run(self) -> None:
        t0 = time.perf_counter()
        a = self.a
        for p in self.problems:
            self._report(p.subject, "failed", {}, str(p))
        self.depth_model = (
            None if self.depth_ref is None else load_predictor(self.depth_ref, "depth", a.device, a.dtype)
        )
        if self.depth_model is not None:
            try:
                self.scale.check_kind(self.depth_model.kind)
            except LotusError as e:
                fail(e)
        self.normal_model = self._normal_model()
        self.normals = "predict" if self.normal_model is not None else ("none" if a.normals == "none" else "depth")
        self.model = self._model_record()
        try:
            if a.depth is not None:
                self._one_map()
            for item in [] if a.depth is not None else self.items:
                self._one_input(item)
        except KeyboardInterrupt:
            say("interrupted: finished clouds are complete; rerun with --skip-existing to resume", "yellow")
            raise typer.Exit(130) from None
        colour = "red" if self.failed else "green"
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        say(
            f"{self.done} done, {self.failed} failed{skipped} in {time.perf_counter() - t0:.1f} s -> {self.out}", colour
        )
        raise typer.Exit(1 if self.failed else 0)

    def _normal_model(self):
        """The normal model when normals are to be predicted: --normals predict, --shape-from-normals, a named
        --normal-model, or auto when the default normal model is cached or can be downloaded."""
        from ..model import registry

        a = self.a
        if a.normals in ("depth", "none"):
            return None
        wanted = a.normals == "predict" or a.shape_from_normals or a.normal_model is not None
        if a.depth is not None and not self.items:
            if wanted:
                fail(UsageError("predicted normals need the image", "give the image with --depth, or --normals depth"))
            return None
        try:
            ref = registry.fetch(registry.resolve(a.normal_model, "normal"))
            registry.check_known(ref, "normal")
        except LotusError as e:
            if not wanted:
                say(f"note: normals from the depth ({e.message})", "dim")
                return None
            fail(_for_normal_model(e))
        return load_predictor(ref, "normal", a.device, a.dtype)

    def _model_record(self) -> dict:
        """What makes the clouds, for the sidecars: the depth model (None for a --depth map) and the normal model
        (None unless normals are predicted), and where they run."""
        running = self.depth_model or self.normal_model
        record = {
            "model": getattr(self.depth_model, "source", None),
            "normal_model": getattr(self.normal_model, "source", None),
        }
        if running is not None:
            record.update(device=str(running.device), dtype=str(running.dtype).replace("torch.", ""))
        return record

    def _options(self, clip: bool = False) -> dict:
        """Every option that changes a cloud (or a clip's clouds), as its sidecar records them and a rerun
        with --skip-existing compares them. Options that cannot act are None: --processing-res without a
        model, --seed when nothing is random (D models, no --max-points). The normal model is here too:
        ``reusable`` compares the depth model (``model``) on its own."""
        a = self.a
        models_ = [m for m in (self.depth_model, self.normal_model) if m is not None]
        random = a.max_points > 0 or any(m.family == "g" for m in models_)
        options = {
            "processing_res": a.processing_res if models_ else None,
            "seed": a.seed if random else None,
            "normals": self.normals,
            "normal_model": self.model["normal_model"],
            "fov": a.fov,
            "focal_px": a.focal_px,
            "intrinsics": list(self.camera.intrinsics) if self.camera.intrinsics else None,
            "near": a.near,
            "far": a.far,
            "depth_scale": a.depth_scale,
            "depth_shift": a.depth_shift,
            "align_to": None if a.align_to is None else str(a.align_to),
            "align_units": a.align_units,
            "shape_from_normals": a.shape_from_normals,
            "depth_kind": a.depth_kind,
            "depth_units": a.depth_units,
            "edge_threshold": a.edge_threshold,
            "stride": a.stride,
            "max_points": a.max_points,
            "drop_without_normal": a.drop_without_normal,
            "up": self.cloud.up,
            "mesh_formats": list(self.mesh_formats),
            "preview": a.preview,
        }
        if clip:
            options.update(fps=a.fps, start=a.start, end=a.end, max_frames=a.max_frames)
        # JSON has no infinity (--far inf): such a number is recorded as its text
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in options.items()}

    def _one_map(self) -> None:
        """--depth MAP [IMAGE]: back-project a map that exists."""
        import numpy as np

        from ..geometry.cloud import check_size, resize_to
        from ..io import sources, visualize

        a = self.a
        key, subject = self.map_key, str(self.items[0].path if self.items else a.depth)
        t0 = time.perf_counter()
        skip, redone = self._reuse(key, subject)
        if skip:
            return
        try:
            values, info = sources.read_depth_map(Path(a.depth), a.depth_kind, a.depth_units)
            check_size(values.shape[1], values.shape[0], f"--depth {a.depth}")
            sections = {"depth_input": str(a.depth), "depth_input_info": info}
            if self.items:
                rgb_full = sources.read_image(self.items[0].path, a.max_pixels)
                _check_aspect(rgb_full.shape, values.shape, f"{self.items[0].path} and --depth {a.depth}")
                input_size = (rgb_full.shape[1], rgb_full.shape[0])
                exif = sources.exif_focal_35mm(self.items[0].path)
                rgb = resize_to(rgb_full, values.shape)
                if rgb.shape[:2] != rgb_full.shape[:2]:
                    (ih, iw), (mh, mw) = rgb_full.shape[:2], values.shape
                    sections["colours_resized"] = {
                        "from": [iw, ih],
                        "to": [mw, mh],
                        "note": "the image was resized to the depth map; the camera was scaled with it",
                    }
                    say(
                        f"warning: {self.items[0].path} is {iw}x{ih}, --depth {a.depth} is {mw}x{mh}: colours "
                        "resized to the map (the camera scaled with them)",
                        "yellow",
                    )
            else:
                finite = np.nan_to_num(values, nan=float(np.nanmin(values)) if np.isfinite(values).any() else 0.0)
                rgb = visualize.colorize_depth(finite, info["kind"], "Spectral")
                input_size, exif, rgb_full = None, None, None
            normals = None
            if self.normal_model is not None:
                normals = resize_to(self.normal_model.predict(rgb_full, self.opts).map, values.shape)
            units = info["units"] if info["units"].startswith("assumed") else None
            self._write(
                key,
                subject,
                rgb,
                values,
                info["kind"],
                info["per_metre"],
                normals,
                exif,
                input_size,
                sections,
                t0,
                units_assumed=units,
                texture=rgb_full,
                redone=redone,
            )
        except UsageError as e:
            fail(e)
        except LotusError as e:
            self._report(str(a.depth), "failed", {}, str(e), redone=redone)

    def _one_input(self, item) -> None:
        from ..geometry.cloud import check_size
        from ..io import sources

        redone = None
        try:
            if sources.is_video(item.path):
                return self._one_video(item)
            t0 = time.perf_counter()
            skip, redone = self._reuse(item.key, str(item.path))
            if skip:
                return
            rgb = sources.read_image(item.path, self.a.max_pixels)
            check_size(rgb.shape[1], rgb.shape[0], str(item.path))
            self._predict_and_write(
                item.key, str(item.path), rgb, sources.exif_focal_35mm(item.path), {}, t0, redone=redone
            )
        except UsageError as e:
            fail(e)
        except LotusError as e:
            self._report(str(item.path), "failed", {}, str(e), redone=redone)

    def _one_video(self, item) -> None:
        """One PLY per sampled frame, all in one metric frame: the first frame's scale and shift are fitted as
        for an image; each later frame's map is first aligned to the clip's running reference (as
        `lotus depth --stabilize` does), then given the same scale and shift, so static surfaces stay put.

        The clip's sidecar is written first with ``complete`` false and rewritten when the last frame is
        done (or with ``interrupted`` / ``error`` when it is not), so a rerun redoes a clip that did not finish."""
        from ..geometry.align import Stabilizer
        from ..io.atomic import write_json
        from ..io.sidecar import sidecar
        from ..io.video import open_video
        from ..run.clip import frame_name

        t0 = time.perf_counter()
        subject = str(item.path)
        skip, redone = self._reuse(item.key, subject, clip=True)
        if skip:
            return
        side = self.out / f"{item.key}.json"
        stabilizer, first, written = Stabilizer(), None, []
        state = {"complete": False, "interrupted": False, "error": None}

        def record(info):
            video = {
                "fps": info.fps,
                "source_fps": info.source_fps,
                "size": [info.width, info.height],
                "frames": len(written),
            }
            outputs = {
                "frames": {
                    "folder": item.key,
                    "files": "<index>_<seconds>s.ply (and the mesh and preview files), each frame with its own sidecar",
                }
            }
            return sidecar(
                KIND,
                model=self.model,
                options=self._options(clip=True),
                input=subject,
                key=item.key,
                outputs=outputs,
                seconds=time.perf_counter() - t0,
                video=video,
                frames=written,
                **state,
            )

        try:
            info, frames = open_video(item.path, self.select)
        except LotusError as e:
            self._report(subject, "failed", {}, str(e), redone=redone)
            return
        write_json(side, record(info))  # complete: false until the last frame; replaces an earlier run's sidecar
        try:
            for fr in frames:
                key = f"{item.key}/{frame_name(fr.index, fr.time)}"
                rec = self._predict_and_write(
                    key,
                    subject,
                    fr.rgb,
                    None,
                    {"frame": fr.index, "time_s": fr.time},
                    time.perf_counter(),
                    stabilizer=stabilizer,
                    reuse=first,
                )
                first = first or rec["depth"]
                written.append(rec)
            state["complete"] = True
        except KeyboardInterrupt:
            state["interrupted"] = True
            write_json(side, record(info))
            raise
        except LotusError as e:
            state["error"] = str(e)
            write_json(side, record(info))
            if isinstance(e, UsageError):
                raise  # the command line is wrong for every input: _one_input ends the run
            self._report(subject, "failed", {}, str(e), frames=len(written), redone=redone)
            return
        write_json(side, record(info))
        self._report(
            subject,
            "done",
            {"ply": str(self.out / item.key), "json": str(side)},
            None,
            frames=len(written),
            seconds=time.perf_counter() - t0,
            redone=redone,
        )

    # -- outputs ---------------------------------------------------------------------------------------

    def _outputs(self, key: str) -> list[Path]:
        """The files one cloud is made of, besides its sidecar, with the options of this run."""
        from ..geometry.mesh import FORMATS

        base = self.out / key
        names = [".ply", *(FORMATS[f] for f in self.mesh_formats), *([".preview.png"] if self.a.preview else [])]
        return [base.with_name(base.name + n) for n in names]

    def _reuse(self, key: str, subject: str, clip: bool = False) -> tuple[bool, str | None]:
        """--skip-existing: (True, None) when the outputs of ``key`` stay (reported as skipped); else (False, why
        they are redone (printed), or None when there was nothing to reuse or --skip-existing is off)."""
        from ..io.sidecar import reusable

        if not self.a.skip_existing:
            return False, None
        side = self.out / f"{key}.json"
        files = _listed_files(side, self.out)
        if not files:
            files = sorted((self.out / key).glob("*.ply")) if clip else self._outputs(key)
        keep, why = reusable(
            side, files, kind=KIND, model=self.model["model"], options=self._options(clip), settings={}
        )
        if keep:
            self._report(subject, "skipped", {"json": str(side)}, None, frames=0)
            return True, None
        if why is not None:
            say(f"redone: {subject}: {why}", "yellow")
        return False, why

    def _predict_and_write(self, key, subject, rgb, exif, sections, t0, stabilizer=None, reuse=None, redone=None):
        t_model = time.perf_counter()
        pred = self.depth_model.predict(rgb, self.opts)
        values = stabilizer(pred.map)[0] if stabilizer is not None else pred.map
        normals = self.normal_model.predict(rgb, self.opts).map if self.normal_model else None
        sections = {
            **sections,
            "processing_size": [pred.processing_size[1], pred.processing_size[0]],
            "model_seconds": round(time.perf_counter() - t_model, 4),
        }
        return self._write(
            key,
            subject,
            rgb,
            values,
            self.depth_model.kind,
            None,
            normals,
            exif,
            None,
            sections,
            t0,
            count=stabilizer is None,
            reuse=reuse,
            redone=redone,
        )

    def _write(
        self,
        key,
        subject,
        rgb,
        values,
        kind,
        per_metre,
        normals,
        exif,
        input_size,
        sections,
        t0,
        count=True,
        reuse=None,
        units_assumed=None,
        texture=None,
        redone=None,
    ):
        """Cloud, then mesh files and preview when asked, then the sidecar (last: it marks the cloud done)."""
        from ..geometry.cloud import header_comments, make_cloud
        from ..geometry.ply import write_ply
        from ..io import sources
        from ..io.atomic import write_json
        from ..io.sidecar import sidecar

        a = self.a
        align = None
        if a.align_to is not None:
            align, _ = sources.read_depth_map(Path(a.align_to), "depth", a.align_units, "--align-to")
            _check_aspect(values.shape, align.shape, f"the depth map and --align-to {a.align_to}")
        try:
            cloud = make_cloud(
                rgb,
                values,
                kind,
                self.camera,
                self.scale,
                self.cloud,
                per_metre=per_metre,
                normals=self.normals,
                normals_lotus=normals,
                exif_f35=exif,
                input_size=input_size,
                align=align,
                reuse=reuse,
                units_assumed=units_assumed,
            )
        except ValueError as e:
            raise InputError(f"{subject}: {e}", "check the depth map") from e
        base = self.out / key
        ply, side = base.with_name(base.name + ".ply"), base.with_name(base.name + ".json")
        side.unlink(missing_ok=True)  # an earlier run's sidecar must not vouch for files this run replaces

        def record(outputs: dict, **more) -> dict:
            return sidecar(
                KIND,
                model=self.model,
                options=self._options(clip=not count),
                input=subject,
                key=key,
                outputs=outputs,
                seconds=time.perf_counter() - t0,
                **sections,
                **cloud.record,
                **more,
            )

        comments = header_comments(record({}))
        write_ply(ply, cloud.points, cloud.colors, cloud.normals, comments)
        outputs = {"ply": {"file": ply.name}}
        more = self._mesh_and_preview(key, subject, cloud, outputs, rgb if texture is None else texture, comments)
        write_json(side, record(outputs, **more))
        if cloud.record["depth"].get("warning"):
            say(f"warning: {subject}: {cloud.record['depth']['warning']}", "yellow")
        if count:
            paths = {name: str(ply.parent / o["file"]) for name, o in outputs.items()}
            self._report(
                subject, "done", {**paths, "json": str(side)}, None, seconds=time.perf_counter() - t0, redone=redone
            )
        return {"key": key, "file": ply.name, "points": cloud.record["cloud"]["points"], "depth": cloud.record["depth"]}

    def _mesh_and_preview(self, key, subject, cloud, outputs, texture, comments) -> dict:
        """The mesh files and the preview asked for, added to ``outputs`` ({name: {"file": name}}: glb, obj,
        mesh_ply, preview); returns their sidecar sections ("mesh", "preview")."""
        from ..geometry import mesh, preview
        from ..io.atomic import write_bytes
        from ..io.outputs import encode_png

        sections, shown = {}, cloud
        base = self.out / key
        if self.mesh_formats:
            shown = mesh.from_cloud(cloud, self.cloud.stride)
            files = mesh.write(shown, self.mesh_formats, base.parent, base.name, texture, comments)
            sections["mesh"] = {
                **shown.record,
                "files": files,
                "frame": cloud.record["cloud"]["frame"],
                "glb_frame": mesh.GLB_FRAME if "glb" in files else None,
            }
            outputs.update({("mesh_ply" if f == "ply" else f): {"file": name} for f, name in files.items()})
            if not files:
                say(
                    f"warning: {subject}: no 2x2 block of kept pixels, so no mesh (lower --edge-threshold or --stride)",
                    "yellow",
                )
        if self.a.preview:
            png = base.with_name(base.name + ".preview.png")
            write_bytes(png, encode_png(preview.render_cloud(shown, cloud.K, self.cloud.stride)))
            sections["preview"] = {"file": png.name, **preview.describe()}
            outputs["preview"] = {"file": png.name}
        return sections

    def _report(self, subject, status, outputs, error, frames=1, seconds=0.0, redone=None):
        if status == "failed":
            self.failed += 1
            say(f"failed: {error}", "red")
        elif status == "done":
            self.done += 1
        elif status == "skipped":
            self.skipped += 1
        if self.a.json:
            write_record(
                {
                    "input": str(subject),
                    "status": status,
                    "kind": KIND,
                    "outputs": outputs,
                    "frames": frames,
                    "seconds": round(seconds, 4),
                    "error": error,
                    "redone": redone,
                }
            )


def _listed_files(side: Path, out: Path) -> list[Path]:
    """The files an earlier run's sidecar ``side`` lists as its outputs (a clip's: each frame's sidecar and the
    files that lists); [] when it lists none or cannot be read (``reusable`` says why then)."""
    import json

    try:
        old = json.loads(side.read_text())
        outputs, frames = old.get("outputs") or {}, old.get("frames") or []
        files = [side.parent / o["file"] for o in outputs.values() if isinstance(o, dict) and "file" in o]
        for fr in frames:
            frame_side = out / f"{fr['key']}.json"
            files += [frame_side, *_listed_files(frame_side, out)]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return []
    return files


def _for_normal_model(e: LotusError) -> LotusError:
    """A model error about the normal model, its advice given for the option that names it here. --output-kind
    states what --model outputs, so for a normal checkpoint that nothing describes only lotus.json is advised."""

    def swap(text):
        if not text:
            return text
        text = re.sub(r"state it with --output-kind \S+, or write", "write", text)
        return re.sub(r"(?<![\w-])--model\b", "--normal-model", text)

    return type(e)(swap(e.message), swap(e.hint))


def _check_aspect(a_shape, b_shape, what: str) -> None:
    """Maps of one view may differ in size, never in shape: refuse when b, scaled to a's height, is more
    than a pixel wider or narrower than a."""
    (ah, aw), (bh, bw) = a_shape[:2], b_shape[:2]
    if abs(bw * ah / bh - aw) > 1.0:
        raise InputError(
            f"{what} differ in aspect ratio ({aw}x{ah} vs {bw}x{bh})",
            "give maps of the same view, uncropped (resizing is fine)",
        )
