"""Issue 28, geometry: an empty cloud or mesh has no preview (and no numpy warnings), cloud previews at a
stride have no scan-line gaps, predicted normals face the camera, an OBJ keeps its texture whatever the
item's name, and the flying-pixel advice points the right way."""

import warnings

import numpy as np
import pytest

from lotus_cli.errors import InputError
from lotus_cli.geometry import camera as g
from lotus_cli.geometry import cloud as C
from lotus_cli.geometry import mesh as M
from lotus_cli.geometry import preview as P

from .conftest import make_image

W, H = 320, 240
K = g.intrinsics_from_fov(W, H, 60.0)


def floor_and_wall() -> np.ndarray:
    """Depth [H, W] in metres: a floor 1.5 m below the camera receding to a wall at 8 m."""
    v = np.mgrid[0:H, 0:W][0].astype(np.float64)
    down = (v - K.cy) / K.fy
    z = np.where(down > 0.05, 1.5 / np.maximum(down, 1e-9), 8.0)
    return np.minimum(z, 8.0).astype(np.float32)


def empty_cloud() -> C.Cloud:
    none3 = np.zeros((0, 3), np.float32)
    return C.Cloud(none3, np.zeros((0, 3), np.uint8), none3, {}, np.zeros(0, np.int64), np.zeros((H, W), bool))


def test_an_empty_cloud_or_mesh_has_nothing_to_show_and_warns_nothing():
    """--preview of an empty mesh wrote a uniform grey picture with 'Mean of empty slice' warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning fails the test
        assert P.render_cloud(empty_cloud(), K) is None
        mesh = M.Mesh(
            *(np.zeros((0, 3), np.float32),) * 1,
            np.zeros((0, 3), np.int32),
            None,
            np.zeros((0, 3), np.uint8),
            np.zeros((0, 2), np.float32),
            np.zeros(0, np.int64),
            "opencv",
            {},
        )
        assert P.render_cloud(mesh, K) is None
        behind = np.array([[0.0, 0.0, -2.0]], np.float32)  # only behind the preview camera
        assert P.render(behind, np.zeros((1, 3), np.uint8), None, K) is None
        nan = np.full((3, 3), np.nan, np.float32)
        assert P.render(nan, np.zeros((3, 3), np.uint8), None, K) is None


@pytest.mark.parametrize("stride", [2, 3, 4, 8])
def test_a_thinned_cloud_preview_has_no_scan_line_gaps(stride):
    """At --stride 4 the splats (then 2 px wide either side for points 4 px apart) left background rows
    across the floor, which the turned view spreads apart; the splat now follows the points' spacing."""
    z = floor_and_wall()
    full = C.build_cloud(make_image(H, W), z, K, None, C.CloudOptions(edge_threshold=0))
    thin = C.build_cloud(make_image(H, W), z, K, None, C.CloudOptions(edge_threshold=0, stride=stride))
    for c in (full, thin):
        c.K = K
    covered = ~(P.render_cloud(full, K)[:, :W] == P.BACKGROUND).all(-1)
    shown = ~(P.render_cloud(thin, K, stride)[:, :W] == P.BACKGROUND).all(-1)
    inner = np.zeros_like(covered)
    inner[H // 8 : -H // 8, W // 8 : -W // 8] = True  # away from the picture's borders, which the turn uncovers
    gaps = covered & inner & ~shown
    assert gaps.sum() == 0, f"{int(gaps.sum())} background pixels inside the surface"
    assert P.splat_for(stride, K) == stride
    big = g.intrinsics_from_fov(4096, 3072, 60.0)  # previews are scaled to 1024 px: the spacing too
    assert P.splat_for(stride, big) == max(1, int(np.ceil(stride / 4)))


def test_predicted_normals_are_turned_to_face_the_camera():
    """With random weights 70 % of predicted normals faced away, while the docs say normals face the camera."""
    rng = np.random.default_rng(0)
    z = np.full((24, 32), 2.0, np.float32)
    Kp = g.intrinsics_from_fov(32, 24, 60.0)
    n = rng.normal(size=(24, 32, 3)).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    pts = g.backproject(z, Kp).reshape(24, 32, 3)
    away = ((n * pts).sum(-1) > 0).sum()
    assert away > 100  # the input really has normals facing away
    for up in ("opencv", "y"):
        c = C.build_cloud(make_image(24, 32), z, Kp, n, C.CloudOptions(edge_threshold=0, up=up))
        p = c.points * (g.TO_OPENGL if up == "y" else 1)  # back to the OpenCV frame
        m = c.normals * (g.TO_OPENGL if up == "y" else 1)
        assert ((m * p).sum(-1) <= 1e-6).all() and c.record["normals_flipped"] == away
        want = np.where(((n * pts).sum(-1) > 0)[..., None], -n, n).reshape(-1, 3)
        np.testing.assert_allclose(m, want, atol=1e-6)  # flipped, not otherwise changed
    assert "flipped to face it" in C.NORMAL_SOURCES["predict"]


@pytest.mark.parametrize("name", ["x\ny", "with space", "tab\there"])
def test_an_obj_keeps_its_texture_whatever_the_items_name(tmp_path, name):
    """A newline in the file name broke the OBJ's mtllib / map_Kd lines: Open3D lost the texture."""
    o3d = pytest.importorskip("open3d")
    z = np.full((12, 16), 2.0, np.float32)
    rgb = make_image(12, 16, 5)
    c = C.make_cloud(
        rgb, z, "depth", C.CameraOptions(fov=60), C.ScaleOptions(), C.CloudOptions(edge_threshold=0), per_metre=1.0
    )
    mesh = M.from_cloud(c)
    assert M.write(mesh, ("obj",), tmp_path, name, rgb) == {"obj": name + ".obj"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name + ".obj", *M.companions("obj", name)])
    lines = (tmp_path / (name + ".obj")).read_text().splitlines()
    assert f"mtllib {M.companions('obj', name)[0]}" in lines
    back = o3d.t.io.read_triangle_mesh(str(tmp_path / (name + ".obj")))
    assert len(back.triangle.indices) == len(mesh.faces)
    np.testing.assert_array_equal(back.material.texture_maps["albedo"].as_tensor().numpy()[..., :3], rgb)
    assert M.companions("obj", "x") == ["x.mtl", "x_albedo.png"] and M.companions("glb", name) == []
    assert M.companions("obj", "a b") != M.companions("obj", "a_b")  # no two items share them


def test_mesh_format_names_are_read_in_any_case():
    assert M.parse_formats("GLB,Ply,obj") == ("glb", "ply", "obj")


def test_no_points_left_advises_raising_the_edge_threshold():
    z = np.full((8, 8), 2.0, np.float32)
    z[::2] = 20.0  # every pixel has a far neighbour: all are flying pixels at the default threshold
    with pytest.raises(InputError) as e:
        C.build_cloud(make_image(8, 8), z, g.intrinsics_from_fov(8, 8, 60.0), None, C.CloudOptions())
    assert "raise --edge-threshold" in e.value.hint and "lower" not in e.value.hint
