"""Triangle meshes of the pixel grid: the cloud's points joined where the surface is continuous.

Construction is pure numpy over a ``pointcloud.Cloud``: a vertex is a point of the cloud, two triangles
join each 2 x 2 block of grid points (every ``stride``-th row and column) when every pixel the block
covers at full resolution passed the cloud's cleaning. So a triangle never spans a hole or a depth
discontinuity that the flying-pixel test (``geometry.edge_mask``) found, and the mesh and the cloud agree.
Points in no triangle are left out (mesh readers drop loose vertices anyway); the record counts them.

Triangles wind counter-clockwise as seen from the camera, so their normals face it; a rotation (``--up y``)
keeps the winding. Texture coordinates (u, v) are in OpenGL's convention, origin at the image's bottom
left: u = (column + 0.5) / W, v = 1 - (row + 0.5) / H for the map's W x H pixel centres, valid for any
image of the same aspect ratio (the input photo at its own size).

Files (``encode``) are written by Open3D: PLY with per-vertex colours and normals; GLB and OBJ with the
image as texture. glTF is y-up by definition, so a GLB is always written in the OpenGL frame (x right,
y up, z toward the viewer) whatever the cloud's frame; PLY and OBJ keep the cloud's frame.

An OBJ names its material file on an ``mtllib`` line and the material its texture on a ``map_Kd`` line,
where a line break ends the name and whitespace separates names: the OBJ's companions (``companions``) are
therefore named after the item with every whitespace or control character replaced by "_" and, when that
changed the name, a short hash of it appended (so "a b" and "a_b" do not share them).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OutputError, UsageError
from ..io.atomic import write_bytes
from .camera import TO_OPENGL
from .ply import open3d, ply_comments

FORMATS = {"ply": ".mesh.ply", "glb": ".glb", "obj": ".obj"}  # format -> suffix of the main file
GLB_FRAME = "glTF's frame: x right, y up, z toward the viewer (the camera looks down -z), metres"


@dataclass
class Mesh:
    vertices: np.ndarray  # [V, 3] float32, metres, the cloud's frame (``up``)
    faces: np.ndarray  # [F, 3] int32 vertex indices, counter-clockwise seen from the camera
    normals: np.ndarray | None  # [V, 3] float32 unit vertex normals (the cloud's), or None
    colors: np.ndarray  # [V, 3] uint8
    uvs: np.ndarray  # [V, 2] float32, OpenGL texture convention (module doc)
    points: np.ndarray  # [V] int64: index of each vertex in the cloud's points
    up: str  # "opencv" or "y", as pointcloud.FRAMES
    record: dict


def parse_formats(spec: str) -> tuple[str, ...]:
    """'glb,ply' -> ('glb', 'ply'): the mesh formats to write, named in any case (GLB = glb), as --format's."""
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise UsageError(
            f"--mesh-format {spec!r}: expected a comma list of ply, glb, obj", "e.g. --mesh-format glb,ply"
        )
    return tuple(dict.fromkeys(names))


def grid_blocks(kept: np.ndarray, stride: int = 1) -> np.ndarray:
    """kept [H, W] bool -> ok [(H - 1) // s, (W - 1) // s] bool: the block whose corners are grid pixels
    (s i, s j) and (s (i + 1), s (j + 1)) covers only kept pixels (all (s + 1)^2 of them), s = ``stride``."""
    s = stride
    h, w = kept.shape
    bad = np.zeros((h + 1, w + 1), np.int64)  # summed-area table of the pixels that were not kept
    bad[1:, 1:] = np.cumsum(np.cumsum(~kept, 0), 1)
    r0, c0 = np.arange(0, h - s, s), np.arange(0, w - s, s)  # top-left corners of whole blocks
    r1, c1 = r0 + s + 1, c0 + s + 1
    count = bad[r1][:, c1] - bad[r0][:, c1] - bad[r1][:, c0] + bad[r0][:, c0]
    return count == 0


def from_cloud(cloud, stride: int = 1) -> Mesh:
    """The mesh over a ``pointcloud.Cloud`` built with ``stride`` and no --max-points (its points must be the
    kept pixels on the stride grid). Vertex normals are the cloud's (predicted or from the depth)."""
    h, w = cloud.kept.shape
    s = stride
    index = np.full(h * w, -1, np.int64)  # pixel -> point
    index[cloud.pixels] = np.arange(len(cloud.pixels))
    index = index.reshape(h, w)
    ok = grid_blocks(cloud.kept, s)  # [bh, bw]
    bi, bj = np.nonzero(ok)
    r, c = bi * s, bj * s
    a, b = index[r, c], index[r + s, c]  # top-left, bottom-left
    cc, d = index[r, c + s], index[r + s, c + s]  # top-right, bottom-right
    if len(a) and (min(a.min(), b.min(), cc.min(), d.min()) < 0):
        raise ValueError("the cloud lacks points of its kept grid: build it with max_points=0 and the same stride")
    # (a, b, c) = (p, p + down, p + right): (down) x (right) points toward the camera in the OpenCV frame
    tri = np.concatenate([np.stack([a, b, cc], -1), np.stack([b, d, cc], -1)])  # [2 * blocks, 3]
    used = np.unique(tri)  # cloud point indices, ascending = row-major pixel order
    remap = np.full(len(cloud.points), -1, np.int64)
    remap[used] = np.arange(len(used))
    pix = cloud.pixels[used]
    rows, cols = np.divmod(pix, w)
    uvs = np.stack([(cols + 0.5) / w, 1 - (rows + 0.5) / h], -1).astype(np.float32)
    normals = cloud.normals[used] if cloud.normals is not None else None
    record = {
        "vertices": len(used),
        "triangles": len(tri),
        "blocks": int(ok.size),
        "points_in_no_triangle": len(cloud.points) - len(used),
        "stride": s,
        "rule": "two triangles per 2x2 block of grid points whose pixels all passed the flying-pixel test",
    }
    return Mesh(
        cloud.points[used], remap[tri].astype(np.int32), normals, cloud.colors[used], uvs, used, cloud.up, record
    )


def triangle_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit normals [F, 3] of the triangles (right-handed: counter-clockwise winding faces the normal)."""
    p = vertices[faces].astype(np.float64)  # [F, 3, 3]
    n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-30)


# ------------------------------------------------------------------------------------------- files

_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")  # what ends or splits a name on an OBJ's mtllib / map_Kd line


def _companion_stem(name: str) -> str:
    """The stem of an OBJ's material and texture files for an item named ``name`` (module doc)."""
    safe = _UNSAFE.sub("_", name)
    return safe if safe == name else f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def companions(fmt: str, name: str) -> list[str]:
    """The files a format writes for ``name`` besides its main file (``name + FORMATS[fmt]``): an OBJ's
    material (.mtl) and texture (_albedo.png); none for PLY and GLB."""
    if fmt != "obj":
        return []
    stem = _companion_stem(name)
    return [f"{stem}.mtl", f"{stem}_albedo.png"]


def encode(
    mesh: Mesh, fmt: str, name: str, texture: np.ndarray | None = None, comments: list[str] = ()
) -> dict[str, bytes]:
    """The file(s) of one format: {file name: bytes}, the main file last (write it last: its presence marks
    a finished mesh). ``name`` is the files' stem (x -> x.mesh.ply, x.glb, or x.obj + x.mtl + x_albedo.png);
    ``texture`` uint8 [h, w, 3], an image of the map's aspect ratio (needed for GLB and OBJ); ``comments``
    go into the PLY header and the OBJ's first lines. Binary PLY (positions and normals as doubles: Open3D's
    mesh writer), GLB with the texture embedded as PNG."""
    o3d = open3d("meshes")
    v, n = mesh.vertices, mesh.normals
    if fmt == "glb" and mesh.up == "opencv":
        v, n = v * TO_OPENGL, (n * TO_OPENGL if n is not None else None)
    m = o3d.t.geometry.TriangleMesh()
    m.vertex.positions = o3d.core.Tensor(np.ascontiguousarray(v, np.float32))
    m.triangle.indices = o3d.core.Tensor(np.ascontiguousarray(mesh.faces, np.int32))
    if n is not None:
        m.vertex.normals = o3d.core.Tensor(np.ascontiguousarray(n, np.float32))
    if fmt == "ply":
        m.vertex.colors = o3d.core.Tensor(np.ascontiguousarray(mesh.colors, np.float32) / 255)
    else:
        if texture is None:
            raise ValueError(f"a {fmt} mesh needs the texture image")
        m.vertex.texture_uvs = o3d.core.Tensor(np.ascontiguousarray(mesh.uvs, np.float32))
        m.material.set_default_properties()
        m.material.material_name = "image"
        m.material.scalar_properties["metallic"] = 0.0  # an image is not a metal: glTF's default would be 1
        m.material.scalar_properties["roughness"] = 1.0
        m.material.texture_maps["albedo"] = o3d.t.geometry.Image(np.ascontiguousarray(texture, np.uint8))
    main = name + FORMATS[fmt]
    # written under the companions' safe stem: the OBJ's mtllib and the material's map_Kd lines name them
    written = _companion_stem(name) + FORMATS[fmt]
    with tempfile.TemporaryDirectory(prefix="lotus-mesh-") as tmp:
        path = os.path.join(tmp, written)
        o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)  # its notes would go to stdout
        if not o3d.t.io.write_triangle_mesh(path, m):
            raise OutputError(f"Open3D could not write {main}", "check the free disk space")
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.name != written}
        data = Path(path).read_bytes()
    if fmt == "ply":
        data = ply_comments(data, comments)
    elif fmt == "obj":
        data = "".join(f"# {' '.join(c.split())}\n" for c in comments).encode("ascii", "replace") + data
    files[main] = data
    return files


def write(
    mesh: Mesh, formats: tuple[str, ...], folder: Path, name: str, texture: np.ndarray, comments: list[str] = ()
) -> dict[str, str]:
    """Each format's files written atomically into ``folder`` (``encode``); returns {format: main file name}
    (the others: ``companions(format, name)``). A mesh without triangles writes nothing (Open3D's glTF and
    OBJ writers crash on one): {}."""
    written = {}
    if not len(mesh.faces):
        return written
    for fmt in formats:
        for file, data in encode(mesh, fmt, name, texture, comments).items():
            write_bytes(folder / file, data)
        written[fmt] = name + FORMATS[fmt]
    return written
