"""One point cloud's files: the PLY, the mesh files and preview when asked, then the sidecar (last: it marks
the cloud done). What a cloud is made with (models, options) travels in ``CloudSpec``; the geometry itself is
``geometry.cloud.make_cloud``'s, the mesh ``geometry.mesh``'s and the picture ``geometry.preview``'s."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..geometry import mesh, preview
from ..geometry.cloud import CameraOptions, CloudOptions, ScaleOptions, header_comments, make_cloud
from ..geometry.panorama import make_sphere_cloud, sphere_header_comments, sphere_mesh
from ..geometry.ply import write_ply
from ..io.atomic import write_bytes, write_json
from ..io.outputs import encode_png, remove_unlisted
from ..io.sidecar import listed_files as sidecar_files
from ..io.sidecar import read_record, reusable, sidecar
from .events import Reporter

KIND = "pointcloud"  # the sidecars' kind


@dataclass(frozen=True)
class CloudSpec:
    """How every cloud of a run is made and where it goes. ``model``: the sidecars' record of the models
    ({"model", "normal_model", "device", "dtype"}); ``normals``: "predict", "depth" or "none" as resolved;
    ``align``: the metric map of --align-to, read once. ``projection``: "equirect" for a panorama's map (on the
    sphere: geometry/panorama.py), and ``projection_rule`` what decided it, for the sidecar."""

    out: Path
    camera: CameraOptions
    scale: ScaleOptions
    cloud: CloudOptions
    normals: str
    mesh_formats: tuple[str, ...]
    preview: bool
    model: dict
    align: np.ndarray | None = None
    projection: str = "perspective"
    projection_rule: str = ""

    def files(self, key: str) -> list[Path]:
        """The files one cloud is made of, besides its sidecar."""
        base = self.out / key
        names = [".ply", *(mesh.FORMATS[f] for f in self.mesh_formats), *([".preview.png"] if self.preview else [])]
        return [base.with_name(base.name + n) for n in names]

    def reuse(self, key: str, options: dict, clip: bool = False) -> tuple[bool, str | None]:
        """(keep, why redone) of ``key``'s existing outputs under --skip-existing: kept when its sidecar says its
        run completed with the same models and ``options`` and every file it lists (a clip: every frame's
        sidecar and files) exists."""
        side = self.out / f"{key}.json"
        files = listed_paths(side, self.out)
        if not files:
            files = sorted((self.out / key).glob("*.ply")) if clip else self.files(key)
        return reusable(side, files, kind=KIND, model=self.model["model"], options=options, settings={})


def write_cloud(
    spec: CloudSpec,
    key: str,
    subject: str,
    rgb: np.ndarray,
    values: np.ndarray,
    kind: str,
    options: dict,
    sections: dict,
    reporter: Reporter,
    t0: float,
    *,
    per_metre: float | None = None,
    normals: np.ndarray | None = None,
    exif: float | None = None,
    input_size: tuple[int, int] | None = None,
    reuse: dict | None = None,
    units_assumed: str | None = None,
    texture: np.ndarray | None = None,
) -> tuple[dict, dict]:
    """Back-project ``values`` (a map of ``kind`` [H, W]) coloured by ``rgb`` and write ``key``'s files;
    returns ({name: path} of the files written, the frame record a clip's sidecar lists). ``reuse``: an
    earlier frame's depth fit (a clip's later frames)."""
    sphere = spec.projection == "equirect"
    build = functools.partial(make_sphere_cloud, projection_rule=spec.projection_rule) if sphere else make_cloud
    try:
        cloud = build(
            rgb,
            values,
            kind,
            spec.camera,
            spec.scale,
            spec.cloud,
            per_metre=per_metre,
            normals=spec.normals,
            normals_lotus=normals,
            exif_f35=exif,
            input_size=input_size,
            align=spec.align,
            reuse=reuse,
            units_assumed=units_assumed,
        )
    except ValueError as e:
        raise InputError(f"{subject}: {e}", "check the depth map") from e
    base = spec.out / key
    ply, side = base.with_name(base.name + ".ply"), base.with_name(base.name + ".json")
    earlier = sidecar_files(read_record(side))
    side.unlink(missing_ok=True)  # an earlier run's sidecar must not vouch for files this run replaces

    def record(outputs: dict, **more) -> dict:
        return sidecar(
            KIND,
            model=spec.model,
            options=options,
            input=subject,
            key=key,
            outputs=outputs,
            seconds=time.perf_counter() - t0,
            **sections,
            **cloud.record,
            **more,
        )

    comments = (sphere_header_comments if sphere else header_comments)(record({}))
    write_ply(ply, cloud.points, cloud.colors, cloud.normals, comments)
    outputs = {"ply": {"file": ply.name}}
    more = _mesh_and_preview(
        spec, key, subject, cloud, outputs, rgb if texture is None else texture, comments, reporter
    )
    final = record(outputs, **more)
    remove_unlisted(side.parent, earlier, sidecar_files(final))  # a rerun without --mesh leaves no old mesh
    write_json(side, final)
    if cloud.record["depth"].get("warning"):
        reporter.warning(f"{subject}: {cloud.record['depth']['warning']}")
    paths = {name: str(ply.parent / o["file"]) for name, o in outputs.items()}
    frame = {"key": key, "file": ply.name, "points": cloud.record["cloud"]["points"], "depth": cloud.record["depth"]}
    return {**paths, "json": str(side)}, frame


def _mesh_and_preview(spec: CloudSpec, key, subject, cloud, outputs, texture, comments, reporter) -> dict:
    """The mesh files and the preview asked for, added to ``outputs`` ({name: {"file": name}}: glb, obj,
    mesh_ply, preview); returns their sidecar sections ("mesh", "preview")."""
    sections, shown = {}, cloud
    base = spec.out / key
    if spec.mesh_formats:
        shown = (sphere_mesh if spec.projection == "equirect" else mesh.from_cloud)(cloud, spec.cloud.stride)
        files = mesh.write(shown, spec.mesh_formats, base.parent, base.name, texture, comments)
        sections["mesh"] = {
            **shown.record,
            "files": files,
            "frame": cloud.record["cloud"]["frame"],
            "glb_frame": mesh.GLB_FRAME if "glb" in files else None,
        }
        for f, name in files.items():
            note = {
                "file": name,
                **({"companions": mesh.companions(f, base.name)} if mesh.companions(f, base.name) else {}),
            }
            outputs["mesh_ply" if f == "ply" else f] = note
        if not files:
            reporter.warning(
                f"{subject}: no 2x2 block of kept pixels, so no mesh (raise --edge-threshold, or lower --stride)"
            )
    picture = preview.render_cloud(shown, cloud.K, spec.cloud.stride) if spec.preview else None
    if picture is not None:
        png = base.with_name(base.name + ".preview.png")
        write_bytes(png, encode_png(picture))
        sections["preview"] = {"file": png.name, **preview.describe()}
        outputs["preview"] = {"file": png.name}
    elif spec.preview:
        reporter.warning(f"{subject}: no point to show, so no preview")
    return sections


def listed_paths(side: Path, out: Path) -> list[Path]:
    """The files an earlier run's sidecar ``side`` lists as its outputs (a clip's: each frame's sidecar and the
    files that lists); [] when it lists none or cannot be read (``reusable`` says why then)."""
    record = read_record(side)
    files = [side.parent / name for name in sidecar_files(record)]
    for frame in (record or {}).get("frames") or []:
        if isinstance(frame, dict) and isinstance(frame.get("key"), str):
            frame_side = out / f"{frame['key']}.json"
            files += [frame_side, *listed_paths(frame_side, out)]
    return files
