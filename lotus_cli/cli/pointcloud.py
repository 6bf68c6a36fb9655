"""`lotus pointcloud`: images, videos or existing depth maps -> metric PLY point clouds with their assumptions."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError, LotusError, UsageError
from . import app, fail, load_predictor, say
from .predict import Device, Dtype, End, Fps, Inputs, Json, MaxFrames, MaxPixels, Model, Out, ProcRes, Seed, Skip, Start


def _opt(name: str, help: str, **kw):
    return typer.Option(name, help=help, show_default=kw.pop("show_default", False), **kw)


Normals = Annotated[str, _opt("--normals", "Per-point normals: predict (the normal model), depth (from the depth "
                              "map), none, or auto (predict when the normal model is at hand, else depth).",
                              show_default=True)]
NormalModel = Annotated[Optional[str], _opt("--normal-model", "Normal model for --normals predict (default normal-d).")]
Fov = Annotated[Optional[float], _opt("--fov", "Horizontal field of view in degrees.")]
FocalPx = Annotated[Optional[float], _opt("--focal-px", "Focal length in pixels of the input image.")]
IntrinsicsOpt = Annotated[Optional[str], _opt("--intrinsics", "fx,fy,cx,cy in pixels of the input image. Without "
                                              "--fov/--focal-px/--intrinsics: EXIF's 35 mm focal length, else 60 "
                                              "degrees (stated as assumed).")]
Up = Annotated[Optional[str], _opt("--up", "y: write the OpenGL frame (x right, y up, z toward the viewer) for "
                                   "viewers; default: the OpenCV frame (x right, y down, z forward).")]
Near = Annotated[Optional[float], _opt("--near", "Metres of the nearest predicted point (default 1, assumed).")]
Far = Annotated[Optional[float], _opt("--far", "Metres of the farthest predicted point (default 10, assumed; inf "
                                      "for disparity puts it at infinity).")]
DepthScale = Annotated[Optional[float], _opt("--depth-scale", "Affine depth maps: metres = scale * value + shift.")]
DepthShift = Annotated[Optional[float], _opt("--depth-shift", "See --depth-scale.")]
AlignTo = Annotated[Optional[Path], _opt("--align-to", "Metric depth map (npy, or 16-bit png) of the same view, "
                                         "dense or sparse (0 = none): fit scale and shift to it; one input only.")]
AlignUnits = Annotated[Optional[str], _opt("--align-units", "Units of --align-to: m, mm, or values per metre "
                                           "(default: m for float maps, mm for integer ones such as 16-bit PNG).")]
ShapeFromNormals = Annotated[bool, _opt("--shape-from-normals", "Fit the depth's unknown shift so the surface's "
                                        "normals agree with the normal model's; the scale still comes from --near.")]
DepthIn = Annotated[Optional[Path], _opt("--depth", "Back-project this map instead of running the depth model: a "
                                         "`lotus depth` .npy or .16bit.png (with its sidecar), or your own map.")]
DepthKind = Annotated[Optional[str], _opt("--depth-kind", "Kind of a --depth map without a sidecar: depth or "
                                          "disparity (default depth).")]
DepthUnits = Annotated[Optional[str], _opt("--depth-units", "Units of a --depth map without a sidecar: m, mm, "
                                           "values per metre (e.g. 5000), or relative (affine-invariant); default m for float "
                                           "maps, mm for integer ones, recorded as assumed.")]
Edge = Annotated[float, _opt("--edge-threshold", "Drop flying pixels whose depth jumps by more than this fraction "
                             "to a neighbour (0 = keep all).", show_default=True)]
Stride = Annotated[int, _opt("--stride", "Keep every N-th row and column.", show_default=True)]
MaxPoints = Annotated[int, _opt("--max-points", "At most this many points, chosen at random with --seed "
                                "(0 = no limit; not with --mesh, which needs the grid: use --stride).",
                                show_default=True)]
DropWithoutNormal = Annotated[bool, _opt("--drop-without-normal", "Drop the points that have no normal (no depth "
                                         "within reach on an axis) instead of giving them one facing the camera.")]
MeshOpt = Annotated[bool, _opt("--mesh", "Also write a triangle mesh of the pixel grid (see --mesh-format): two "
                               "triangles per 2x2 block of kept pixels, none across holes or flying pixels.")]
MeshFormat = Annotated[Optional[str], _opt("--mesh-format", "Mesh files, a comma list of glb (textured, y up: "
                                           "Blender, web viewers), obj (textured) and ply (vertex colours; "
                                           "x.mesh.ply). Implies --mesh. Default glb.")]
Preview = Annotated[bool, _opt("--preview", "Also write x.preview.png: the cloud (or the mesh) seen from a few "
                               "degrees off the input view, in colour and shaded.")]


@app.command()
def pointcloud(inputs: Inputs = None, out: Out = None, model: Model = None, normals: Normals = "auto",
               normal_model: NormalModel = None, fov: Fov = None, focal_px: FocalPx = None,
               intrinsics: IntrinsicsOpt = None, up: Up = None, near: Near = None, far: Far = None,
               depth_scale: DepthScale = None, depth_shift: DepthShift = None, align_to: AlignTo = None,
               align_units: AlignUnits = None, shape_from_normals: ShapeFromNormals = False, depth: DepthIn = None,
               depth_kind: DepthKind = None, depth_units: DepthUnits = None, edge_threshold: Edge = 0.05,
               stride: Stride = 1, max_points: MaxPoints = 0, drop_without_normal: DropWithoutNormal = False,
               mesh: MeshOpt = False, mesh_format: MeshFormat = None, preview: Preview = False,
               max_pixels: MaxPixels = 100_000_000, processing_res: ProcRes = 768, seed: Seed = 0,
               device: Device = "auto", dtype: Dtype = "auto", fps: Fps = None, start: Start = None, end: End = None,
               max_frames: MaxFrames = None, skip_existing: Skip = False, json: Json = False):
    """Metric point clouds (PLY) from images, videos or depth maps, with every assumption stated.

    Binary PLY via Open3D: positions in metres, colours, normals; one PLY per sampled video frame (and one
    mesh and preview, when asked). Lotus predicts affine-invariant disparity, so the scale and shift come
    from --near/--far (defaults assumed), --align-to, --depth-scale/--depth-shift or --shape-from-normals;
    every assumption is written into the sidecar and the PLY header."""
    try:
        job = _Job.validate(locals())
    except LotusError as e:
        fail(e)
    job.run()


class _Job:
    """One validated `lotus pointcloud` call."""

    @classmethod
    def validate(cls, a: dict) -> "_Job":
        from .. import mesh, sinks, sources
        from ..pointcloud import CameraOptions, CloudOptions, ScaleOptions, parse_intrinsics
        from ..predictor import PredictOptions
        from ..video import FrameSelect

        self = cls()
        self.a = a
        self.camera = CameraOptions(a["fov"], a["focal_px"], parse_intrinsics(a["intrinsics"]))
        self.scale = ScaleOptions(a["near"], a["far"], a["depth_scale"], a["depth_shift"], a["shape_from_normals"],
                                  a["align_to"] is not None)
        self.cloud = CloudOptions(a["edge_threshold"], a["stride"], a["max_points"], a["seed"], a["up"] or "opencv",
                                  a["drop_without_normal"])
        want_mesh = a["mesh"] or a["mesh_format"] is not None
        self.mesh_formats = mesh.parse_formats(a["mesh_format"] or "glb") if want_mesh else ()
        if self.mesh_formats and a["max_points"]:
            raise UsageError("--max-points thins the cloud at random, and a mesh needs the pixel grid",
                             "decimate with --stride instead")
        if a["max_pixels"] < 0:
            raise UsageError(f"--max-pixels must be >= 0, not {a['max_pixels']}", "0 means no limit")
        if a["normals"] not in ("auto", "predict", "depth", "none"):
            raise UsageError(f"--normals {a['normals']!r}: expected auto, predict, depth or none")
        if a["shape_from_normals"] and a["normals"] in ("depth", "none"):
            raise UsageError("--shape-from-normals needs the normal model's normals", "use --normals predict or auto")
        if a["depth_kind"] not in (None, "depth", "disparity"):
            raise UsageError(f"--depth-kind {a['depth_kind']!r}: expected depth or disparity")
        sources.parse_units(a["depth_units"])
        sources.parse_units(a["align_units"], "--align-units")
        if a["align_to"] is not None and not Path(a["align_to"]).is_file():
            raise UsageError(f"--align-to {a['align_to']}: no such file", "give a metric depth map (.npy or 16-bit .png)")
        self.opts = PredictOptions(processing_res=a["processing_res"], seed=a["seed"])
        self.select = FrameSelect(a["fps"], a["start"], a["end"], a["max_frames"])
        self.out = a["out"] if a["out"] is not None else Path("lotus-pointcloud")
        inputs, self.problems = a["inputs"] or [], []
        if a["depth"] is not None:
            if len(inputs) > 1:
                raise UsageError("--depth back-projects one map: give at most one image (for the colours)")
            self.map_key = Path(a["depth"]).name.split(".")[0]  # x.16bit.png -> x: the outputs' name
            self.items = [sources.Item(Path(inputs[0]), self.map_key)] if inputs else []
        else:
            if not inputs:
                raise UsageError("no inputs given", "pass images, videos, folders, or --depth MAP")
            self.items, self.problems = sources.expand(inputs, exts=sources.MEDIA_EXTS)
        if a["align_to"] is not None and (len(self.items) + len(self.problems) > 1 or
                                          any(sources.is_video(i.path) for i in self.items)):
            raise UsageError("--align-to fits one metric map to one view", "give a single image or --depth map")
        sinks.check_out_dir(self.out)
        self.failed = len(self.problems)
        self.done = 0
        return self

    # -- running ---------------------------------------------------------------------------------------

    def run(self) -> None:
        t0 = time.perf_counter()
        for p in self.problems:
            self._report(p.subject, "failed", {}, str(p))
        a = self.a
        self.depth_model = None if a["depth"] is not None else load_predictor(a["model"], "depth", a["device"], a["dtype"])
        if self.depth_model is not None:
            try:
                self.scale.check_kind(self.depth_model.kind)
            except LotusError as e:
                fail(e)
        self.normal_model = self._normal_model()
        self.normals = "predict" if self.normal_model is not None else ("none" if a["normals"] == "none" else "depth")
        try:
            if a["depth"] is not None:
                self._one_map()
            for item in ([] if a["depth"] is not None else self.items):
                self._one_input(item)
        except KeyboardInterrupt:
            say("interrupted: finished clouds are complete; rerun with --skip-existing to resume", "yellow")
            raise typer.Exit(130)
        colour = "red" if self.failed else "green"
        say(f"{self.done} done, {self.failed} failed in {time.perf_counter() - t0:.1f} s -> {self.out}", colour)
        raise typer.Exit(1 if self.failed else 0)

    def _normal_model(self):
        """The normal model when normals are to be predicted: --normals predict, --shape-from-normals, a named
        --normal-model, or auto when the default normal model is cached or can be downloaded."""
        from .. import models

        a = self.a
        if a["normals"] in ("depth", "none"):
            return None
        wanted = a["normals"] == "predict" or a["shape_from_normals"] or a["normal_model"] is not None
        if a["depth"] is not None and not self.items:
            if wanted:
                fail(UsageError("predicted normals need the image", "give the image with --depth, or --normals depth"))
            return None
        try:
            ref = models.fetch(models.resolve(a["normal_model"], "normal"))
        except LotusError as e:
            if not wanted:
                say(f"note: normals from the depth ({e.message})", "dim")
                return None
            fail(_for_normal_model(e))
        return load_predictor(ref, "normal", a["device"], a["dtype"])

    def _one_map(self) -> None:
        """--depth MAP [IMAGE]: back-project a map that exists."""
        import numpy as np

        from .. import sources, visualize
        from ..pointcloud import check_size, resize_to

        a = self.a
        key = self.map_key
        if self._skip(key, str(a["depth"])):
            return
        try:
            values, info = sources.read_depth_map(Path(a["depth"]), a["depth_kind"], a["depth_units"])
            check_size(values.shape[1], values.shape[0], f"--depth {a['depth']}")
            record = {"depth_input": str(a["depth"]), "depth_input_info": info}
            if self.items:
                rgb_full = sources.read_image(self.items[0].path, a["max_pixels"])
                _check_aspect(rgb_full.shape, values.shape, f"{self.items[0].path} and --depth {a['depth']}")
                input_size = (rgb_full.shape[1], rgb_full.shape[0])
                exif = sources.exif_focal_35mm(self.items[0].path)
                rgb = resize_to(rgb_full, values.shape)
                record["input"] = str(self.items[0].path)
                if rgb.shape[:2] != rgb_full.shape[:2]:
                    (ih, iw), (mh, mw) = rgb_full.shape[:2], values.shape
                    record["colours_resized"] = {"from": [iw, ih], "to": [mw, mh], "note": "the image was resized to "
                                                 "the depth map; the camera was scaled with it"}
                    say(f"warning: {self.items[0].path} is {iw}x{ih}, --depth {a['depth']} is {mw}x{mh}: colours "
                        "resized to the map (the camera scaled with them)", "yellow")
            else:
                finite = np.nan_to_num(values, nan=float(np.nanmin(values)) if np.isfinite(values).any() else 0.0)
                rgb, input_size, exif, rgb_full = visualize.colorize_depth(finite, info["kind"], "Spectral"), None, None, None
            normals = None
            if self.normal_model is not None:
                normals = resize_to(self.normal_model.predict(rgb_full, self.opts).map, values.shape)
            units = info["units"] if info["units"].startswith("assumed") else None
            self._write(key, rgb, values, info["kind"], info["per_metre"], normals, exif, input_size, record,
                        units_assumed=units, texture=rgb_full)
        except UsageError as e:
            fail(e)
        except LotusError as e:
            self._report(str(a["depth"]), "failed", {}, str(e))

    def _one_input(self, item) -> None:
        from .. import sources
        from ..pointcloud import check_size

        try:
            if sources.is_video(item.path):
                return self._one_video(item)
            if self._skip(item.key, str(item.path)):
                return
            rgb = sources.read_image(item.path, self.a["max_pixels"])
            check_size(rgb.shape[1], rgb.shape[0], str(item.path))
            self._predict_and_write(item.key, rgb, sources.exif_focal_35mm(item.path), {"input": str(item.path)})
        except UsageError as e:
            fail(e)
        except LotusError as e:
            self._report(str(item.path), "failed", {}, str(e))

    def _one_video(self, item) -> None:
        """One PLY per sampled frame, all in one metric frame: the first frame's scale and shift are fitted as
        for an image; each later frame's map is first aligned to the clip's running reference (as
        `lotus depth --stabilize` does), then given the same scale and shift, so static surfaces stay put."""
        from ..runner import frame_name
        from ..sinks import write_json
        from ..video import Stabilizer, open_video

        if self._skip(item.key, str(item.path), clip=True):
            return
        info, frames = open_video(item.path, self.select)
        stabilizer, first, written = Stabilizer(), None, []
        for fr in frames:
            key = f"{item.key}/{frame_name(fr.index, fr.time)}"
            rec = self._predict_and_write(key, fr.rgb, None, {"input": str(item.path), "frame": fr.index,
                                                              "time_s": fr.time}, stabilizer=stabilizer, reuse=first)
            first = first or rec["depth"]
            written.append(rec)
        write_json(self.out / f"{item.key}.json", {"input": str(item.path), "frames": written,
                                                    "fps": info.fps, "size": [info.width, info.height]})
        self._report(str(item.path), "done", {"ply": str(self.out / item.key)}, None, frames=len(written))

    def _outputs(self, key: str) -> list[Path]:
        """The files one frame's cloud is made of, besides its sidecar."""
        from ..mesh import FORMATS

        base = self.out / key
        names = [".ply", *(FORMATS[f] for f in self.mesh_formats), *([".preview.png"] if self.a["preview"] else [])]
        return [base.with_name(base.name + n) for n in names]

    def _skip(self, key: str, subject: str, clip: bool = False) -> bool:
        side = self.out / f"{key}.json"
        done = side.is_file() and (clip or all(p.is_file() for p in self._outputs(key)))
        if self.a["skip_existing"] and done:
            self._report(subject, "skipped", {}, None)
            return True
        return False

    def _predict_and_write(self, key, rgb, exif, record, stabilizer=None, reuse=None):
        t0 = time.perf_counter()
        pred = self.depth_model.predict(rgb, self.opts)
        values = stabilizer(pred.map)[0] if stabilizer is not None else pred.map
        normals = self.normal_model.predict(rgb, self.opts).map if self.normal_model else None
        record = {**record, "model": self.depth_model.source, "normal_model": getattr(self.normal_model, "source", None),
                  "processing_res": self.opts.processing_res,
                  "processing_size": [pred.processing_size[1], pred.processing_size[0]],
                  "model_seconds": round(time.perf_counter() - t0, 4)}
        return self._write(key, rgb, values, self.depth_model.kind, None, normals, exif, None, record,
                           count=stabilizer is None, reuse=reuse)

    def _write(self, key, rgb, values, kind, per_metre, normals, exif, input_size, record, count=True, reuse=None,
               units_assumed=None, texture=None):
        """Cloud, then mesh files and preview when asked, then the sidecar (last: it marks the frame done)."""
        from .. import __version__, sinks, sources
        from ..pointcloud import header_comments, make_cloud

        align = None
        if self.a["align_to"] is not None:
            align, _ = sources.read_depth_map(Path(self.a["align_to"]), "depth", self.a["align_units"], "--align-to")
            _check_aspect(values.shape, align.shape, f"the depth map and --align-to {self.a['align_to']}")
        try:
            cloud = make_cloud(rgb, values, kind, self.camera, self.scale, self.cloud, per_metre=per_metre,
                               normals=self.normals, normals_lotus=normals, exif_f35=exif, input_size=input_size,
                               align=align, reuse=reuse, units_assumed=units_assumed)
        except ValueError as e:
            raise InputError(f"{record.get('input') or record.get('depth_input')}: {e}", "check the depth map") from e
        ply, side = self.out / f"{key}.ply", self.out / f"{key}.json"
        full = {"version": __version__, **record, **cloud.record, "ply": ply.name}
        comments = header_comments(full)
        sinks.write_ply(ply, cloud.points, cloud.colors, cloud.normals, comments)
        outputs = {"ply": str(ply), **self._mesh_and_preview(key, cloud, full, rgb if texture is None else texture,
                                                             comments)}
        sinks.write_json(side, full)
        if cloud.record["depth"].get("warning"):
            say(f"warning: {record.get('input') or record.get('depth_input')}: {cloud.record['depth']['warning']}",
                "yellow")
        if count:
            self._report(record.get("input") or record.get("depth_input"), "done", {**outputs, "json": str(side)}, None)
        return {"file": ply.name, "points": cloud.record["cloud"]["points"], "depth": cloud.record["depth"]}

    def _mesh_and_preview(self, key, cloud, full, texture, comments) -> dict:
        """The mesh files and the preview asked for, recorded in the sidecar record ``full``; {name: path}."""
        from .. import mesh, preview, sinks

        outputs, shown = {}, cloud
        if self.mesh_formats:
            shown = mesh.from_cloud(cloud, self.cloud.stride)
            ply = self.out / f"{key}.ply"
            files = mesh.write(shown, self.mesh_formats, ply.parent, ply.name[:-len(".ply")], texture, comments)
            full["mesh"] = {**shown.record, "files": files, "frame": full["cloud"]["frame"],
                            "glb_frame": mesh.GLB_FRAME if "glb" in files else None}
            outputs.update({f: str(ply.parent / name) for f, name in files.items()})
            if not files:
                say(f"warning: {full.get('input') or full.get('depth_input')}: no 2x2 block of kept pixels, so no "
                    "mesh (lower --edge-threshold or --stride)", "yellow")
        if self.a["preview"]:
            png = self.out / f"{key}.preview.png"
            sinks.write_bytes(png, sinks.encode_png(preview.render_cloud(shown, cloud.K, self.cloud.stride)))
            full["preview"] = {"file": png.name, **preview.describe()}
            outputs["preview"] = str(png)
        return outputs

    def _report(self, subject, status, outputs, error, frames=1):
        if status == "failed":
            self.failed += 1
            say(f"failed: {error}", "red")
        elif status == "done":
            self.done += 1
        if self.a["json"]:
            import json
            import sys

            sys.stdout.write(json.dumps({"input": str(subject), "status": status, "outputs": outputs,
                                         "error": error, "frames": frames, "kind": "pointcloud"}) + "\n")
            sys.stdout.flush()


def _for_normal_model(e: LotusError) -> LotusError:
    """A model error about the normal model, its advice given for the option that names it here."""

    def swap(text):
        return re.sub(r"(?<![\w-])--model\b", "--normal-model", text) if text else text

    return type(e)(swap(e.message), swap(e.hint))


def _check_aspect(a_shape, b_shape, what: str) -> None:
    """Maps of one view may differ in size, never in shape: refuse when b, scaled to a's height, is more
    than a pixel wider or narrower than a."""
    (ah, aw), (bh, bw) = a_shape[:2], b_shape[:2]
    if abs(bw * ah / bh - aw) > 1.0:
        raise InputError(f"{what} differ in aspect ratio ({aw}x{ah} vs {bw}x{bh})",
                         "give maps of the same view, uncropped (resizing is fine)")

