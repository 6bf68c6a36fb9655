"""`lotus pointcloud` as a library call: images, videos or existing depth maps -> metric PLY point clouds,
with every assumption stated.

``PointcloudRequest`` holds one call's options; ``pointclouds(request, reporter)`` checks every option
before any model loads, loads the depth model (none for a ``depth`` map) and the normal model when normals
are predicted, and writes each input's cloud (``cloud_files``). One bad input is a failed result and the
batch goes on; a clip writes its sidecar first with ``complete`` false and rewrites it when its last frame
is done (or with ``interrupted`` / ``error``), so a rerun redoes a clip that did not finish.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import InputError, LotusError, UsageError, brief
from ..geometry import mesh
from ..geometry.align import Stabilizer
from ..geometry.cloud import CameraOptions, CloudOptions, ScaleOptions, check_size, parse_intrinsics, resize_to
from ..io import remote, sources, visualize
from ..io.atomic import check_out_dir, write_json
from ..io.sidecar import sidecar
from ..io.sources import Item, is_video
from ..io.video import FrameSelect, open_video
from ..io.xmp import auto_projection
from ..model import backends, registry
from ..model.panorama import PanoramaOptions, predict_panorama
from ..model.predictor import PredictOptions
from .clip import frame_name
from .cloud_files import KIND, CloudSpec, write_cloud
from .events import Reporter
from .loading import load_predictor
from .results import ItemResult, Summary


@dataclass(frozen=True)
class PointcloudRequest:
    """The options of one `lotus pointcloud` call (defaults: the command's; `lotus pointcloud --help` and the
    docs' point-cloud page say what each means)."""

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
    backend: str | None = None  # torch | onnxruntime | auto; None: what auto recorded, else torch (model/backends.py)
    fps: float | None = None
    start: float | None = None
    end: float | None = None
    max_frames: int | None = None
    skip_existing: bool = False
    projection: str = "perspective"  # perspective | equirect | auto (docs/panoramas.md)

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else Path("lotus-pointcloud")


def pointclouds(request: PointcloudRequest, reporter: Reporter = Reporter()) -> Summary:
    """Every input's cloud under ``request.out_dir``; UsageError / ModelError before any input is read when
    the options or a model are wrong."""
    return CloudRun(request, reporter).run()


def _check(r: PointcloudRequest) -> None:
    """Checks of the options that no library object makes (UsageError naming the flag)."""
    if r.max_pixels < 0:
        raise UsageError(f"--max-pixels must be >= 0, not {r.max_pixels}", "0 means no limit")
    backends.check(r.backend, r.model, dtype=r.dtype)
    if r.normals not in ("auto", "predict", "depth", "none"):
        raise UsageError(f"--normals {r.normals!r}: expected auto, predict, depth or none")
    if r.shape_from_normals and r.normals in ("depth", "none"):
        raise UsageError("--shape-from-normals needs the normal model's normals", "use --normals predict or auto")
    if r.depth_kind not in (None, "depth", "disparity"):
        raise UsageError(f"--depth-kind {r.depth_kind!r}: expected depth or disparity")
    registry.check_output_kind(r.output_kind, "depth")
    if r.depth is not None and r.output_kind is not None:
        raise UsageError(
            "--output-kind describes the depth model, and --depth runs none", "state the map's kind with --depth-kind"
        )
    sources.parse_units(r.depth_units)
    sources.parse_units(r.align_units, "--align-units")
    if r.align_to is not None and not Path(r.align_to).is_file():
        raise UsageError(f"--align-to {r.align_to}: no such file", "give a metric depth map (.npy or 16-bit .png)")
    if r.depth is not None and len(r.inputs) > 1:
        raise UsageError("--depth back-projects one map: give at most one image (for the colours)")
    if r.depth is None and not r.inputs:
        raise UsageError("no inputs given", "pass images, videos, folders, or --depth MAP")
    if r.projection not in ("perspective", "equirect", "auto"):
        raise UsageError(f"--projection must be perspective, equirect or auto, not {r.projection!r}")
    if r.projection != "perspective":  # a panorama has no pinhole camera, and the preview is a camera's view
        pinhole = [
            n
            for n, on in (
                ("--fov", r.fov is not None),
                ("--focal-px", r.focal_px is not None),
                ("--intrinsics", r.intrinsics is not None),
                ("--shape-from-normals", r.shape_from_normals),
                ("--preview", r.preview),
            )
            if on
        ]
        if pinhole:
            raise UsageError(
                f"{', '.join(pinhole)} need a pinhole camera, and --projection {r.projection} may have none",
                f"drop {', '.join(pinhole)}",
            )


class CloudRun:
    """One validated `lotus pointcloud` call: every option is checked on construction, before any model loads."""

    def __init__(self, r: PointcloudRequest, reporter: Reporter = Reporter()):
        _check(r)
        self.r, self.reporter = r, reporter
        self.camera = CameraOptions(r.fov, r.focal_px, parse_intrinsics(r.intrinsics))
        self.scale = ScaleOptions(
            r.near, r.far, r.depth_scale, r.depth_shift, r.shape_from_normals, r.align_to is not None
        )
        self.cloud = CloudOptions(
            r.edge_threshold, r.stride, r.max_points, r.seed, r.up or "opencv", r.drop_without_normal
        )
        want_mesh = r.mesh or r.mesh_format is not None
        self.mesh_formats = mesh.parse_formats(r.mesh_format or "glb") if want_mesh else ()
        if self.mesh_formats and r.max_points:
            raise UsageError(
                "--max-points thins the cloud at random, and a mesh needs the pixel grid",
                "decimate with --stride instead",
            )
        self.opts = PredictOptions(processing_res=r.processing_res, seed=r.seed)
        self.select = FrameSelect(r.fps, r.start, r.end, r.max_frames)
        # an unknown or wrong-task model (or one nothing describes) fails before any input is read
        self.depth_ref = None if r.depth is not None else backends.resolve_model(r.model, "depth", r.output_kind)
        self.out, self.outputs = self._out_dir(r)
        self.problems: list[InputError] = []
        self.staged = remote.Inputs({})
        if r.depth is not None:
            self.map_key = Path(r.depth).name.split(".")[0]  # x.16bit.png -> x: the outputs' name
            self.items = [Item(Path(remote.normalise(r.inputs[0])), self.map_key)] if r.inputs else []
        else:
            self.items, self.problems = self._list(r.inputs)
        if r.align_to is not None and (
            len(self.items) + len(self.problems) > 1 or any(is_video(i.path) for i in self.items)
        ):
            raise UsageError("--align-to fits one metric map to one view", "give a single image or --depth map")
        self.summary = Summary(out=self.outputs.url if self.outputs else str(self.out))

    @staticmethod
    def _out_dir(r: PointcloudRequest):
        """(the local folder the files are written in, the remote --out they are published to, or None): a URL
        (s3://...) stages its files locally and uploads each cloud as it is done, as `lotus depth` does."""
        out = remote.normalise(r.out_dir)  # file:///x is the local /x
        if remote.is_url(out):
            outputs = remote.Outputs(out)
            outputs.check()
            return outputs.staging, outputs
        check_out_dir(Path(out))
        return Path(out), None

    def _list(self, inputs):
        """(items, problems) of local paths and URLs; the output folder is never listed."""
        local = [remote.normalise(i) for i in inputs if not remote.is_url(i)]
        items, problems = ([], [])
        if local:
            exclude = () if self.outputs else (self.out,)
            items, problems = sources.expand(
                local, exts=sources.MEDIA_EXTS, exclude=exclude, on_warning=self.reporter.warning
            )
        urls = [i for i in inputs if remote.is_url(i)]
        if urls:
            excluded = (self.outputs.url,) if self.outputs else ()
            more, more_problems, self.staged = remote.expand(urls, sources.MEDIA_EXTS, exclude=excluded)
            items, problems = items + more, problems + more_problems
        return items, problems

    # -- running ---------------------------------------------------------------------------------------

    def run(self) -> Summary:
        t0 = time.perf_counter()
        r = self.r
        for problem in self.problems:
            self._report(ItemResult.unusable(problem))
        self.depth_model = None
        if self.depth_ref is not None:
            res, backend = r.processing_res, backends.check(r.backend, r.model, dtype=r.dtype)
            self.depth_model = load_predictor(
                self.depth_ref, "depth", r.device, r.dtype, self.reporter, processing_res=res, backend=backend
            )
            self.scale.check_kind(self.depth_model.kind)
        self.normal_model = self._normal_model()
        normals = "predict" if self.normal_model is not None else ("none" if r.normals == "none" else "depth")
        align = None
        if r.align_to is not None:
            align, _ = sources.read_depth_map(Path(r.align_to), "depth", r.align_units, "--align-to")
        self.spec = CloudSpec(
            self.out,
            self.camera,
            self.scale,
            self.cloud,
            normals,
            self.mesh_formats,
            r.preview,
            self._model_record(),
            align,
        )
        if r.depth is not None:
            self._guarded(self.map_key, str(self.items[0].path if self.items else r.depth), self._one_map)
        for item in [] if r.depth is not None else self.items:
            self._guarded(item.key, str(item.path), self._one_input, item)
        self.summary.seconds = time.perf_counter() - t0
        return self.summary

    def _normal_model(self):
        """The normal model when normals are to be predicted: --normals predict, --shape-from-normals, a named
        --normal-model, or auto when the default normal model is cached or can be downloaded."""
        r = self.r
        if r.normals in ("depth", "none"):
            return None
        wanted = r.normals == "predict" or r.shape_from_normals or r.normal_model is not None
        if r.depth is not None and not self.items:
            if wanted:
                raise UsageError("predicted normals need the image", "give the image with --depth, or --normals depth")
            return None
        try:
            ref = registry.fetch(backends.resolve_model(r.normal_model, "normal"))
            registry.check_known(ref, "normal")
        except LotusError as e:
            if not wanted:
                self.reporter.note(f"note: normals from the depth ({e.message})")
                return None
            raise _for_normal_model(e) from e
        return load_predictor(
            ref,
            "normal",
            r.device,
            r.dtype,
            self.reporter,
            processing_res=r.processing_res,
            backend=backends.check(r.backend, None, dtype=r.dtype),
        )

    def _model_record(self) -> dict:
        """What makes the clouds, for the sidecars: the depth model (None for a --depth map) and the normal model
        (None unless normals are predicted), and where they run."""
        running = self.depth_model or self.normal_model
        record = {
            "model": getattr(self.depth_model, "source", None),
            "normal_model": getattr(self.normal_model, "source", None),
        }
        if running is not None:
            described = running.describe()
            record.update(device=described["device"], dtype=described["dtype"], backend=described["backend"])
        return record

    def options(self, clip: bool = False) -> dict:
        """Every option that changes a cloud (or a clip's clouds), as its sidecar records them and a rerun
        with --skip-existing compares them. Options that cannot act are None: --processing-res without a
        model, --seed when nothing is random (D models, no --max-points). The normal model is here too:
        ``reusable`` compares the depth model (``model``) on its own."""
        r = self.r
        models_ = [m for m in (self.depth_model, self.normal_model) if m is not None]
        random = r.max_points > 0 or any(m.family == "g" for m in models_)
        options = {
            "processing_res": r.processing_res if models_ else None,
            "seed": r.seed if random else None,
            "normals": self.spec.normals,
            "normal_model": self.spec.model["normal_model"],
            "fov": r.fov,
            "focal_px": r.focal_px,
            "intrinsics": list(self.camera.intrinsics) if self.camera.intrinsics else None,
            "near": r.near,
            "far": r.far,
            "depth_scale": r.depth_scale,
            "depth_shift": r.depth_shift,
            "align_to": None if r.align_to is None else str(r.align_to),
            "align_units": r.align_units,
            "shape_from_normals": r.shape_from_normals,
            "depth_kind": r.depth_kind,
            "depth_units": r.depth_units,
            "edge_threshold": r.edge_threshold,
            "stride": r.stride,
            "max_points": r.max_points,
            "drop_without_normal": r.drop_without_normal,
            "up": self.cloud.up,
            "mesh_formats": list(self.mesh_formats),
            "preview": r.preview,
        }
        if r.projection != "perspective":  # only then: earlier sidecars stay reusable
            options["projection"] = r.projection
        if clip:
            options.update(fps=r.fps, start=r.start, end=r.end, max_frames=r.max_frames)
        # JSON has no infinity (--far inf): such a number is recorded as its text
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in options.items()}

    # -- one input --------------------------------------------------------------------------------------

    def _projection(self, path: Path | None) -> tuple[str, str]:
        """(projection, the rule that decided) for an input: --projection, or with auto the image file's own
        (2:1 and XMP GPano:ProjectionType equirectangular, io/xmp.py); a video's metadata is not read."""
        p = self.r.projection
        if p != "auto":
            return p, f"--projection {p}"
        if path is None or is_video(path):
            return "perspective", "auto: no image file's metadata to read (--projection equirect for a 360 clip or map)"
        return auto_projection(path)

    def _predict(self, model, rgb: np.ndarray, projection: tuple[str, str]):
        """``model``'s Prediction for ``rgb``: through the panorama's views for an equirect ``projection``."""
        if projection[0] == "equirect":
            return predict_panorama(model, [rgb], self.opts, PanoramaOptions(rule=projection[1]))[0]
        return model.predict(rgb, self.opts)

    def _spec(self, projection: tuple[str, str]) -> CloudSpec:
        return (
            self.spec
            if projection[0] == "perspective"
            else replace(self.spec, projection=projection[0], projection_rule=projection[1])
        )

    def _report(self, r: ItemResult) -> None:
        r.kind, r.input = KIND, self.staged.url(r.item)
        r.backend = self.spec.model.get("backend") if getattr(self, "spec", None) and r.status != "skipped" else None
        if self.outputs is not None:
            r = self.outputs.publish(r)
        self.summary.add(r)
        self.reporter.result(r)

    def _guarded(self, key: str, subject: str, work, *args) -> None:
        """``work(*args)``, which reports its own result; any failure but a usage error (wrong for every input:
        it ends the run) becomes this input's failed result, and the batch goes on."""
        redone = None
        try:
            redone = self._redo(key, subject, is_video(Path(subject)) and self.r.depth is None)
            if redone is not False:
                url = self.staged.url(Item(Path(subject), key))
                if url:
                    remote.fetch(url, Path(subject))
                work(*args, redone=redone)
        except UsageError:
            raise
        except LotusError as e:
            self._report(ItemResult(Item(Path(subject), key), "failed", error=str(e), redone=redone or None))
        except Exception as e:  # a library's own failure (an extreme aspect ratio, a folder where a file goes)
            error = f"{subject}: {brief(e)}"
            self._report(ItemResult(Item(Path(subject), key), "failed", error=error, redone=redone or None))

    def _redo(self, key: str, subject: str, clip: bool):
        """--skip-existing: False when ``key``'s outputs stay (reported as skipped), else why they are redone
        (None: nothing to reuse, or --skip-existing is off)."""
        if not self.r.skip_existing:
            return None
        if self.outputs is not None:  # judged at the URL: the sidecar there, and the files it names
            made = {"kind": KIND, "model": self.spec.model["model"], "options": self.options(clip), "settings": {}}
            files = [] if clip else [f.relative_to(self.out).as_posix() for f in self.spec.files(key)]
            keep, why = self.outputs.reusable(f"{key}.json", files, lambda: made)
        else:
            keep, why = self.spec.reuse(key, self.options(clip), clip)
        if keep:
            self._report(ItemResult(Item(Path(subject), key), "skipped", {"json": str(self.out / f"{key}.json")}))
            return False
        return why

    def _one_map(self, redone=None) -> None:
        """--depth MAP [IMAGE]: back-project a map that exists."""
        r, key = self.r, self.map_key
        image = self.items[0].path if self.items else None
        t0 = time.perf_counter()
        values, info = sources.read_depth_map(Path(r.depth), r.depth_kind, r.depth_units)
        check_size(values.shape[1], values.shape[0], f"--depth {r.depth}")
        sections = {"depth_input": str(r.depth), "depth_input_info": info}
        if image is not None:
            rgb_full = sources.read_image(image, r.max_pixels)
            _check_aspect(rgb_full.shape, values.shape, f"{image} and --depth {r.depth}")
            input_size, exif = (rgb_full.shape[1], rgb_full.shape[0]), sources.exif_focal_35mm(image)
            rgb = resize_to(rgb_full, values.shape)
            if rgb.shape[:2] != rgb_full.shape[:2]:
                (ih, iw), (mh, mw) = rgb_full.shape[:2], values.shape
                sections["colours_resized"] = {
                    "from": [iw, ih],
                    "to": [mw, mh],
                    "note": "the image was resized to the depth map; the camera was scaled with it",
                }
                self.reporter.warning(
                    f"{image} is {iw}x{ih}, --depth {r.depth} is {mw}x{mh}: colours resized to the map "
                    "(the camera scaled with them)"
                )
        else:
            fill = float(np.nanmin(values)) if np.isfinite(values).any() else 0.0
            rgb = visualize.colorize_depth(np.nan_to_num(values, nan=fill), info["kind"], "Spectral")
            input_size, exif, rgb_full = None, None, None
        projection = self._projection(image)  # with auto: the image's metadata (a map file has none)
        normals = None
        if self.normal_model is not None:
            normals = resize_to(self._predict(self.normal_model, rgb_full, projection).map, values.shape)
        units = info["units"] if info["units"].startswith("assumed") else None
        subject = str(image if image is not None else r.depth)
        outputs, _ = write_cloud(
            self._spec(projection),
            key,
            subject,
            rgb,
            values,
            info["kind"],
            self.options(),
            sections,
            self.reporter,
            t0,
            per_metre=info["per_metre"],
            normals=normals,
            exif=exif,
            input_size=input_size,
            units_assumed=units,
            texture=rgb_full,
        )
        self._done(key, subject, outputs, t0, redone)

    def _one_input(self, item: Item, redone=None) -> None:
        if is_video(item.path):
            return self._one_video(item, redone)
        t0 = time.perf_counter()
        rgb = sources.read_image(item.path, self.r.max_pixels)
        check_size(rgb.shape[1], rgb.shape[0], str(item.path))
        outputs, _ = self._predict_and_write(
            item.key, str(item.path), rgb, sources.exif_focal_35mm(item.path), {}, t0, self.options(),
            projection=self._projection(item.path),
        )  # fmt: skip
        self._done(item.key, str(item.path), outputs, t0, redone)

    def _done(self, key: str, subject: str, outputs: dict, t0: float, redone, frames: int = 1) -> None:
        seconds = time.perf_counter() - t0
        self._report(ItemResult(Item(Path(subject), key), "done", outputs, None, seconds, frames, redone))

    def _one_video(self, item: Item, redone=None) -> None:
        """One PLY per sampled frame, all in one metric frame: the first frame's scale and shift are fitted as
        for an image; each later frame's map is first aligned to the clip's running reference (as
        `lotus depth --stabilize` does), then given the same scale and shift, so static surfaces stay put."""
        t0 = time.perf_counter()
        subject = str(item.path)
        side = self.out / f"{item.key}.json"
        stabilizer, first, written = Stabilizer(), None, []
        state = {"complete": False, "interrupted": False, "error": None}
        info, frames = open_video(item.path, self.select)

        def record():
            video = {"fps": info.fps, "source_fps": info.source_fps, "size": [info.width, info.height]}
            files = "<index>_<seconds>s.ply (and the mesh and preview files), each frame with its own sidecar"
            return sidecar(
                KIND,
                model=self.spec.model,
                options=self.options(clip=True),
                input=subject,
                key=item.key,
                outputs={"frames": {"folder": item.key, "files": files}},
                seconds=time.perf_counter() - t0,
                video={**video, "frames": len(written)},
                frames=written,
                **state,
            )

        write_json(side, record())  # complete: false until the last frame; replaces an earlier run's sidecar
        try:
            for fr in frames:
                key = f"{item.key}/{frame_name(fr.index, fr.time)}"
                sections = {"frame": fr.index, "time_s": fr.time}
                _, frame = self._predict_and_write(
                    key,
                    subject,
                    fr.rgb,
                    None,
                    sections,
                    time.perf_counter(),
                    self.options(clip=True),
                    stabilizer,
                    first,
                    projection=self._projection(item.path),
                )
                first = first or frame["depth"]
                written.append(frame)
            state["complete"] = True
        except KeyboardInterrupt:
            state["interrupted"] = True
            raise
        except Exception as e:
            state["error"] = str(e) if isinstance(e, LotusError) else brief(e)
            raise
        finally:
            write_json(side, record())
        outputs = {"ply": str(self.out / item.key), "json": str(side)}
        self._done(item.key, subject, outputs, t0, redone, frames=len(written))

    def _predict_and_write(
        self,
        key,
        subject,
        rgb,
        exif,
        sections,
        t0,
        options,
        stabilizer=None,
        reuse=None,
        projection=("perspective", ""),
    ):
        t_model = time.perf_counter()
        pred = self._predict(self.depth_model, rgb, projection)
        values = stabilizer(pred.map)[0] if stabilizer is not None else pred.map
        normals = self._predict(self.normal_model, rgb, projection).map if self.normal_model else None
        sections = {
            **sections,
            "processing_size": [pred.processing_size[1], pred.processing_size[0]],
            "model_seconds": round(time.perf_counter() - t_model, 4),
        }
        kind = self.depth_model.kind
        if "panorama" in pred.extra:
            sections["panorama"] = pred.extra["panorama"]
        elif self.r.projection == "auto":  # decided against a panorama: say why, as lotus depth does
            sections["projection"] = {"projection": projection[0], "rule": projection[1]}
        return write_cloud(
            self._spec(projection), key, subject, rgb, values, kind, options, sections, self.reporter, t0,
            normals=normals, exif=exif, reuse=reuse,
        )  # fmt: skip


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
