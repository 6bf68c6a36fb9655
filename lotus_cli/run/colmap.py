"""`lotus colmap` as a library call: depth in the reconstruction's units and normal priors for every registered
image of a COLMAP workspace, and one fused point cloud of them.

``ColmapRequest`` holds one call's options; ``colmap_scene(request, reporter)`` checks every option and reads
the workspace (with pycolmap, an extra: imported here only) before any model loads, then per registered
image: predicts depth (and normals) with the shared predictor, tiled with ``tile`` (or reads maps already
made, matched by file stem), fits scale and shift to the SfM points the image observes (``geometry.colmap``:
projected with the image's own camera model, distortion included; outliers rejected; a refusal where the
fit cannot be trusted, and then nothing is written for the image), and writes the layouts trainers read
(docs/colmap.md names the file and line of each reader). One bad image is a failed result and the scene
goes on. Last, the views are fused (``geometry.fusion``) into ``fused.ply``.

Outputs under ``out`` (default: the scene folder, where nerfstudio and dn-splatter look):

- ``depths/<key>.png``: uint16 depth in thousandths of the reconstruction's unit (mm for metres), 0 = none
- ``mono_depth/<key>_aligned.npy``: float32 depth (z) in the reconstruction's unit, 0 = none
- ``depth_exr/<key>.exr``: float32 depth in ``scene_units`` (``exr``, which needs them), 0 = none
- ``normals/<key>.npy``: float32 unit normals, OpenCV camera frame (x right, y down, z forward), 0 = none
- ``normals_from_pretrain/<key>.png``: uint8 (n + 1) / 2 * 255, OpenGL camera frame (x right, y up, z back)
- ``normals_world/<key>.npy``: float32 unit normals in the reconstruction's world frame (``world_normals``)
- ``lotus-colmap/<key>.json``: the image's sidecar (model, options, alignment statistics, files)
- ``lotus-colmap/scene.json``: the scene's (every image's alignment, scale consistency, fusion)
- ``transforms.json``: nerfstudio's, one frame per image with ``depth_file_path``
- ``fused.ply``: the fused cloud (world frame, normals, colours)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, LotusError, OutputError, UsageError, brief
from ..geometry.camera import convert_normals
from ..geometry.colmap import COLMAP_PIXEL_OFFSET, MIN_POINTS, align_to_points, normals_to_world, sample_bilinear
from ..geometry.colmap import scale_consistency as consistency
from ..geometry.fusion import DepthCache, PlyStream, View, covisible_neighbours, fuse_views
from ..io import formats, sources
from ..io.atomic import atomic_open, check_out_dir, write_json, write_npy
from ..io.sidecar import read_record, reusable, sidecar, vouched
from ..io.sources import Item
from ..model import registry
from ..model.predictor import PredictOptions
from ..model.tiling import TileOptions
from .events import Reporter
from .loading import load_predictor
from .predict import make_predict, tile_progress
from .results import ItemResult, Summary

KIND = "depth"  # what the maps hold: depth (z) in the reconstruction's unit
SIDECARS = "lotus-colmap"
PNG_PER_UNIT = 1000  # depths/*.png: thousandths of the unit (mm for a metric scene), nerfstudio's default 1e-3
MAP_SUFFIXES = (".npy", ".exr", ".16bit.png", ".png")
PIP_HINT = "pip install 'lotus-cli[colmap]' (or: pip install pycolmap)"


@dataclass(frozen=True)
class ColmapRequest:
    """The options of one `lotus colmap` call (defaults: the command's; docs/colmap.md says what each means)."""

    scene: Path
    out: Path | None = None
    images: Path | None = None
    sparse: Path | None = None
    model: str | None = None
    output_kind: str | None = None
    normals: str = "predict"  # predict | none
    normal_model: str | None = None
    depth: Path | None = None  # a folder of maps made already, matched by stem
    depth_kind: str | None = None
    normals_from: Path | None = None
    world_normals: bool = False
    scene_units: str | None = None  # what one unit of the reconstruction is ("m" when scaled / georeferenced)
    min_points: int = MIN_POINTS
    fuse: bool = True
    min_views: int = 2
    tolerance: float = 0.01
    fusion_stride: int = 2
    neighbours: int = 8
    transforms: bool = True
    exr: bool = False  # also depth_exr/<key>.exr (float32 Z in --scene-units, which must be given)
    tile: str | None = None
    processing_res: int = 768
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    max_pixels: int = 100_000_000
    skip_existing: bool = False

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else Path(self.scene)


def colmap_scene(
    request: ColmapRequest, reporter: Reporter = Reporter(), select: Callable[[list[Item]], list[Item]] | None = None
) -> Summary:
    """Every registered image's maps under ``request.out_dir`` and the fused cloud; ``select`` picks this
    process's share of the images (``scale.shard.select``; fusion then waits for a run over all of them).
    UsageError / InputError before any model loads when the options or the workspace are wrong."""
    return SceneRun(request, reporter, select).run()


def pycolmap_module():
    """The pycolmap module (an extra), or a UsageError with the pip command."""
    try:
        import pycolmap
    except ImportError as e:
        raise UsageError(f"lotus colmap reads COLMAP workspaces with pycolmap, not installed ({e})", PIP_HINT) from e
    return pycolmap


def _check(r: ColmapRequest) -> None:
    """Checks of the options that no library object makes (UsageError naming the flag)."""
    if r.normals not in ("predict", "none"):
        raise UsageError(f"--normals {r.normals!r}: expected predict or none")
    if r.depth_kind not in (None, "depth", "disparity"):
        raise UsageError(f"--depth-kind {r.depth_kind!r}: expected depth or disparity")
    if r.depth is not None and r.output_kind is not None:
        raise UsageError("--output-kind describes the depth model, and --depth runs none", "use --depth-kind")
    for flag, folder in (("--depth", r.depth), ("--normals-from", r.normals_from)):
        if folder is not None and not Path(folder).is_dir():
            raise UsageError(f"{flag} {folder}: no such folder", "give the folder that holds the maps, named by stem")
    if r.min_points < 3:
        raise UsageError(
            f"--min-points must be at least 3, not {r.min_points}", "two numbers need more than two points"
        )
    if r.min_views < 1 or r.neighbours < r.min_views:
        raise UsageError(
            f"--min-views {r.min_views} with --neighbours {r.neighbours}: need 1 <= min-views <= neighbours",
            "e.g. --min-views 2 --neighbours 8",
        )
    if not 0 < r.tolerance < 1:
        raise UsageError(f"--tolerance must be a fraction in (0, 1), not {r.tolerance}", "e.g. 0.01 (1 % of the depth)")
    if r.fusion_stride < 1:
        raise UsageError(f"--fusion-stride must be at least 1, not {r.fusion_stride}")
    if r.max_pixels < 0:
        raise UsageError(f"--max-pixels must be >= 0, not {r.max_pixels}", "0 means no limit")
    if r.scene_units is not None:
        sources.parse_units(r.scene_units, "--scene-units")
    if r.exr and r.scene_units in (None, "relative"):
        raise UsageError(
            "--exr states the depth's unit in its header, and the reconstruction's unit is not given",
            "add --scene-units m (or mm) when the reconstruction is scaled; else use the npy or png maps",
        )
    registry.check_output_kind(r.output_kind, "depth")


def find_model(scene: Path, sparse: Path | None) -> Path:
    """The folder of the COLMAP model: ``sparse`` if given, else the first of SCENE/sparse/0 (COLMAP, gsplat),
    SCENE/colmap/sparse/0 (nerfstudio's ns-process-data), SCENE/sparse and SCENE holding cameras, images
    and points3D (.bin or .txt). InputError naming what is missing."""
    if not Path(scene).is_dir():
        raise InputError(
            f"{scene}: no such folder", "give a COLMAP workspace: the folder holding images/ and sparse/0/"
        )
    candidates = (
        [Path(sparse)]
        if sparse is not None
        else [scene / "sparse/0", scene / "colmap/sparse/0", scene / "sparse", scene]
    )
    for folder in candidates:
        have = {
            n: any((folder / f"{n}.{e}").is_file() for e in ("bin", "txt")) for n in ("cameras", "images", "points3D")
        }
        if all(have.values()):
            return folder
        if sparse is not None or any(have.values()):
            missing = ", ".join(f"{n}.bin/.txt" for n, ok in have.items() if not ok)
            raise InputError(
                f"{folder}: not a COLMAP model ({missing} missing)",
                "give --sparse the folder COLMAP's mapper wrote (cameras, images and points3D, .bin or .txt)",
            )
    raise InputError(
        f"{scene}: not a COLMAP workspace (no sparse/0, colmap/sparse/0 or sparse model in it)",
        "give the folder holding images/ and sparse/0/ (or --sparse DIR and --images DIR)",
    )


def read_reconstruction(folder: Path):
    """The pycolmap Reconstruction of a model folder (binary or text); InputError when pycolmap cannot read it
    (a camera model it does not know, a truncated file)."""
    pycolmap = pycolmap_module()
    try:
        rec = pycolmap.Reconstruction(str(folder))
    except Exception as e:  # pycolmap raises its own C++ errors (ValueError, RuntimeError) with the reason
        raise InputError(
            f"{folder}: pycolmap cannot read this COLMAP model ({brief(e)})",
            "re-export it with COLMAP (model_converter), using a camera model COLMAP knows",
        ) from e
    if rec.num_cameras() == 0 or rec.num_reg_images() == 0:
        raise InputError(f"{folder}: the model has no cameras or no registered images", "run COLMAP's mapper first")
    return rec


def image_key(name: str) -> str:
    """An image's output key: its name in the model without the suffix (a/b/x.jpg -> a/b/x)."""
    return name.rsplit(".", 1)[0] if "." in Path(name).name else name


@dataclass
class Registered:
    """One registered image of the model: its key, file, pose (X_cam = R X_world + t) and camera."""

    image_id: int
    name: str
    key: str
    path: Path
    R: np.ndarray
    t: np.ndarray
    camera: object  # pycolmap.Camera


def pose_of(image) -> tuple[np.ndarray, np.ndarray]:
    """(R [3, 3], t [3]) of a pycolmap Image's cam_from_world (a method in pycolmap 3.12+, an attribute before)."""
    cw = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
    return np.asarray(cw.rotation.matrix(), np.float64), np.asarray(cw.translation, np.float64)


def colmap_view(reg: Registered, width: int, height: int) -> View:
    """A fusion ``View`` of a registered image, its rays and projections through pycolmap's camera model."""
    cam = reg.camera

    def rays(uv):
        return np.asarray(cam.cam_from_img(np.ascontiguousarray(uv + COLMAP_PIXEL_OFFSET, np.float64)), np.float64)

    def project(X):
        uv = np.asarray(cam.img_from_cam(np.ascontiguousarray(X, np.float64)), np.float64)
        return uv - COLMAP_PIXEL_OFFSET  # behind the camera: NaN (pycolmap's cheirality check)

    return View(reg.R, reg.t, width, height, rays, project)


def camera_for(camera, width: int, height: int, what: str):
    """``camera`` for an image of width x height: itself, or a rescaled copy when the image was resized (the
    same aspect ratio within a pixel); InputError otherwise."""
    if (camera.width, camera.height) == (width, height):
        return camera
    if abs(camera.width * height / camera.height - width) > 1.0:
        raise InputError(
            f"{what} is {width}x{height}, its camera {camera.camera_id} is {camera.width}x{camera.height}",
            "give the images the model was made from (--images)",
        )
    pycolmap = pycolmap_module()
    c = pycolmap.Camera(camera.todict())
    c.rescale(width, height)
    return c


def find_map(folder: Path, key: str) -> Path | None:
    """The map of ``key`` in ``folder``: folder/key (or its last part) + .npy, .exr, .16bit.png or .png."""
    for base in dict.fromkeys((key, key.rsplit("/", 1)[-1])):
        for suffix in MAP_SUFFIXES:
            p = Path(folder) / f"{base}{suffix}"
            if p.is_file():
                return p
    return None


def resize_map(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """A map [h, w] or [h, w, 3] resized to height x width (bilinear; NaN spread to its neighbours)."""
    if a.shape[:2] == (height, width):
        return a
    import cv2

    return cv2.resize(a.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


class SceneRun:
    """One validated `lotus colmap` call: options checked and the workspace read on construction."""

    def __init__(self, r: ColmapRequest, reporter: Reporter = Reporter(), select=None):
        _check(r)
        self.r, self.reporter = r, reporter
        self.scene = Path(r.scene)
        self.sparse = find_model(self.scene, r.sparse)
        self.images_dir = Path(r.images) if r.images is not None else self.scene / "images"
        if not self.images_dir.is_dir():
            raise InputError(f"{self.images_dir}: no such folder (the workspace's images)", "give --images DIR")
        self.tiles = TileOptions(r.tile) if r.tile is not None else None
        self.opts = PredictOptions(processing_res=r.processing_res, seed=r.seed)
        self.depth_ref = None if r.depth is not None else registry.resolve(r.model, "depth", r.output_kind)
        self.want_normals = r.normals == "predict" or r.normals_from is not None
        if r.normals == "none" and r.normals_from is not None:
            raise UsageError("--normals none and --normals-from contradict each other", "drop one of them")
        self.normal_ref = (
            registry.resolve(r.normal_model, "normal") if r.normals == "predict" and r.normals_from is None else None
        )
        with reporter.busy(f"reading {self.sparse} ..."):
            self.rec = read_reconstruction(self.sparse)
        self.registered = self._registered()
        present = [g for g in self.registered if g.path.is_file()]
        if not present:
            raise InputError(
                f"{self.images_dir}: none of the model's {len(self.registered)} images is here "
                f"(e.g. {self.registered[0].name})",
                "give --images the folder the model was made from",
            )
        items = [Item(g.path, g.key) for g in self.registered]
        chosen = select(items) if select is not None else items
        self.sharded = select is not None  # another process may hold the views fusion needs
        keys = {i.key for i in chosen}
        self.todo = [g for g in self.registered if g.key in keys]
        self.out = r.out_dir
        check_out_dir(self.out)
        self.summary = Summary(out=str(self.out))
        self.alignments: dict[str, dict] = {}

    def _registered(self) -> list[Registered]:
        out = []
        for image_id in self.rec.reg_image_ids():
            im = self.rec.images[image_id]
            R, t = pose_of(im)
            name = im.name.replace("\\", "/")
            cam = self.rec.cameras[im.camera_id]
            out.append(Registered(image_id, name, image_key(name), self.images_dir / name, R, t, cam))
        return sorted(out, key=lambda g: g.name)

    # -- running ---------------------------------------------------------------------------------------

    def run(self) -> Summary:
        t0 = time.perf_counter()
        r = self.r
        self.depth_model = self.normal_model = None
        work = self.todo if not r.skip_existing else [g for g in self.todo if not self._reusable(g)[0]]
        if self.depth_ref is not None and work:
            self.depth_model = load_predictor(self.depth_ref, "depth", r.device, r.dtype, self.reporter)
        if self.normal_ref is not None and work:
            self.normal_model = load_predictor(self.normal_ref, "normal", r.device, r.dtype, self.reporter)
        # the batch functions `lotus depth` runs: tiling, the model's minimum size, out of memory per image
        progress = tile_progress(self.reporter)
        self.batch = {
            task: make_predict(m, self.tiles, None, progress=progress)
            for task, m in (("depth", self.depth_model), ("normal", self.normal_model))
            if m is not None
        }
        bar = self.reporter.progress("colmap images", len(self.todo))
        self.done: list[Registered] = []
        for g in self.todo:
            self._guarded(g)
            bar.advance()
        bar.close()
        fusion = None
        if r.fuse and self.sharded:
            self.reporter.note(
                "note: no fusion in a sharded run; run again without --shard (--skip-existing keeps the maps)"
            )
        elif r.fuse:
            fusion = self._fuse()
        if r.transforms and self.done and not self.sharded:
            self._write_transforms()
        self._write_scene(fusion)
        self.summary.seconds = time.perf_counter() - t0
        return self.summary

    def model_record(self) -> dict:
        """What makes the maps, as the loaded predictors name themselves (``LotusPredictor.source`` is its
        reference's label), known before they load, so a rerun that keeps everything loads none."""
        return {
            "model": None if self.depth_ref is None else self.depth_ref.label,
            "normal_model": None if self.normal_ref is None else self.normal_ref.label,
        }

    def options(self) -> dict:
        """Every option that changes an image's files, as its sidecar records them and --skip-existing compares."""
        r = self.r
        running = self.depth_ref is not None or self.normal_ref is not None
        return {
            "processing_res": r.processing_res if running else None,
            "seed": r.seed if running else None,
            "tile": r.tile,
            "depth": None if r.depth is None else str(r.depth),
            "depth_kind": r.depth_kind,
            "normals": r.normals,
            "normal_model": self.model_record()["normal_model"],
            "normals_from": None if r.normals_from is None else str(r.normals_from),
            "world_normals": r.world_normals,
            "exr": r.exr,
            "min_points": r.min_points,
            "sparse": str(self.sparse),
        }

    def files(self, key: str) -> dict[str, Path]:
        """{name: path} of what an image's run writes."""
        o = self.out
        files = {"depth_png": o / "depths" / f"{key}.png", "depth_npy": o / "mono_depth" / f"{key}_aligned.npy"}
        if self.r.exr:
            files["depth_exr"] = o / "depth_exr" / f"{key}.exr"
        if self.want_normals:
            files.update(normals=o / "normals" / f"{key}.npy", normals_png=o / "normals_from_pretrain" / f"{key}.png")
            if self.r.world_normals:
                files["normals_world"] = o / "normals_world" / f"{key}.npy"
        return files

    def _report(self, res: ItemResult) -> None:
        res.kind = KIND
        self.summary.add(res)
        self.reporter.result(res)

    def _guarded(self, g: Registered) -> None:
        """One image, which reports its own result; any failure but a usage error becomes its failed result."""
        t0 = time.perf_counter()
        item = Item(g.path, g.key)
        side = self.out / SIDECARS / f"{g.key}.json"
        redone = None
        try:
            if self.r.skip_existing:
                keep, redone = self._reusable(g)
                if keep:
                    self.alignments[g.key] = (read_record(side) or {}).get("alignment") or {}
                    self.done.append(g)
                    self._report(ItemResult(item, "skipped", {"json": str(side)}))
                    return
            outputs = self._one(g, side, t0)
            self.done.append(g)
            self._report(ItemResult(item, "done", outputs, None, time.perf_counter() - t0, 1, redone))
        except UsageError:
            raise
        except LotusError as e:
            self._report(ItemResult(item, "failed", error=str(e), seconds=time.perf_counter() - t0, redone=redone))
        except Exception as e:  # a library's own failure on this image
            error = f"{g.path}: {brief(e)}"
            self._report(ItemResult(item, "failed", error=error, seconds=time.perf_counter() - t0, redone=redone))

    def _reusable(self, g: Registered) -> tuple[bool, str | None]:
        """--skip-existing: (True, None) when the image's files stay; else (False, why it is redone)."""
        side = self.out / SIDECARS / f"{g.key}.json"
        model = self.model_record()["model"]
        return reusable(side, self.files(g.key).values(), kind=KIND, model=model, options=self.options(), settings={})

    def _map(self, g: Registered, rgb: np.ndarray) -> tuple[np.ndarray, str, dict]:
        """The image's affine-invariant map [H, W] at the image's size, its kind, and where it came from."""
        h, w = rgb.shape[:2]
        if self.r.depth is not None:
            path = find_map(self.r.depth, g.key)
            if path is None:
                raise InputError(
                    f"--depth {self.r.depth}: no map for {g.name} ({g.key} + one of {', '.join(MAP_SUFFIXES)})",
                    "give a folder of maps named by the images' stems",
                )
            values, info = sources.read_depth_map(path, self.r.depth_kind, "relative", "--depth")
            return resize_map(values, w, h), info["kind"], {"depth_input": str(path), "depth_input_info": info}
        t = time.perf_counter()
        pred = self._predicted("depth", rgb, g)
        extra = {"processing_size": [pred.processing_size[1], pred.processing_size[0]]}
        extra["model_seconds"] = round(time.perf_counter() - t, 4)
        return pred.map, self.depth_model.kind, extra

    def _normals(self, g: Registered, rgb: np.ndarray) -> np.ndarray | None:
        """The image's unit normals [H, W, 3] in the OpenCV camera frame, or None."""
        h, w = rgb.shape[:2]
        if self.r.normals_from is not None:
            path = find_map(self.r.normals_from, g.key)
            if path is None:
                raise InputError(
                    f"--normals-from {self.r.normals_from}: no normal map for {g.name}",
                    "give a folder of `lotus normal` maps named by the images' stems",
                )
            record, note = vouched(path)
            frame = (record or {}).get("normal_frame") or "lotus"
            n = formats.read_map(path, "normal", note)
            n = resize_map(n, w, h).astype(np.float32)
            n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-9)
            return convert_normals(n, "opencv", frame)
        if self.normal_model is None:
            return None
        return convert_normals(self._predicted("normal", rgb, g).map, "opencv")

    def _predicted(self, task: str, rgb: np.ndarray, g: Registered):
        """The ``task`` model's Prediction for the image; its own failure (too small, out of memory even in
        tiles) fails this image alone, named."""
        try:
            got = self.batch[task]([rgb], self.opts)[0]
        except UsageError:
            raise
        except LotusError as e:  # refused before the model ran (below the model's minimum size)
            got = e
        if isinstance(got, LotusError):
            raise type(got)(f"{g.path}: {got.message}", got.hint)
        return got

    def _one(self, g: Registered, side: Path, t0: float) -> dict:
        rgb = sources.read_image(g.path, self.r.max_pixels) if g.path.is_file() else None
        if rgb is None:
            raise InputError(
                f"{g.path}: listed in {self.sparse} but absent", "restore the image, or point --images at its folder"
            )
        h, w = rgb.shape[:2]
        g.camera = camera_for(g.camera, w, h, str(g.path))
        values, kind, sections = self._map(g, rgb)
        im = self.rec.images[g.image_id]
        ids = [p.point3D_id for p in im.points2D if p.has_point3D()]
        xyz = np.array([self.rec.points3D[i].xyz for i in ids], np.float64).reshape(-1, 3)
        X = xyz @ g.R.T + g.t
        uv = np.asarray(g.camera.img_from_cam(np.ascontiguousarray(X)), np.float64).reshape(-1, 2)
        at = sample_bilinear(values, uv - COLMAP_PIXEL_OFFSET)
        a = align_to_points(at, X[:, 2], kind, self.r.min_points)
        record = a.to_json()
        record["outlier_point_ids"] = [int(i) for i, ok, v in zip(ids, a.inliers, np.isfinite(at)) if v and not ok][
            :1000
        ]
        record["units"] = self._units()
        self.alignments[g.key] = record
        if not a.ok:
            write_json(side, self._sidecar(g, {}, record, sections, t0, error=f"refused: {a.refused}"))
            raise InputError(
                f"{g.name}: alignment refused: {a.refused}",
                "nothing written for it; its sidecar has the statistics (a wrong --depth-kind orders points backwards)",
            )
        depth = a.depth(values)
        normals = self._normals(g, rgb) if self.want_normals else None
        files = self.files(g.key)
        written = self._write_maps(files, depth, normals, g)
        write_json(side, self._sidecar(g, written, record, sections, t0))
        return {name: str(p) for name, p in files.items()} | {"json": str(side)}

    def _units(self) -> str:
        u = self.r.scene_units
        if u is None:
            return "the reconstruction's own unit (SfM fixes scale only up to it; --scene-units m when it is metric)"
        return f"{u} (--scene-units)"

    def _write_maps(self, files: dict[str, Path], depth: np.ndarray, normals: np.ndarray | None, g: Registered) -> dict:
        """Write the image's maps; the notes its sidecar keeps on each."""
        z = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
        write_npy(files["depth_npy"], z)
        mm = np.rint(z.astype(np.float64) * PNG_PER_UNIT)
        over = int((mm > 65535).sum())
        _write_png(files["depth_png"], np.where(mm <= 65535, mm, 0).astype(np.uint16))
        notes = {
            "depth_npy": {
                "file": files["depth_npy"].name,
                "dtype": "float32",
                "meaning": "z, reconstruction units; 0 = none",
            },
            "depth_png": {
                "file": files["depth_png"].name,
                "dtype": "uint16",
                "per_unit": PNG_PER_UNIT,
                "meaning": f"z * {PNG_PER_UNIT}; 0 = none or beyond {65535 / PNG_PER_UNIT:g} units",
                "beyond_range": over,
            },
        }
        if "depth_exr" in files:
            data, info = formats.get_format("exr").encode(z, KIND, formats.Style(), {"unit": self.r.scene_units})
            with atomic_open(files["depth_exr"]) as f:
                f.write(data)
            notes["depth_exr"] = {
                "file": files["depth_exr"].name,
                **info,
                "meaning": f"z in {self.r.scene_units}; 0 = none",
            }
        if normals is not None:
            ok = np.isfinite(normals).all(-1, keepdims=True)
            n = np.where(ok, normals, 0.0).astype(np.float32)
            write_npy(files["normals"], n)
            gl = convert_normals(n, "opengl", "opencv")
            _write_png(files["normals_png"], np.where(ok, np.clip((gl + 1) / 2 * 255, 0, 255), 0).astype(np.uint8))
            notes["normals"] = {"file": files["normals"].name, "frame": "opencv camera: x right, y down, z forward"}
            notes["normals_png"] = {
                "file": files["normals_png"].name,
                "frame": "opengl camera: x right, y up, z toward the viewer",
                "encoding": "rgb = (n + 1) / 2 * 255",
            }
            if "normals_world" in files:
                write_npy(files["normals_world"], np.where(ok, normals_to_world(n, g.R), 0.0).astype(np.float32))
                notes["normals_world"] = {"file": files["normals_world"].name, "frame": "the reconstruction's world"}
        return notes

    def _sidecar(self, g: Registered, outputs: dict, alignment: dict, sections: dict, t0: float, error=None) -> dict:
        cam = g.camera
        camera = {
            "model": cam.model_name,
            "width": cam.width,
            "height": cam.height,
            "params": list(map(float, cam.params)),
        }
        return sidecar(
            KIND,
            model=self.model_record(),
            options=self.options(),
            input=str(g.path),
            key=g.key,
            outputs=outputs,
            error=error,
            seconds=time.perf_counter() - t0,
            colmap={"image_id": g.image_id, "name": g.name, "camera": camera},
            alignment=alignment,
            **sections,
        )

    # -- the scene -------------------------------------------------------------------------------------

    def _fuse(self) -> dict | None:
        r = self.r
        ok = [g for g in self.done if (self.out / "mono_depth" / f"{g.key}_aligned.npy").is_file()]
        if len(ok) < r.min_views + 1:
            self.reporter.note(f"note: no fusion: {len(ok)} aligned views, --min-views {r.min_views} needs more")
            return None
        sizes = [np.load(self.files(g.key)["depth_npy"], mmap_mode="r").shape for g in ok]
        for g, (h, w) in zip(ok, sizes):  # a view kept by --skip-existing still has the model's camera
            g.camera = camera_for(g.camera, w, h, str(g.path))
        views = [colmap_view(g, s[1], s[0]) for g, s in zip(ok, sizes)]
        index = {g.image_id: i for i, g in enumerate(ok)}
        tracks = []
        for p in self.rec.points3D.values():
            tracks.append([index[e.image_id] for e in p.track.elements if e.image_id in index])
        neighbours = covisible_neighbours(tracks, len(ok), r.neighbours)
        centres = np.array([v.centre for v in views])
        for i, nb in enumerate(neighbours):  # too few shared points: the nearest cameras make up the number
            for j in np.argsort(np.linalg.norm(centres - centres[i], axis=-1)):
                if len(nb) >= r.neighbours:
                    break
                if j != i and j not in nb:
                    nb.append(int(j))
        depth = DepthCache(lambda i: np.load(self.files(ok[i].key)["depth_npy"], mmap_mode="r"), size=2 * r.neighbours)

        def extras(i):
            g = ok[i]
            rgb = sources.read_image(g.path, r.max_pixels)
            h, w = sizes[i]
            if rgb.shape[:2] != (h, w):
                rgb = resize_map(rgb, w, h).astype(np.uint8)
            nfile = self.out / "normals" / f"{g.key}.npy"
            n = normals_to_world(np.load(nfile), g.R) if nfile.is_file() else None
            return rgb, n

        bar = self.reporter.progress("fusing views", len(ok))
        comments = [
            "lotus colmap: fused depth of the registered views, world frame of the reconstruction",
            f"units: {self._units()}",
            f"kept where >= {r.min_views} other views agree within {r.tolerance:g} of their depth",
        ]
        sink = PlyStream(self.out / "fused.ply", comments)
        try:
            stats = fuse_views(
                views,
                depth,
                neighbours,
                sink,
                extras=extras,
                min_views=r.min_views,
                tolerance=r.tolerance,
                stride=r.fusion_stride,
                on_view=lambda i, one: bar.advance(),
            )
        except BaseException:
            sink.abort()
            raise
        finally:
            bar.close()
        sink.close()
        per_view = stats.pop("per_view")
        stats["per_view"] = {g.key: v for g, v in zip(ok, per_view)}
        stats.update(file="fused.ply", min_views=r.min_views, tolerance=r.tolerance, stride=r.fusion_stride)
        return stats

    def _write_scene(self, fusion: dict | None) -> None:
        from ..geometry.colmap import Alignment

        objs = {}
        for k, a in self.alignments.items():
            if a.get("refused") is None and a.get("scale"):
                objs[k] = Alignment(
                    a["kind"], a["points"], a["used"], a["scale"], a["shift"], relative_median=a["relative_median"]
                )
        record = sidecar(
            "scene",
            model=self.model_record(),
            options=self.options(),
            input=str(self.scene),
            key="scene",
            outputs={"ply": {"file": "fused.ply"}} if fusion else {},
            complete=self.summary.failed == 0 and not self.sharded,
            sparse=str(self.sparse),
            units=self._units(),
            images={"registered": len(self.registered), "this_run": len(self.todo), "failed": self.summary.failed},
            alignment=self.alignments,
            scale_consistency=consistency(objs),
            fusion=fusion,
        )
        write_json(self.out / SIDECARS / "scene.json", record)

    def _write_transforms(self) -> None:
        """nerfstudio's transforms.json in ``out``: a frame per aligned image with ``depth_file_path``. An
        existing one (ns-process-data's) keeps everything and gains the paths of the frames it lists."""
        path = self.out / "transforms.json"
        depth_of = {g.name: self.files(g.key)["depth_png"] for g in self.done}
        if path.is_file():
            try:
                meta = json.loads(path.read_text())
                frames = meta["frames"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise OutputError(f"{path}: unreadable ({e}), not updated", "remove it to have lotus write one") from e
            by_name = {Path(n).name: p for n, p in depth_of.items()}
            for f in frames:
                p = depth_of.get(str(f.get("file_path", "")).removeprefix("./").removeprefix("images/"))
                p = p or by_name.get(Path(str(f.get("file_path", ""))).name)
                if p is not None:
                    f["depth_file_path"] = os.path.relpath(p, self.out).replace(os.sep, "/")
        else:
            meta = {"applied_transform": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], "frames": []}
            for g in self.done:
                c2w = np.eye(4)
                c2w[:3, :3], c2w[:3, 3] = g.R.T, -g.R.T @ g.t
                c2w[:3, 1:3] *= -1  # OpenCV camera axes -> nerfstudio's OpenGL ones
                frame = {
                    "file_path": os.path.relpath(g.path, self.out).replace(os.sep, "/"),
                    "transform_matrix": c2w.tolist(),
                    "depth_file_path": os.path.relpath(depth_of[g.name], self.out).replace(os.sep, "/"),
                    "colmap_im_id": g.image_id,
                }
                frame.update(nerfstudio_camera(g.camera))
                meta["frames"].append(frame)
        meta["lotus_colmap"] = {"depth_unit": self._units(), "depth_png_per_unit": PNG_PER_UNIT}
        write_json(path, meta)


def nerfstudio_camera(camera) -> dict:
    """A COLMAP camera as nerfstudio's per-frame intrinsics (fl_x, fl_y, cx, cy, w, h, camera_model, k1 ...):
    COLMAP's own principal point (pixel edges at integers, as nerfstudio reads it)."""
    p = [float(v) for v in camera.params]
    m = camera.model_name
    out = {"w": int(camera.width), "h": int(camera.height)}
    if m in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        out.update(fl_x=p[0], fl_y=p[0], cx=p[1], cy=p[2], camera_model="OPENCV")
        out.update(k1=p[3] if len(p) > 3 else 0.0, k2=p[4] if len(p) > 4 else 0.0, p1=0.0, p2=0.0)
    elif m in ("PINHOLE", "OPENCV"):
        out.update(fl_x=p[0], fl_y=p[1], cx=p[2], cy=p[3], camera_model="OPENCV")
        if m == "OPENCV":
            out.update(k1=p[4], k2=p[5], p1=p[6], p2=p[7])
    elif m == "OPENCV_FISHEYE":
        out.update(fl_x=p[0], fl_y=p[1], cx=p[2], cy=p[3], camera_model="OPENCV_FISHEYE")
        out.update(k1=p[4], k2=p[5], k3=p[6], k4=p[7])
    else:
        out.update(fl_x=camera.focal_length_x, fl_y=camera.focal_length_y, cx=camera.principal_point_x)
        out.update(cy=camera.principal_point_y, camera_model="OPENCV", note=f"{m}: distortion not carried over")
    return out


def _write_png(path: Path, a: np.ndarray) -> None:
    """A uint8 RGB or uint16 grey PNG, atomically (OpenCV: 16-bit PNGs; BGR order)."""
    import cv2

    arr = a[:, :, ::-1] if a.ndim == 3 else a
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:
        raise OutputError(f"{path}: PNG encoding failed", "check the free disk space")
    with atomic_open(path) as f:
        f.write(buf.tobytes())
