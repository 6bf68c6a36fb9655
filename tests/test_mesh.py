"""Meshes of the pixel grid: analytic scenes (a plane, a box before a wall), files read back by Open3D and
trimesh, the CLI, and the ground truth of real RGB-D frames (skipped when ../shared/data is absent)."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.geometry import camera as g
from lotus_cli.geometry import mesh as M
from lotus_cli.geometry.cloud import CameraOptions, CloudOptions, ScaleOptions, make_cloud

from .conftest import make_image
from .test_geometry import plane_depth
from .test_pointcloud import RGBD, largest_plane, load_rgbd

o3d = pytest.importorskip("open3d")


def lotus(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def cloud_of(z, rgb=None, fov=60.0, **opts):
    h, w = z.shape
    rgb = make_image(h, w) if rgb is None else rgb
    return make_cloud(
        rgb, z.astype(np.float32), "depth", CameraOptions(fov=fov), ScaleOptions(), CloudOptions(**opts), per_metre=1.0
    )


def box_before_wall(h=48, w=64):
    """A wall at 3 m and a box face at 1.5 m covering rows 12:36, columns 20:44: depth [h, w] and box mask."""
    z = np.full((h, w), 3.0)
    box = np.zeros((h, w), bool)
    box[12:36, 20:44] = True
    z[box] = 1.5
    return z, box


def bridging(mesh, jump=0.5):
    """Triangles with an edge whose ends differ in depth by more than ``jump`` metres."""
    z = mesh.vertices[mesh.faces][..., 2]  # [F, 3]
    return int((np.abs(z - np.roll(z, -1, axis=1)) > jump).any(-1).sum())


def sorted_rows(a):
    return a[np.lexsort(a.T[::-1])]


def test_fronto_parallel_plane_is_flat_and_faces_the_camera():
    z = np.full((30, 40), 2.0)
    z[10:13, 15:19] = np.nan  # a hole: the 3 x 4 pixels and the blocks touching them go
    for up, facing in (("opencv", [0, 0, -1]), ("y", [0, 0, 1])):  # toward the camera in either frame
        mesh = M.from_cloud(cloud_of(z, up=up))
        assert len(mesh.faces) == 2 * (29 * 39 - 4 * 5)
        np.testing.assert_allclose(mesh.vertices[:, 2], 2.0 if up == "opencv" else -2.0, atol=1e-6)
        np.testing.assert_allclose(
            M.triangle_normals(mesh.vertices, mesh.faces), np.broadcast_to(facing, (len(mesh.faces), 3)), atol=1e-6
        )
        np.testing.assert_allclose(mesh.normals, np.broadcast_to(facing, mesh.normals.shape), atol=1e-5)


def test_no_triangle_bridges_a_box_and_the_wall_behind_it():
    z, _ = box_before_wall()
    mesh = M.from_cloud(cloud_of(z))
    assert bridging(mesh) == 0
    assert {round(float(v), 3) for v in mesh.vertices[:, 2]} == {1.5, 3.0}  # both surfaces are there
    box_faces = (mesh.vertices[mesh.faces][..., 2] < 2).all(-1).sum()
    assert box_faces == 2 * (23 - 2) * (23 - 2)  # the box's 24 x 24 pixels less its flying border ring
    kept_all = M.from_cloud(cloud_of(z, edge_threshold=0))  # "keep all": the user asked for bridges
    # two per block straddling the outline (25 x 25 blocks touch the box, 23 x 23 lie inside), less one
    # at the two corners whose box pixel lies on the other side of the block's diagonal
    assert bridging(kept_all) == 2 * (25 * 25 - 23 * 23) - 2


def test_vertices_are_the_clouds_points_and_stride_decimates():
    K = g.intrinsics_from_fov(40, 30, 70.0)
    normal = np.array([0.2, -0.6, -0.77]) / np.linalg.norm([0.2, -0.6, -0.77])
    z = plane_depth(K, normal, -2.0)
    cloud = cloud_of(z, fov=70.0)
    mesh = M.from_cloud(cloud)
    np.testing.assert_array_equal(mesh.points, np.arange(len(cloud.points)))  # every point, same order
    np.testing.assert_array_equal(mesh.vertices, cloud.points)
    np.testing.assert_array_equal(mesh.colors, cloud.colors)
    np.testing.assert_allclose(mesh.vertices @ normal, -2.0, atol=1e-5)
    np.testing.assert_allclose(
        M.triangle_normals(mesh.vertices, mesh.faces), np.broadcast_to(normal, (len(mesh.faces), 3)), atol=1e-5
    )
    z[7, 9] = np.nan  # between grid points of stride 2: the blocks covering it go, its grid neighbours stay
    coarse = cloud_of(z, fov=70.0, stride=2, edge_threshold=0)  # (the plane is steep enough to lose pixels)
    mesh2 = M.from_cloud(coarse, 2)
    np.testing.assert_array_equal(mesh2.vertices, coarse.points[mesh2.points])
    assert len(coarse.points) == 15 * 20 and len(mesh2.faces) == 2 * (14 * 19 - 1)
    with pytest.raises(ValueError, match="same stride"):
        M.from_cloud(coarse, 1)


def test_uvs_put_each_vertex_on_its_pixel():
    z = np.full((6, 8), 2.0)
    mesh = M.from_cloud(cloud_of(z))
    rows, cols = np.divmod(np.arange(48), 8)
    np.testing.assert_allclose(mesh.uvs[:, 0] * 8 - 0.5, cols, atol=1e-5)
    np.testing.assert_allclose((1 - mesh.uvs[:, 1]) * 6 - 0.5, rows, atol=1e-5)  # origin bottom left


def test_files_load_back_in_open3d_with_the_texture(tmp_path):
    z, _ = box_before_wall(24, 32)
    rgb = make_image(24, 32, 3)
    mesh = M.from_cloud(cloud_of(z, rgb))
    files = M.write(mesh, ("ply", "glb", "obj"), tmp_path, "x", rgb, ["units metres", "frame test"])
    assert files == {"ply": "x.mesh.ply", "glb": "x.glb", "obj": "x.obj"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.glb", "x.mesh.ply", "x.mtl", "x.obj", "x_albedo.png"]
    ply = o3d.t.io.read_triangle_mesh(str(tmp_path / "x.mesh.ply"))
    assert len(ply.vertex.positions) == len(mesh.vertices) and len(ply.triangle.indices) == len(mesh.faces)
    np.testing.assert_allclose(ply.vertex.positions.numpy(), mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(ply.triangle.indices.numpy(), mesh.faces)
    np.testing.assert_array_equal(np.round(ply.vertex.colors.numpy() * 255), mesh.colors)  # uchar in the file
    assert b"comment units metres\ncomment frame test\n" in (tmp_path / "x.mesh.ply").read_bytes()[:400]
    for name in ("x.glb", "x.obj"):
        back = o3d.t.io.read_triangle_mesh(str(tmp_path / name))
        assert len(back.vertex.positions) == len(mesh.vertices) and len(back.triangle.indices) == len(mesh.faces)
        albedo = back.material.texture_maps["albedo"].as_tensor().numpy()
        np.testing.assert_array_equal(albedo[..., :3], rgb)
    glb = o3d.t.io.read_triangle_mesh(str(tmp_path / "x.glb")).vertex.positions.numpy()  # Open3D's reader reorders
    np.testing.assert_allclose(sorted_rows(glb), sorted_rows(mesh.vertices * M.TO_OPENGL), atol=1e-6)  # glTF: y up
    assert (tmp_path / "x.obj").read_text().startswith("# units metres\n# frame test\n")


def test_trimesh_reads_the_glb_and_its_uvs_sample_the_right_pixels(tmp_path):
    trimesh = pytest.importorskip("trimesh", reason="trimesh (the test extra) is not installed")
    z = np.full((12, 16), 2.0)
    rgb = make_image(12, 16, 7)
    mesh = M.from_cloud(cloud_of(z, rgb))
    M.write(mesh, ("glb",), tmp_path, "x", rgb)
    scene = trimesh.load(tmp_path / "x.glb", process=False)
    tm = next(iter(scene.geometry.values()))
    assert len(tm.vertices) == len(mesh.vertices) and len(tm.faces) == len(mesh.faces)
    sampled = tm.visual.to_color().vertex_colors[:, :3]  # the texture at each vertex's UV
    order = np.lexsort((tm.vertices[:, 0], -tm.vertices[:, 1]))  # y up in glTF: top row first, left to right
    np.testing.assert_array_equal(sampled[order], rgb.reshape(-1, 3))


def test_cli_writes_meshes_beside_the_cloud(tmp_path):
    z, _ = box_before_wall(30, 40)
    np.save(tmp_path / "m.npy", z.astype(np.float32))
    Image.fromarray(make_image(30, 40)).save(tmp_path / "m.png")
    r = lotus(
        "pointcloud",
        tmp_path / "m.png",
        "--depth",
        tmp_path / "m.npy",
        "--fov",
        60,
        "--out",
        tmp_path / "o",
        "--normals",
        "depth",
        "--mesh-format",
        "glb,ply",
        "--json",
    )
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "o" / "m.json").read_text())
    assert side["mesh"]["files"] == {"glb": "m.glb", "ply": "m.mesh.ply"}
    assert side["mesh"]["glb_frame"] == M.GLB_FRAME and side["mesh"]["frame"] == side["cloud"]["frame"]
    pts = o3d.t.io.read_point_cloud(str(tmp_path / "o" / "m.ply")).point.positions.numpy()
    back = o3d.t.io.read_triangle_mesh(str(tmp_path / "o" / "m.mesh.ply"))
    assert len(back.triangle.indices) == side["mesh"]["triangles"] > 0
    used = pts[np.isin(np.arange(len(pts)), np.unique(back.triangle.indices.numpy()), invert=False)]
    np.testing.assert_allclose(back.vertex.positions.numpy(), used, atol=1e-6)  # the cloud's points, in order
    assert len(pts) - len(used) == side["mesh"]["points_in_no_triangle"]
    assert json.loads(r.stdout.splitlines()[-1])["outputs"]["glb"].endswith("m.glb")
    r = lotus(
        "pointcloud",
        tmp_path / "m.png",
        "--depth",
        tmp_path / "m.npy",
        "--out",
        tmp_path / "o",
        "--mesh",
        "--max-points",
        100,
    )
    assert r.exit_code == 2 and "use --stride" not in r.output and "decimate with --stride" in r.output
    r = lotus(
        "pointcloud", tmp_path / "m.png", "--depth", tmp_path / "m.npy", "--out", tmp_path / "o", "--mesh-format", "stl"
    )
    assert r.exit_code == 2 and "--mesh-format 'stl'" in r.output


def test_cli_video_writes_one_mesh_per_frame(tmp_path, depth_d):
    from .test_video import make_clip

    clip = make_clip(tmp_path / "clip.mp4", 4, 10.0, size=(32, 24))
    r = lotus(
        "pointcloud",
        clip,
        "--model",
        depth_d,
        "--normals",
        "depth",
        "--processing-res",
        32,
        "--fps",
        5,
        "--out",
        tmp_path / "o",
        "--stride",
        2,
        "--mesh",
        "--preview",
        "--edge-threshold",
        0,
    )
    assert r.exit_code == 0, r.output
    frames = json.loads((tmp_path / "o" / "clip.json").read_text())["frames"]
    glbs = sorted((tmp_path / "o" / "clip").glob("*.glb"))
    previews = sorted((tmp_path / "o" / "clip").glob("*.preview.png"))
    assert len(frames) == len(glbs) == len(previews) == 2
    for glb in glbs:
        side = json.loads(glb.with_suffix(".json").read_text())
        back = o3d.t.io.read_triangle_mesh(str(glb))
        assert len(back.triangle.indices) == side["mesh"]["triangles"] and side["mesh"]["stride"] == 2


# ------------------------------------------------------------------------------------------ real RGB-D


def kinect_sigma(z):
    """Kinect v1 axial depth noise in metres at depth z (Nguyen, Izadi, Lovell 2012, 10-60 degree surfaces)."""
    return 0.0012 + 0.0019 * (z - 0.4) ** 2


@pytest.mark.skipif(not RGBD.is_dir(), reason="../shared/data/rgbd is absent")
@pytest.mark.parametrize("name", ["00000", "00050", "00100", "tum"])
def test_real_ground_truth_mesh_is_flat_and_unstretched(name):
    """The mesh of measured depth: its largest plane (Open3D RANSAC) is flat within the sensor's noise, and
    the discontinuity test removes the stretched triangles that bridge depth edges: what stays is bounded by
    the threshold (numbers in docs/pointclouds.md, from benchmarks/bench_pointcloud.py)."""
    z, K = load_rgbd(name)
    z = np.where(z > 0, z, np.nan)
    rgb = make_image(*z.shape)
    kw = {"per_metre": 1.0, "normals": "depth"}
    cams = CameraOptions(intrinsics=(K.fx, K.fy, K.cx, K.cy))
    mesh = M.from_cloud(make_cloud(rgb, z, "depth", cams, ScaleOptions(), CloudOptions(), **kw))
    raw = M.from_cloud(make_cloud(rgb, z, "depth", cams, ScaleOptions(), CloudOptions(edge_threshold=0), **kw))
    some = mesh.vertices[::4]  # RANSAC on a quarter of the vertices: the same plane, a quarter of the time
    inliers = largest_plane(some, threshold=0.03)[1]
    assert len(inliers) > 0.15 * len(some)
    _, rms, _ = g.plane_fit(some[inliers])
    noise = float(np.sqrt(np.mean(kinect_sigma(some[inliers, 2]) ** 2)))
    assert rms < 2 * noise + 0.002, (rms, noise)  # within the sensor's noise and its 1-2 mm quantisation
    t = CloudOptions().edge_threshold
    fov = np.hypot(1, np.hypot(max(K.cx, K.width - K.cx) / K.fx, max(K.cy, K.height - K.cy) / K.fy))
    bound = (2 * t + t * t) * max(K.fx, K.fy) * fov + 2  # two steps of at most t z each, seen from a corner
    assert stretch(raw, K).max() > 2 * bound and (stretch(raw, K) > bound).sum() > 1000  # bridges without the test
    assert stretch(mesh, K).max() <= bound


def stretch(mesh, K):
    """Each triangle's longest edge in pixel footprints (z / f) at its nearest vertex: about 1.4 for a surface
    facing the camera, large for grazing surfaces and for triangles that bridge a depth edge."""
    z = mesh.vertices[mesh.faces][..., 2].min(-1)
    return g.edge_lengths(mesh.vertices, mesh.faces).max(-1) / (z / min(K.fx, K.fy))


def test_cli_skip_existing_counts_the_mesh_files(tmp_path):
    np.save(tmp_path / "m.npy", np.full((12, 16), 2.0, np.float32))
    base = ["pointcloud", "--depth", tmp_path / "m.npy", "--out", tmp_path / "o", "--skip-existing"]
    assert lotus(*base, "--mesh").exit_code == 0
    r = lotus(*base, "--mesh")
    assert r.exit_code == 0 and "0 done" in r.output  # everything there: skipped
    r = lotus(*base, "--mesh-format", "glb,obj")
    assert r.exit_code == 0 and "1 done" in r.output and (tmp_path / "o" / "m.obj").is_file()  # the OBJ was missing


def test_a_rerun_without_the_mesh_removes_it_and_an_empty_mesh_gets_no_preview(tmp_path):
    """The sidecar lists exactly the files beside it: a rerun without --mesh removes the old mesh files (the OBJ's
    material and texture too); a map with no 2x2 block of kept pixels writes no mesh and no preview picture."""
    K = g.Intrinsics(40.0, 40.0, 19.5, 14.5, 40, 30)
    np.save(tmp_path / "d.npy", plane_depth(K, np.array([0.0, 0.0, -1.0]), -2.0).astype(np.float32))
    common = ["pointcloud", "--depth", tmp_path / "d.npy", "--fov", 60, "--normals", "depth", "-o", tmp_path / "o"]
    assert lotus(*common, "--mesh-format", "obj,glb").exit_code == 0
    mesh_files = {"d.obj", "d.glb"} | set(M.companions("obj", "d"))
    assert mesh_files <= {p.name for p in (tmp_path / "o").iterdir()}
    r = lotus(*common)
    assert r.exit_code == 0, r.output
    left = {p.name for p in (tmp_path / "o").iterdir()}
    assert left == {"d.ply", "d.json"} and not mesh_files & left
    stripes = np.full((30, 40), np.nan, np.float32)
    stripes[::2] = 2.0  # every other row: points, but no 2x2 block
    np.save(tmp_path / "s.npy", stripes)
    r = lotus("pointcloud", "--depth", tmp_path / "s.npy", "--depth-units", "m", "--fov", 60, "--mesh", "--preview",
              "--normals", "depth", "--edge-threshold", 0, "-o", tmp_path / "p")  # fmt: skip
    assert r.exit_code == 0 and "no mesh" in r.output and "no point to show, so no preview" in r.output, r.output
    assert set(json.loads((tmp_path / "p" / "s.json").read_text())["outputs"]) == {"ply"}
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"s.ply", "s.json"}
