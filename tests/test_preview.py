"""The preview renderer on analytic scenes: the nearest surface wins, shading follows the normals, the view
turns the way it says, meshes leave their holes open; the CLI writes it beside the PLY."""

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.geometry import camera as g
from lotus_cli.geometry import preview as P

from .conftest import make_image

K = g.intrinsics_from_fov(64, 48, 60.0)


def grid(z: np.ndarray, K: g.Intrinsics) -> np.ndarray:
    return g.backproject(z, K).reshape(-1, 3)


def wall_and_box():
    """A blue wall at 4 m, a red box face at 2 m in the middle: points, colours, normals (all facing the camera)."""
    z = np.full((48, 64), 4.0)
    box = np.zeros((48, 64), bool)
    box[16:32, 24:40] = True
    z[box] = 2.0
    colors = np.where(box[..., None], [255, 0, 0], [0, 0, 255]).reshape(-1, 3).astype(np.uint8)
    normals = np.broadcast_to([0.0, 0.0, -1.0], (z.size, 3)).astype(np.float32)
    return grid(z, K), colors, normals


def red(im):
    return np.argwhere((im == [255, 0, 0]).all(-1))


def empty(im):
    return (im == P.BACKGROUND).all(-1)


def test_nearest_surface_wins_and_shading_follows_the_normals():
    pts, colors, normals = wall_and_box()
    img = P.render(pts, colors, normals, K, yaw=0, pitch=0)
    assert img.shape == (48, 128, 3)
    colour, shade = img[:, :64], img[:, 64:]
    np.testing.assert_array_equal(colour[24, 32], [255, 0, 0])  # the box hides the wall behind it
    np.testing.assert_array_equal(colour[2, 2], [0, 0, 255])
    want = round(255 * (P.AMBIENT + (1 - P.AMBIENT) * P.LAMP @ [0, 0, -1]))
    assert np.abs(shade.astype(int) - want).max() <= 1  # every surface faces the camera: one grey
    tilted = P.render(pts, colors, np.broadcast_to([0.0, -1.0, 0.0], normals.shape), K, yaw=0, pitch=0)[:, 64:]
    assert abs(int(tilted[24, 32, 0]) - round(255 * (P.AMBIENT + (1 - P.AMBIENT) * P.LAMP @ [0, -1, 0]))) <= 1


def test_the_view_turns_around_the_scene():
    pts, colors, normals = wall_and_box()
    straight = P.render(pts, colors, normals, K, yaw=0, pitch=0)[:, :64]
    turned = P.render(pts, colors, normals, K, yaw=10, pitch=0)[:, :64]
    # yaw > 0 moves the viewer right: the box, nearer than the pivot (the median depth, 4 m), shifts left
    assert red(turned)[:, 1].mean() < red(straight)[:, 1].mean() - 3
    assert abs(red(turned)[:, 0].mean() - red(straight)[:, 0].mean()) < 1  # and not up or down
    up = P.render(pts, colors, normals, K, yaw=0, pitch=10)[:, :64]
    assert red(up)[:, 0].mean() > red(straight)[:, 0].mean() + 3  # the viewer up: near things go down


def test_a_mesh_keeps_its_holes_and_points_are_splatted_over_them():
    from lotus_cli.geometry import mesh as M
    from lotus_cli.geometry.cloud import CameraOptions, CloudOptions, ScaleOptions, make_cloud

    z = np.full((48, 64), 3.0, np.float32)
    z[20:28, 28:36] = np.nan  # an 8 x 8 hole
    cloud = make_cloud(
        make_image(48, 64), z, "depth", CameraOptions(fov=60.0), ScaleOptions(), CloudOptions(), per_metre=1.0
    )
    mesh = M.from_cloud(cloud)
    m = P.render(mesh.vertices, mesh.colors, mesh.normals, K, mesh.faces, yaw=0, pitch=0)[:, 64:]
    c = P.render(cloud.points, cloud.colors, cloud.normals, K, yaw=0, pitch=0, splat=1)[:, 64:]
    assert empty(m)[20:28, 28:36].all() and not empty(m)[:20].any()  # the hole, and nothing else
    assert empty(c)[21:27, 29:35].all() and not empty(c)[20, 28:36].any()  # splats reach one pixel in


def test_cli_writes_the_preview_beside_the_ply(tmp_path):
    z = np.full((30, 40), 2.0, np.float32)
    np.save(tmp_path / "m.npy", z)
    Image.fromarray(make_image(30, 40)).save(tmp_path / "m.png")
    r = CliRunner().invoke(
        app,
        [
            str(a)
            for a in (
                "pointcloud",
                tmp_path / "m.png",
                "--depth",
                tmp_path / "m.npy",
                "--out",
                tmp_path / "o",
                "--preview",
                "--up",
                "y",
            )
        ],
    )
    assert r.exit_code == 0, r.output
    png = np.asarray(Image.open(tmp_path / "o" / "m.preview.png"))
    assert png.shape == (30, 80, 3)
    assert (png[:, :40] != P.BACKGROUND).any(-1).mean() > 0.8  # the wall fills the view, --up y or not
    side = json.loads((tmp_path / "o" / "m.json").read_text())
    assert side["preview"]["file"] == "m.preview.png" and "renderer" in side["preview"]
