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

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, LotusError, UsageError, brief
from ..geometry.camera import convert_normals
from ..geometry.colmap import COLMAP_PIXEL_OFFSET, MIN_POINTS, align_to_points, sample_bilinear
from ..geometry.colmap import scale_consistency as consistency
from ..io import formats, sources
from ..io.atomic import check_out_dir, write_json
from ..io.sidecar import read_record, reusable, sidecar, vouched
from ..io.sources import Item
from ..model import registry
from ..model.predictor import PredictOptions
from ..model.tiling import TileOptions
from .colmap_files import KIND, write_maps, write_transforms
from .colmap_fusion import fuse_scene
from .colmap_workspace import (
    Registered,
    camera_for,
    find_model,
    given_map,
    image_key,
    pose_of,
    read_reconstruction,
    resize_map,
)
from .events import Reporter
from .loading import load_predictor
from .predict import make_predict, tile_progress
from .results import ItemResult, Summary

SIDECARS = "lotus-colmap"


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
            fusion = fuse_scene(
                self.rec,
                [(g, self.files(g.key)["depth_npy"]) for g in self.done],
                self.out,
                r,
                self.reporter,
                self._units(),
            )
        if r.transforms and self.done and not self.sharded:
            write_transforms(self.out, [(g, self.files(g.key)["depth_png"]) for g in self.done], self._units())
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
            path = given_map(self.r.depth, g.key, "--depth", g.name, "give a folder of maps named by the images' stems")
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
            hint = "give a folder of `lotus normal` maps named by the images' stems"
            path = given_map(self.r.normals_from, g.key, "--normals-from", g.name, hint)
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
        written = write_maps(files, depth, normals, g.R, self.r.scene_units)
        write_json(side, self._sidecar(g, written, record, sections, t0))
        return {name: str(p) for name, p in files.items()} | {"json": str(side)}

    def _units(self) -> str:
        u = self.r.scene_units
        if u is None:
            return "the reconstruction's own unit (SfM fixes scale only up to it; --scene-units m when it is metric)"
        return f"{u} (--scene-units)"

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
