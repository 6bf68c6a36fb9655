"""`lotus pointcloud`: PLY files read back with Open3D, the assumptions in sidecar and header, maps that exist,
alignment to metric depth, and real RGB-D frames (skipped when ../shared/data is absent)."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.errors import UsageError
from lotus_cli.geometry import camera as g
from lotus_cli.geometry.cloud import (
    CENTRED,
    SQUARE,
    CameraOptions,
    CloudOptions,
    ScaleOptions,
    make_cloud,
    metric_depth,
)

from .conftest import make_image
from .test_geometry import plane_depth

o3d = pytest.importorskip("open3d")
# ../shared/data beside the clone (a git worktree sits one level deeper: look there too)
RGBD = next(
    (
        p / "shared" / "data" / "rgbd"
        for p in Path(__file__).resolve().parents[2:4]
        if (p / "shared" / "data" / "rgbd").is_dir()
    ),
    Path("../shared/data/rgbd"),
)
NYU_K = (518.8579, 519.46961, 325.58245, 253.73617)


def lotus(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ply_header(path: Path) -> str:
    return path.read_bytes().split(b"end_header")[0].decode("ascii")


def read_ply(path: Path):
    pc = o3d.t.io.read_point_cloud(str(path))
    return pc.point.positions.numpy(), pc.point.colors.numpy(), pc.point.normals.numpy()


def test_ply_round_trip_through_open3d(tmp_path):
    K = g.intrinsics_from_fov(40, 30, 70.0)
    z = plane_depth(K, np.array([0.0, 0.0, -1.0]), -3.0)  # a wall 3 m ahead
    rgb = make_image(30, 40)
    cloud = make_cloud(
        rgb,
        z.astype(np.float32),
        "depth",
        CameraOptions(fov=70.0),
        ScaleOptions(),
        CloudOptions(stride=2),
        per_metre=1.0,
    )
    from lotus_cli.geometry.ply import write_ply

    write_ply(tmp_path / "c.ply", cloud.points, cloud.colors, cloud.normals, ["units metres"])
    pts, cols, nrm = read_ply(tmp_path / "c.ply")
    assert len(pts) == 15 * 20 == cloud.record["cloud"]["points"]
    np.testing.assert_allclose(pts[:, 2], 3.0, atol=1e-5)
    np.testing.assert_array_equal(cols, rgb[::2, ::2].reshape(-1, 3))
    np.testing.assert_allclose(nrm, np.broadcast_to([0, 0, -1], nrm.shape), atol=1e-4)
    assert "comment units metres" in ply_header(tmp_path / "c.ply")
    assert (tmp_path / "c.ply").stat().st_mode & 0o044  # readable by others, like any file the user makes


def test_up_y_is_the_opengl_frame():
    z = np.full((6, 8), 2.0, np.float32)
    rgb = make_image(6, 8)
    cv = make_cloud(rgb, z, "depth", CameraOptions(fov=60.0), ScaleOptions(), CloudOptions(), per_metre=1.0)
    gl = make_cloud(rgb, z, "depth", CameraOptions(fov=60.0), ScaleOptions(), CloudOptions(up="y"), per_metre=1.0)
    np.testing.assert_allclose(gl.points, cv.points * [1, -1, -1])
    np.testing.assert_allclose(gl.normals[0], [0, 0, 1], atol=1e-5)  # facing the viewer, who looks down -z


def test_cli_image_to_cloud_states_what_it_assumed(tmp_path, depth_d):
    Image.fromarray(make_image(36, 48)).save(tmp_path / "room.png")
    r = lotus(
        "pointcloud",
        tmp_path / "room.png",
        "--model",
        depth_d,
        "--normals",
        "depth",
        "--processing-res",
        32,
        "--out",
        tmp_path / "pc",
        "--edge-threshold",
        0,
    )
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "pc" / "room.json").read_text())
    assert side["camera_source"].startswith("assumed") and abs(side["camera"]["hfov_deg"] - g.DEFAULT_FOV) < 1e-6
    assert side["depth"]["assumed"] == ["--near 1 m", "--far 10 m"] and side["depth"]["kind"] == "disparity"
    assert side["assumed"] == [
        "camera: 60 degree horizontal field of view",
        f"camera: {CENTRED}",
        f"camera: {SQUARE}",
        "--near 1 m",
        "--far 10 m",
    ]
    pts, cols, nrm = read_ply(tmp_path / "pc" / "room.ply")
    assert len(pts) == 36 * 48
    assert abs(pts[:, 2].min() - 1.0) < 1e-4 and abs(pts[:, 2].max() - 10.0) < 1e-3  # near and far as stated
    header = ply_header(tmp_path / "pc" / "room.ply")
    assert "; --near 1 m; --far 10 m" in header and "from assumed: default 60 degree fov" in header
    assert ((nrm * pts).sum(-1) <= 1e-6).all()  # every normal faces the camera: n . p <= 0


def test_cli_backprojects_a_map_lotus_depth_wrote(tmp_path, depth_d):
    Image.fromarray(make_image(30, 40, 2)).save(tmp_path / "x.png")
    r = lotus(
        "depth",
        tmp_path / "x.png",
        "--model",
        depth_d,
        "--out",
        tmp_path / "d",
        "--format",
        "npy,png16",
        "--processing-res",
        32,
    )
    assert r.exit_code == 0, r.output
    clouds = {}
    for name in ("x.npy", "x.16bit.png"):
        out = tmp_path / name.replace(".", "_")
        r = lotus(
            "pointcloud",
            "--depth",
            tmp_path / "d" / name,
            "--out",
            out,
            "--near",
            2,
            "--far",
            5,
            "--edge-threshold",
            0,
            "--fov",
            50,
        )
        assert r.exit_code == 0, r.output
        side = json.loads((out / "x.json").read_text())
        assert side["depth_input_info"]["kind"] == "disparity" and side["depth"]["near_m"] == 2.0
        clouds[name] = read_ply(out / "x.ply")[0]
    assert len(clouds["x.npy"]) == 30 * 40
    np.testing.assert_allclose(clouds["x.16bit.png"], clouds["x.npy"], rtol=2e-3, atol=2e-3)  # 16-bit quantisation


def test_cli_metric_png16_in_mm_gives_metres(tmp_path):
    K = g.intrinsics_from_fov(40, 30, 90.0)
    z = plane_depth(K, np.array([0.0, -0.6, -0.8]), -1.6)  # a floor seen from above
    Image.fromarray(np.round(z * 1000).astype(np.uint16)).save(tmp_path / "floor.png")
    r = lotus(
        "pointcloud", "--depth", tmp_path / "floor.png", "--fov", 90, "--out", tmp_path / "o", "--edge-threshold", 0
    )
    assert r.exit_code == 0, r.output
    pts, _, nrm = read_ply(tmp_path / "o" / "floor.ply")
    np.testing.assert_allclose(pts @ np.array([0.0, -0.6, -0.8]), -1.6, atol=2e-3)  # mm quantisation
    assert np.median(g.angular_error(nrm, np.array([0.0, -0.6, -0.8]))) < 1.0


def test_cli_align_to_turns_affine_disparity_into_the_true_geometry(tmp_path):
    K = g.intrinsics_from_fov(48, 36, 60.0)
    z = plane_depth(K, np.array([0.3, -0.5, -0.81]) / np.linalg.norm([0.3, -0.5, -0.81]), -2.0)
    disp = 1 / z
    np.save(tmp_path / "pred.npy", ((disp - disp.min()) / (disp.max() - disp.min())).astype(np.float32))
    np.save(tmp_path / "metric.npy", np.where(np.random.default_rng(0).random(z.shape) < 0.1, z, 0).astype(np.float32))
    r = lotus(
        "pointcloud",
        "--depth",
        tmp_path / "pred.npy",
        "--depth-kind",
        "disparity",
        "--depth-units",
        "relative",
        "--align-to",
        tmp_path / "metric.npy",
        "--fov",
        60,
        "--out",
        tmp_path / "o",
        "--edge-threshold",
        0,
    )
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "o" / "pred.json").read_text())
    assert side["depth"]["rmse_m"] < 1e-4 and side["depth"]["assumed"] == []
    pts = read_ply(tmp_path / "o" / "pred.ply")[0]
    np.testing.assert_allclose(pts[:, 2], z.ravel(), rtol=1e-4)


def test_cli_errors_name_the_fix(tmp_path, depth_d):
    Image.fromarray(make_image(20, 20)).save(tmp_path / "x.png")
    r = lotus("pointcloud", tmp_path / "x.png", "--fov", 60, "--focal-px", 500, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--fov and --focal-px both describe the camera" in r.output
    r = lotus("pointcloud", tmp_path / "x.png", "--near", 5, "--far", 2, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "need 0 < near < far" in r.output
    r = lotus("pointcloud", tmp_path / "x.png", "--near", 0, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "need 0 < near < far" in r.output  # 0 is not "unset"
    r = lotus("pointcloud", tmp_path / "x.png", "--align-to", tmp_path / "gone.png", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--align-to" in r.output and "no such file" in r.output
    r = lotus("pointcloud", tmp_path / "x.png", "--align-units", "cubits", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--align-units 'cubits' is not a unit" in r.output
    r = lotus("pointcloud", tmp_path / "x.png", "--depth-units", "cubits", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--depth-units 'cubits' is not a unit" in r.output
    r = lotus("pointcloud", tmp_path / "x.png", "--depth-scale", 2, "--far", 3, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--far would be ignored" in r.output
    r = lotus("pointcloud", "--depth", tmp_path / "nope.npy", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "nope.npy: no such file" in r.output
    np.save(tmp_path / "rgb.npy", np.zeros((4, 4, 3), np.float32))
    r = lotus("pointcloud", "--depth", tmp_path / "rgb.npy", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "not a single-channel map" in r.output


def test_cli_video_writes_one_cloud_per_frame(tmp_path, depth_d):
    from .test_video import make_clip

    clip = make_clip(tmp_path / "clip.mp4", 6, 10.0, size=(32, 24))
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
        "--edge-threshold",
        0,
    )
    assert r.exit_code == 0, r.output
    plys = sorted((tmp_path / "o" / "clip").glob("*.ply"))
    side = json.loads((tmp_path / "o" / "clip.json").read_text())
    assert len(plys) == len(side["frames"]) == 3
    assert [len(read_ply(p)[0]) for p in plys] == [12 * 16] * 3  # every 2nd row and column of 24 x 32


def test_cli_refuses_what_it_would_get_wrong(tmp_path):
    K = g.intrinsics_from_fov(40, 30, 60.0)
    z = plane_depth(K, np.array([0.0, 0.0, -1.0]), -2.0).astype(np.float32)
    np.save(tmp_path / "metric.npy", z)
    Image.fromarray(make_image(30, 30)).save(tmp_path / "square.png")  # 30 x 30 image for a 40 x 30 map
    r = lotus("pointcloud", tmp_path / "square.png", "--depth", tmp_path / "metric.npy", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "differ in aspect ratio (30x30 vs 40x30)" in r.output
    r = lotus("pointcloud", "--depth", tmp_path / "metric.npy", "--near", 0.5, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "the map is metric already" in r.output  # the command line is wrong: usage error
    np.save(tmp_path / "nothing.npy", np.zeros((30, 40), np.float32))  # metric: 0 = no measurement
    r = lotus("pointcloud", "--depth", tmp_path / "nothing.npy", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "no finite values" in r.output
    np.save(tmp_path / "u.npy", z)
    (tmp_path / "u.json").write_text(json.dumps({"kind": "uncertainty"}))
    r = lotus("pointcloud", "--depth", tmp_path / "u.npy", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "says it is an uncertainty map" in r.output
    tilted = plane_depth(K, np.array([0.3, -0.5, -0.81]) / np.linalg.norm([0.3, -0.5, -0.81]), -2.0)
    np.save(tmp_path / "tilted.npy", tilted.astype(np.float32))
    disp = 1 / tilted  # a disparity map declared as depth: fitting it would turn the scene inside out
    np.save(tmp_path / "pred.npy", ((disp - disp.min()) / np.ptp(disp)).astype(np.float32))
    r = lotus(
        "pointcloud",
        "--depth",
        tmp_path / "pred.npy",
        "--depth-units",
        "relative",
        "--depth-kind",
        "depth",
        "--align-to",
        tmp_path / "tilted.npy",
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 1 and "orders depth the other way" in r.output
    assert not list((tmp_path / "o").glob("*.ply"))


def test_cli_normals_none_predicted_and_frames(tmp_path, checkpoints):
    img = make_image(24, 32, 4)
    Image.fromarray(img).save(tmp_path / "x.png")
    common = ["--model", checkpoints[("depth", "d")], "--processing-res", 32, "--edge-threshold", 0]
    r = lotus("pointcloud", tmp_path / "x.png", "--normals", "none", "--out", tmp_path / "none", *common)
    assert r.exit_code == 0, r.output
    assert "property float nx" not in ply_header(tmp_path / "none" / "x.ply")
    assert json.loads((tmp_path / "none" / "x.json").read_text())["normals"] == "none written"
    r = lotus(
        "pointcloud",
        tmp_path / "x.png",
        "--normal-model",
        checkpoints[("normal", "d")],
        "--out",
        tmp_path / "p",
        *common,
    )
    assert r.exit_code == 0, r.output
    from lotus_cli.model.predictor import LotusPredictor, PredictOptions

    lotus_frame = (
        LotusPredictor.from_pretrained(checkpoints[("normal", "d")], device="cpu")
        .predict(img, PredictOptions(processing_res=32))
        .map
    )
    pts, _, nrm = read_ply(tmp_path / "p" / "x.ply")
    predicted = g.convert_normals(lotus_frame, "opencv").reshape(-1, 3)
    away = (predicted * pts).sum(-1) > 0  # facing away from the camera at the origin: flipped to face it
    np.testing.assert_allclose(nrm, np.where(away[:, None], -predicted, predicted), atol=1e-5)
    assert json.loads((tmp_path / "p" / "x.json").read_text())["cloud"]["normals_flipped"] == int(away.sum())
    r = lotus(
        "pointcloud",
        tmp_path / "x.png",
        "--normal-model",
        checkpoints[("normal", "d")],
        "--up",
        "y",
        "--out",
        tmp_path / "y",
        *common,
    )
    assert r.exit_code == 0, r.output
    pts_cv, _, _ = read_ply(tmp_path / "p" / "x.ply")
    pts_gl, _, nrm_gl = read_ply(tmp_path / "y" / "x.ply")
    np.testing.assert_allclose(pts_gl, pts_cv * [1, -1, -1], atol=1e-6)
    predicted_gl = g.convert_normals(lotus_frame, "opengl").reshape(-1, 3)  # the same points face away in any frame
    np.testing.assert_allclose(nrm_gl, np.where(away[:, None], -predicted_gl, predicted_gl), atol=1e-5)


def test_shape_from_normals_says_when_it_found_nothing():
    """Normals that no shift explains (random directions facing the camera): the fit must say so and fall
    back to --near/--far rather than pass off a guess as fitted."""
    K = g.intrinsics_from_fov(64, 48, 60.0)
    values = np.random.default_rng(0).random((48, 64)).astype(np.float32)
    n = np.random.default_rng(1).normal(size=(48, 64, 3))
    n[..., 2] = -np.abs(n[..., 2])
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    depth, rec = metric_depth(values, "disparity", ScaleOptions(shape_from_normals=True), K=K, normals=n)
    assert rec["method"].startswith("nearest predicted value at --near") and "found no shift" in rec["warning"]
    assert abs(np.nanmin(depth) - 1.0) < 1e-5 and abs(np.nanmax(depth) - 10.0) < 1e-3


def test_cli_shape_from_normals_records_its_fit(tmp_path, checkpoints):
    Image.fromarray(make_image(24, 32, 5)).save(tmp_path / "x.png")
    r = lotus(
        "pointcloud",
        tmp_path / "x.png",
        "--model",
        checkpoints[("depth", "d")],
        "--normal-model",
        checkpoints[("normal", "d")],
        "--shape-from-normals",
        "--processing-res",
        32,
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 0, r.output
    depth = json.loads((tmp_path / "o" / "x.json").read_text())["depth"]
    header = ply_header(tmp_path / "o" / "x.ply")
    if "warning" in depth:  # random weights: either the fit found a shift (and says how well) or it says why not
        assert "warning shape from normals found no shift" in header
    else:
        assert (
            depth["median_angle_deg"] + 1.0 <= depth["median_angle_deg_flat"] and "the shift was fitted" not in header
        )
        assert depth["method"].startswith("shift from the predicted normals")


def test_cli_camera_from_exif_and_scaled_intrinsics(tmp_path):
    K = g.intrinsics_from_fov(40, 30, 60.0)
    np.save(tmp_path / "m.npy", plane_depth(K, np.array([0.0, 0.0, -1.0]), -2.0).astype(np.float32))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[41989] = 28  # FocalLengthIn35mmFilm
    Image.fromarray(make_image(60, 80)).save(tmp_path / "cam.jpg", exif=exif)  # the photo: twice the map's size
    r = lotus(
        "pointcloud", tmp_path / "cam.jpg", "--depth", tmp_path / "m.npy", "--out", tmp_path / "e", "--normals", "depth"
    )
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "e" / "m.json").read_text())
    assert side["camera_source"] == "EXIF FocalLengthIn35mmFilm 28 mm"
    want = g.focal_px_from_35mm(28, 80, 60) / 2  # focal of the 80 x 60 photo, on the 40 x 30 map
    assert abs(side["camera"]["fx"] - want) < 1e-6
    r = lotus(
        "pointcloud",
        tmp_path / "cam.jpg",
        "--depth",
        tmp_path / "m.npy",
        "--intrinsics",
        "100,90,39.5,29.5",
        "--out",
        tmp_path / "i",
        "--normals",
        "depth",
    )
    assert r.exit_code == 0, r.output
    cam = json.loads((tmp_path / "i" / "m.json").read_text())["camera"]
    assert (cam["fx"], cam["fy"], cam["cx"], cam["cy"]) == (50.0, 45.0, 19.5, 14.5)  # centre stays the centre


def test_cli_video_frames_share_one_metric_frame(tmp_path, depth_d):
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
        "--out",
        tmp_path / "o",
        "--far",
        "inf",
    )
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "o" / "clip.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    scales = {(f["depth"]["scale"], f["depth"]["shift"]) for f in side["frames"]}
    assert len(side["frames"]) == 4 and len(scales) == 1  # one scale and shift for the clip
    assert all(f["depth"]["assumed"] == ["--near 1 m"] for f in side["frames"])  # and its assumptions, every frame
    assert "(fy = fx); --near 1 m\n" in ply_header(sorted((tmp_path / "o" / "clip").glob("*.ply"))[-1])
    assert side["frames"][0]["depth"]["far_m"] is None  # infinity, written as JSON null


# ------------------------------------------------------------------------------------------ real RGB-D


def load_rgbd(name):
    if name == "tum":
        z = np.asarray(Image.open(RGBD / "tum" / "depth.png")).astype(np.float64) / 5000
        return z, g.Intrinsics(525.0, 525.0, 319.5, 239.5, 640, 480)
    z = np.asarray(Image.open(RGBD / "nyu" / f"depth_{name}.png")).astype(np.float64) / 1000
    return z, g.Intrinsics(*NYU_K, 640, 480)


def largest_plane(points: np.ndarray, threshold=0.02):
    """Open3D RANSAC: (plane [a, b, c, d], inlier indices) of the largest plane in points [N, 3]."""
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    o3d.utility.random.seed(0)
    plane, inliers = pc.segment_plane(distance_threshold=threshold, ransac_n=3, num_iterations=500)
    return np.asarray(plane), np.asarray(inliers)


@pytest.mark.skipif(not RGBD.is_dir(), reason="../shared/data/rgbd is absent")
@pytest.mark.parametrize("name", ["00000", "00050", "00100", "tum"])
def test_real_ground_truth_back_projects_to_planar_surfaces(name):
    """Measured depth with its intrinsics: the largest plane Open3D finds (a wall or the floor) is flat and
    covers a good part of the frame, and the normals from the depth agree with it. At 1/4 resolution: Kinect
    depth is quantised, so per-pixel normals of the full-resolution map are noise (median ~22 degrees off)."""
    z, K = load_rgbd(name)
    z = np.nanmean(np.where(z > 0, z, np.nan).reshape(120, 4, 160, 4), axis=(1, 3))  # NaN where all 16 missing
    K = K.resized(160, 120)
    n = g.normals_from_depth(z, K)
    ok = g.edge_mask(z, 0.05) & np.isfinite(n).all(-1)
    pts, n = g.backproject(np.nan_to_num(z), K)[ok], n[ok]
    plane, inliers = largest_plane(pts)
    assert len(inliers) > 0.2 * len(pts)
    normal, rms, planarity = g.plane_fit(pts[inliers])
    assert rms < 0.012 and planarity < 0.02, (rms, planarity)  # about 1 cm, Kinect noise included
    normal *= -np.sign(normal @ pts[inliers].mean(0))  # facing the camera
    assert np.median(g.angular_error(n[inliers], normal)) < 20.0


@pytest.mark.skipif(not RGBD.is_dir(), reason="../shared/data/rgbd is absent")
@pytest.mark.parametrize("name", ["00000", "tum"])
def test_real_align_to_recovers_the_true_geometry(name):
    z, K = load_rgbd(name)
    valid = z > 0
    disp = np.where(valid, 1 / np.where(valid, z, 1), np.nan)
    # affinely distorted and normalised as a disparity model would give it; holes filled the way a model would
    values = (disp - np.nanmin(disp)) / (np.nanmax(disp) - np.nanmin(disp)) * 0.7 + 0.2
    values = np.where(valid, values, np.nanmedian(values))
    s, b, rmse = g.align_to_metric(values, "disparity", np.where(valid, z, 0))
    assert rmse < 1e-4  # metres: exact up to float
    back = g.to_depth(values, "disparity", s, b)
    assert np.nanmax(np.abs(back - z)[valid]) < 1e-3
    noisy = values + np.random.default_rng(0).normal(0, 0.01, values.shape)  # 1% of the range: a realistic model
    _, _, rmse_noisy = g.align_to_metric(noisy, "disparity", np.where(valid, z, 0))
    assert rmse_noisy < 0.25 * np.nanmedian(z[valid]), rmse_noisy


# --------------------------------------------------------------- every valid point (issue 14), messages (13)


def test_cli_plane_with_holes_keeps_every_valid_point_and_its_exact_normal(tmp_path):
    """--normals depth --edge-threshold 0 on a tilted plane with holes: one point per pixel with depth, each
    with the plane's exact normal (those with no depth within reach on an axis: the fallback, counted)."""
    from .test_geometry import holes

    K = g.intrinsics_from_fov(360, 240, 60.0)  # window round(240 / 120) = 2 px
    normal = np.array([0.3, -0.5, -0.8]) / np.linalg.norm([0.3, -0.5, -0.8])
    z = plane_depth(K, normal, -2.0)
    z[holes(z.shape)] = 0  # metric map: 0 = no measurement
    np.save(tmp_path / "p.npy", z.astype(np.float32))
    r = lotus(
        "pointcloud",
        "--depth",
        tmp_path / "p.npy",
        "--fov",
        60,
        "--normals",
        "depth",
        "--edge-threshold",
        0,
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "o" / "p.json").read_text())
    pts, _, nrm = read_ply(tmp_path / "o" / "p.ply")
    assert len(pts) == side["cloud"]["with_depth"] == int((z > 0).sum())
    exact = g.angular_error(nrm, normal) < 0.01
    assert (~exact).sum() == side["cloud"]["without_normal"] < 0.002 * len(pts)
    fallback = -pts[~exact] / np.linalg.norm(pts[~exact], axis=-1, keepdims=True)
    np.testing.assert_allclose(nrm[~exact], fallback, atol=1e-5)
    assert "normals without a neighbour" not in r.output
    r = lotus(
        "pointcloud",
        "--depth",
        tmp_path / "p.npy",
        "--fov",
        60,
        "--normals",
        "depth",
        "--edge-threshold",
        0,
        "--drop-without-normal",
        "--out",
        tmp_path / "d",
    )
    side = json.loads((tmp_path / "d" / "p.json").read_text())
    assert side["cloud"]["removed_without_normal"] == int((~exact).sum()) and side["cloud"]["without_normal"] == 0
    assert len(read_ply(tmp_path / "d" / "p.ply")[0]) == int(exact.sum())


def test_cli_lists_the_camera_assumptions(tmp_path):
    np.save(tmp_path / "m.npy", np.full((30, 40), 2.0, np.float32))
    both = ["camera: principal point at the image centre", "camera: square pixels (fy = fx)"]
    for opts, want in ((["--fov", 50], both), (["--focal-px", 40], both), (["--intrinsics", "40,42,19,15"], [])):
        r = lotus("pointcloud", "--depth", tmp_path / "m.npy", *opts, "--depth-units", "m", "--out", tmp_path / "o")
        assert r.exit_code == 0, r.output
        side = json.loads((tmp_path / "o" / "m.json").read_text())
        assert side["assumed"] == want
        header = ply_header(tmp_path / "o" / "m.ply")
        assert all(w in header for w in want)


def test_cli_tiny_inputs_fail_with_the_minimum_size(tmp_path, depth_d):
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "dot.png")
    Image.fromarray(make_image(8, 8)).save(tmp_path / "ok.png")
    r = lotus(
        "pointcloud",
        tmp_path / "dot.png",
        tmp_path / "ok.png",
        "--model",
        depth_d,
        "--processing-res",
        32,
        "--normals",
        "depth",
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 1, r.output
    assert (
        "dot.png: 1x1 pixels is too small for a point cloud (give an image or map of at least 2x2 pixels)" in r.output
    )
    assert (tmp_path / "o" / "ok.ply").is_file() and "1 done, 0 skipped, 1 failed" in r.output  # the batch goes on


def test_cli_max_pixels_exists_and_is_what_the_message_advises(tmp_path, depth_d):
    Image.fromarray(make_image(20, 30)).save(tmp_path / "x.png")
    r = lotus("pointcloud", tmp_path / "x.png", "--model", depth_d, "--max-pixels", 100, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "raise --max-pixels" in r.output
    r = lotus(
        "pointcloud",
        tmp_path / "x.png",
        "--model",
        depth_d,
        "--max-pixels",
        600,
        "--processing-res",
        32,
        "--normals",
        "depth",
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 0, r.output
    r = lotus("pointcloud", tmp_path / "x.png", "--max-pixels", -1, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--max-pixels must be >= 0" in r.output


def test_cli_normal_model_errors_name_normal_model(tmp_path, depth_d):
    Image.fromarray(make_image(20, 30)).save(tmp_path / "x.png")
    r = lotus("pointcloud", tmp_path / "x.png", "--model", depth_d, "--normals", "predict", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "HF_HUB_OFFLINE" in r.output  # the default normal model is not cached here
    assert "--normal-model /path/to/a/downloaded/folder" in r.output and " --model " not in r.output
    r = lotus(
        "pointcloud", tmp_path / "x.png", "--model", depth_d, "--normal-model", "no-such-model", "--out", tmp_path / "o"
    )
    assert r.exit_code == 2 and "or pass --normal-model /path/to/checkpoint" in r.output


def test_cli_far_inf_on_a_depth_map_is_a_usage_error(tmp_path):
    np.save(tmp_path / "rel.npy", np.tile(np.linspace(0.5, 0.6, 30, dtype=np.float32), (20, 1)))
    common = ["--depth", tmp_path / "rel.npy", "--depth-units", "relative", "--out", tmp_path / "o"]
    r = lotus("pointcloud", *common, "--depth-kind", "depth", "--far", "inf")
    assert r.exit_code == 2 and "--far inf: only a disparity map" in r.output and "failed" not in r.output
    r = lotus("pointcloud", *common, "--depth-kind", "disparity", "--far", "inf")
    assert r.exit_code == 0, r.output
    with pytest.raises(UsageError, match="--far inf"):
        ScaleOptions(far=math.inf).check_kind("depth")  # what the CLI checks once the depth model is loaded


def test_cli_says_and_records_when_colours_are_resized(tmp_path):
    np.save(tmp_path / "m.npy", np.full((30, 40), 2.0, np.float32))
    Image.fromarray(make_image(60, 80)).save(tmp_path / "big.png")
    r = lotus("pointcloud", tmp_path / "big.png", "--depth", tmp_path / "m.npy", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "big.png is 80x60" in r.output and "is 40x30: colours resized to the map" in r.output
    side = json.loads((tmp_path / "o" / "m.json").read_text())
    assert side["colours_resized"]["from"] == [80, 60] and side["colours_resized"]["to"] == [40, 30]
    Image.fromarray(make_image(30, 40)).save(tmp_path / "same.png")
    r = lotus("pointcloud", tmp_path / "same.png", "--depth", tmp_path / "m.npy", "--out", tmp_path / "s")
    assert "resized" not in r.output and "colours_resized" not in json.loads((tmp_path / "s" / "m.json").read_text())


@pytest.mark.skipif(not RGBD.is_dir(), reason="../shared/data/rgbd is absent")
@pytest.mark.parametrize("name", ["00000", "tum"])
def test_real_ground_truth_writes_every_valid_point(tmp_path, name):
    """Issue 14: measured depth with holes, --normals depth --edge-threshold 0 writes one point per valid pixel."""
    depth, image, units = (
        (RGBD / "tum" / "depth.png", RGBD / "tum" / "color.png", 5000)
        if name == "tum"
        else (RGBD / "nyu" / f"depth_{name}.png", RGBD / "nyu" / f"rgb_{name}.jpg", 1000)
    )
    _, K = load_rgbd(name)
    r = lotus(
        "pointcloud",
        image,
        "--depth",
        depth,
        "--depth-units",
        units,
        "--normals",
        "depth",
        "--edge-threshold",
        0,
        "--intrinsics",
        f"{K.fx},{K.fy},{K.cx},{K.cy}",
        "--out",
        tmp_path,
    )
    assert r.exit_code == 0, r.output
    valid = int((np.asarray(Image.open(depth)) > 0).sum())
    side = json.loads((tmp_path / f"{depth.stem}.json").read_text())
    assert len(read_ply(tmp_path / f"{depth.stem}.ply")[0]) == side["cloud"]["points"] == valid
    assert side["cloud"]["without_normal"] < 0.003 * valid  # isolated pixels only


# ---------------------------------------------- issue 12: one sidecar shape, --skip-existing, one CLI vocabulary


def test_cli_sidecar_has_the_shared_shape_and_the_header_its_version(tmp_path, depth_d):
    from lotus_cli import __version__

    Image.fromarray(make_image(24, 32)).save(tmp_path / "x.png")
    r = lotus(
        "pointcloud",
        tmp_path / "x.png",
        "--model",
        depth_d,
        "--normals",
        "depth",
        "--processing-res",
        32,
        "--near",
        2,
        "--mesh",
        "--edge-threshold",
        0,
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "o" / "x.json").read_text())
    assert (side["kind"], side["complete"], side["interrupted"], side["error"]) == ("pointcloud", True, False, None)
    assert side["lotus_cli"] == __version__ and side["model"] == str(depth_d) and side["normal_model"] is None
    assert side["input"] == str(tmp_path / "x.png") and side["key"] == "x" and side["seconds"] > 0
    assert side["options"]["near"] == 2.0 and side["options"]["far"] is None and side["options"]["normals"] == "depth"
    assert side["options"]["mesh_formats"] == ["glb"] and side["options"]["processing_res"] == 32
    assert side["outputs"] == {"ply": {"file": "x.ply"}, "glb": {"file": "x.glb"}}
    assert side["depth"]["near_m"] == 2.0 and side["cloud"]["points"] == 24 * 32  # the cloud's own record
    assert ply_header(tmp_path / "o" / "x.ply").split("\n")[2] == f"comment lotus-cli {__version__} {depth_d}"


def test_cli_skip_existing_keeps_only_a_cloud_made_the_same_way(tmp_path):
    disp = np.tile(np.linspace(0.2, 0.9, 32, dtype=np.float32), (24, 1))
    np.save(tmp_path / "m.npy", disp)
    base = [
        "pointcloud",
        "--depth",
        tmp_path / "m.npy",
        "--depth-kind",
        "disparity",
        "--depth-units",
        "relative",
        "--out",
        tmp_path / "o",
        "--skip-existing",
    ]
    r = lotus(*base, "--near", 1)
    assert r.exit_code == 0 and "1 done" in r.output and "redone" not in r.output, r.output
    made = (tmp_path / "o" / "m.ply").stat().st_mtime_ns
    r = lotus(*base, "--near", 1, "--json")
    assert r.exit_code == 0 and "0 done, 1 skipped, 0 failed" in r.output, r.output
    assert json.loads(r.stdout.splitlines()[-1])["status"] == "skipped"
    assert (tmp_path / "o" / "m.ply").stat().st_mtime_ns == made
    r = lotus(*base, "--near", 2, "--json")
    assert r.exit_code == 0 and "1 done" in r.output, r.output
    assert f"redone: {tmp_path / 'm.npy'}: made with other options (near 1.0 -> 2.0)" in r.output
    assert json.loads(r.stdout.splitlines()[-1])["redone"] == "made with other options (near 1.0 -> 2.0)"
    assert abs(read_ply(tmp_path / "o" / "m.ply")[0][:, 2].min() - 2.0) < 1e-4  # made again, with the new --near
    r = lotus(*base, "--near", 2, "--preview")
    assert "made with other options (preview False -> True)" in r.output
    assert (tmp_path / "o" / "m.preview.png").is_file()
    (tmp_path / "o" / "m.preview.png").unlink()
    r = lotus(*base, "--near", 2, "--preview")
    assert "redone: " in r.output and "m.preview.png missing" in r.output and "1 done" in r.output
    side = json.loads((tmp_path / "o" / "m.json").read_text())
    side["complete"], side["error"] = False, "disk full"
    (tmp_path / "o" / "m.json").write_text(json.dumps(side))
    r = lotus(*base, "--near", 2, "--preview")
    assert "its run failed (disk full)" in r.output and "1 done" in r.output
    r = lotus(*base, "--near", 2, "--preview", "--far", "inf")
    assert "made with other options (far None -> 'inf')" in r.output
    json.loads((tmp_path / "o" / "m.json").read_text(), parse_constant=lambda c: pytest.fail(c))  # strict JSON


def test_cli_skip_existing_redoes_an_interrupted_clip(tmp_path, depth_d, monkeypatch):
    from lotus_cli.run.pointcloud import CloudRun

    from .test_video import make_clip

    clip = make_clip(tmp_path / "clip.mp4", 3, 10.0, size=(32, 24))
    args = [
        "pointcloud",
        clip,
        "--model",
        depth_d,
        "--normals",
        "depth",
        "--processing-res",
        32,
        "--out",
        tmp_path / "o",
        "--skip-existing",
    ]
    real = CloudRun._predict_and_write

    def stop_at_the_second_frame(self, key, *a, **kw):
        if not key.startswith("clip/000000_"):
            raise KeyboardInterrupt
        return real(self, key, *a, **kw)

    monkeypatch.setattr(CloudRun, "_predict_and_write", stop_at_the_second_frame)
    r = lotus(*args)
    assert r.exit_code == 130, r.output
    side = json.loads((tmp_path / "o" / "clip.json").read_text())
    assert (side["complete"], side["interrupted"], len(side["frames"])) == (False, True, 1)
    assert side["kind"] == "pointcloud" and side["options"]["fps"] is None and side["video"]["frames"] == 1
    monkeypatch.setattr(CloudRun, "_predict_and_write", real)
    r = lotus(*args)
    assert r.exit_code == 0 and f"redone: {clip}: its run was interrupted" in r.output, r.output
    side = json.loads((tmp_path / "o" / "clip.json").read_text())
    assert (side["complete"], side["interrupted"], side["error"], len(side["frames"])) == (True, False, None, 3)
    frame = json.loads((tmp_path / "o" / f"{side['frames'][2]['key']}.json").read_text())
    assert frame["kind"] == "pointcloud" and frame["complete"] and frame["frame"] == 2 and frame["input"] == str(clip)
    r = lotus(*args)
    assert r.exit_code == 0 and "0 done, 1 skipped, 0 failed" in r.output, r.output
    (tmp_path / "o" / f"{side['frames'][1]['key']}.ply").unlink()
    r = lotus(*args)
    assert r.exit_code == 0 and f"{Path(side['frames'][1]['key']).name}.ply missing" in r.output, r.output
    r = lotus(*args, "--max-frames", 2)
    assert "made with other options (max_frames None -> 2)" in r.output
    assert len(json.loads((tmp_path / "o" / "clip.json").read_text())["frames"]) == 2


def test_cli_output_kind_states_what_an_unnamed_checkpoint_outputs(tmp_path, checkpoints):
    import shutil

    Image.fromarray(make_image(24, 32)).save(tmp_path / "x.png")
    mine = tmp_path / "my_weights"
    shutil.copytree(checkpoints[("depth", "d")], mine)  # model_index.json says depth, nothing says the kind
    common = ["pointcloud", tmp_path / "x.png", "--model", mine, "--normals", "depth", "--processing-res", 32]
    r = lotus(*common, "--out", tmp_path / "none")
    assert r.exit_code == 2 and "state it with --output-kind disparity|depth" in r.output
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").iterdir())
    r = lotus(*common, "--output-kind", "normal", "--out", tmp_path / "n")
    assert r.exit_code == 2 and "--output-kind must be disparity or depth" in r.output
    for kind in ("disparity", "depth"):
        r = lotus(*common, "--output-kind", kind, "--out", tmp_path / kind, "--edge-threshold", 0)
        assert r.exit_code == 0, r.output
        side = json.loads((tmp_path / kind / "x.json").read_text())
        assert side["depth"]["kind"] == kind and side["model"] == str(mine)
    near, far = (read_ply(tmp_path / k / "x.ply")[0][:, 2] for k in ("disparity", "depth"))
    # the same map read as disparity (1 = near) or as depth (0 = near): the nearest pixel is another one
    assert np.argmin(near) != np.argmin(far)
    np.save(tmp_path / "m.npy", np.full((8, 8), 2.0, np.float32))
    r = lotus("pointcloud", "--depth", tmp_path / "m.npy", "--output-kind", "depth", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--depth-kind" in r.output


def test_cli_normal_model_nothing_describes_is_advised_lotus_json(tmp_path, checkpoints, depth_d):
    import shutil

    Image.fromarray(make_image(24, 32)).save(tmp_path / "x.png")
    mine = tmp_path / "my_normals"
    shutil.copytree(checkpoints[("normal", "d")], mine)
    index = json.loads((mine / "model_index.json").read_text())
    del index["lotus_task"]
    (mine / "model_index.json").write_text(json.dumps(index))
    r = lotus("pointcloud", tmp_path / "x.png", "--model", depth_d, "--normal-model", mine, "--out", tmp_path / "o")
    assert r.exit_code == 2 and f"model {mine}: nothing says what it predicts" in r.output
    assert 'write lotus.json beside unet/: {"task": "normal", "kind": "normal"}' in r.output
    assert "--output-kind" not in r.output  # that option states what --model outputs, not the normal model


def test_cli_depth_map_of_one_row_fails_with_the_minimum_size(tmp_path):
    np.save(tmp_path / "row.npy", np.full((1, 5), 2.0, np.float32))
    r = lotus("pointcloud", "--depth", tmp_path / "row.npy", "--out", tmp_path / "o")
    assert r.exit_code == 1, r.output
    assert "5x1 pixels is too small for a point cloud (give an image or map of at least 2x2 pixels)" in r.output
    np.save(tmp_path / "chan.npy", np.full((6, 8, 1), 2.0, np.float32))  # a trailing channel axis is dropped
    r = lotus("pointcloud", "--depth", tmp_path / "chan.npy", "--out", tmp_path / "o", "--edge-threshold", 0)
    assert r.exit_code == 0, r.output
    assert len(read_ply(tmp_path / "o" / "chan.ply")[0]) == 6 * 8


def test_cli_skip_existing_redoes_a_cloud_whose_normals_came_from_elsewhere(tmp_path, checkpoints):
    Image.fromarray(make_image(24, 32)).save(tmp_path / "x.png")
    base = [
        "pointcloud",
        tmp_path / "x.png",
        "--model",
        checkpoints[("depth", "d")],
        "--processing-res",
        32,
        "--out",
        tmp_path / "o",
        "--skip-existing",
    ]
    assert lotus(*base, "--normals", "depth").exit_code == 0
    normal_d = checkpoints[("normal", "d")]
    r = lotus(*base, "--normal-model", normal_d)
    assert r.exit_code == 0 and "1 done" in r.output, r.output
    assert f"normal_model None -> {str(normal_d)!r}, normals 'depth' -> 'predict'" in r.output
    assert json.loads((tmp_path / "o" / "x.json").read_text())["normal_model"] == str(normal_d)
    r = lotus(*base, "--normal-model", normal_d)
    assert r.exit_code == 0 and "1 skipped" in r.output, r.output


def test_json_records_stay_utf8_for_undecodable_names(tmp_path, depth_d):
    src = tmp_path / "odd"
    src.mkdir()
    os.close(os.open(os.fsencode(src) + b"/caf\xe9.png", os.O_CREAT | os.O_WRONLY))  # not UTF-8, empty
    r = CliRunner().invoke(app, ["pointcloud", str(src), "--json", "-m", str(depth_d), "-o", str(tmp_path / "o")])
    records = [json.loads(line) for line in r.stdout_bytes.decode("utf-8").splitlines()]  # strict UTF-8
    assert [rec["input"].rsplit("/", 1)[1] for rec in records] == ["caf\\xe9.png"]
