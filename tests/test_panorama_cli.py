"""`lotus depth|normal --projection equirect|auto` end to end with tiny random checkpoints: every format
written at the panorama's size (EXR read back), the sidecar's record of the views and the rule that
decided, the refusals, and a 360 clip."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.io.formats import read_map
from lotus_cli.io.sources import read_image
from lotus_cli.io.xmp import auto_projection, xmp_projection
from lotus_cli.model.panorama import PanoramaOptions, predict_panorama
from lotus_cli.model.predictor import LotusPredictor, PredictOptions

from .panorama_rooms import furnished_room, render_panorama

FAST = ["--processing-res", "32"]
XMP = (
    b'<rdf:Description xmlns:GPano="http://ns.google.com/photos/1.0/panorama/" GPano:ProjectionType="equirectangular"/>'
)


def lotus(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pano(tmp_path_factory):
    """A 128 x 64 ray-cast room as a PNG."""
    path = tmp_path_factory.mktemp("pano") / "room.png"
    Image.fromarray(render_panorama(64, 128, furnished_room())["rgb"]).save(path)
    return path


def test_depth_panorama_writes_every_format_at_the_panorama_size(pano, tmp_path, depth_d):
    out = tmp_path / "out"
    r = lotus("depth", pano, "-o", out, "-m", depth_d, "-f", "all", "--projection", "equirect", *FAST)
    assert r.exit_code == 0, r.output
    side = json.loads((out / "room.json").read_text())
    npy = np.load(out / "room.npy")
    assert npy.shape == (64, 128) and side["input_size"] == [128, 64]
    np.testing.assert_allclose(read_map(out / "room.exr"), npy, atol=1e-6)
    assert Image.open(out / "room.png").size == (128, 64) and Image.open(out / "room.16bit.png").size == (128, 64)
    record = side["panorama"]
    assert record["rule"] == "--projection equirect" and len(record["views"]) == 6
    assert {v["size"] for v in record["views"]} == {32}  # each view at the processing resolution
    assert len(record["depth_fit"]["scale_shift"]) == 6 and record["depth_fit"]["space"] == "disparity"
    assert side["options"]["projection"] == "equirect"
    # the map is the library's, through the shared predictor
    pred = LotusPredictor.from_pretrained(depth_d, device="cpu")
    want = predict_panorama(pred, [read_image(pano)], PredictOptions(processing_res=32), PanoramaOptions())[0]
    np.testing.assert_allclose(npy, want.map, atol=1e-6)


def test_normal_panorama_is_unit_vectors_in_the_asked_frame(pano, tmp_path, checkpoints):
    out = tmp_path / "n"
    model = checkpoints[("normal", "d")]
    r = lotus("normal", pano, "-o", out, "-m", model, "-f", "npy,exr", "--projection", "equirect", *FAST)
    assert r.exit_code == 0, r.output
    n = np.load(out / "room.npy")
    assert n.shape == (64, 128, 3)
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(read_map(out / "room.exr", "normal"), n, atol=1e-6)
    r = lotus(
        "normal",
        pano,
        "-o",
        tmp_path / "cv",
        "-m",
        model,
        "-f",
        "npy",
        "--projection",
        "equirect",
        "--frame",
        "opencv",
        *FAST,
    )
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(tmp_path / "cv" / "room.npy"), -n, atol=1e-6)


def test_auto_takes_2_to_1_images_whose_xmp_says_equirectangular(pano, tmp_path, depth_d):
    src = tmp_path / "in"
    src.mkdir()
    rgb = np.asarray(Image.open(pano))
    Image.fromarray(rgb).save(src / "tagged.jpg", quality=95, xmp=XMP)
    Image.fromarray(rgb).save(src / "plain.jpg", quality=95)
    Image.fromarray(rgb[:, :96]).save(src / "narrow.jpg", quality=95, xmp=XMP)
    assert xmp_projection(src / "tagged.jpg") == "equirectangular" and xmp_projection(src / "plain.jpg") is None
    out = tmp_path / "out"
    r = lotus("depth", src, "-o", out, "-m", depth_d, "-f", "npy", "--projection", "auto", *FAST)
    assert r.exit_code == 0, r.output
    tagged, plain, narrow = (json.loads((out / f"{k}.json").read_text()) for k in ("tagged", "plain", "narrow"))
    assert tagged["panorama"]["rule"] == "auto: 2:1 and XMP GPano:ProjectionType equirectangular"
    assert "panorama" not in plain and plain["projection"]["rule"] == "auto: 2:1 but no XMP GPano:ProjectionType"
    assert "not 2:1" in narrow["projection"]["rule"]
    # a perspective decision is the plain prediction
    pred = LotusPredictor.from_pretrained(depth_d, device="cpu")
    want = pred.predict(read_image(src / "plain.jpg"), PredictOptions(processing_res=32)).map
    np.testing.assert_allclose(np.load(out / "plain.npy"), want, atol=1e-6)


def test_xmp_element_form_and_other_projections(tmp_path):
    p = tmp_path / "x.jpg"
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(
        p, xmp=b"<GPano:ProjectionType> Equirectangular </GPano:ProjectionType>"
    )
    assert auto_projection(p)[0] == "equirect"
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(p, xmp=b'GPano:ProjectionType="cylindrical"')
    assert auto_projection(p) == ("perspective", "auto: 2:1 but XMP GPano:ProjectionType is cylindrical")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--projection", "fisheye"], "--projection must be perspective, equirect, auto"),
        (["--projection", "equirect", "--tile", "auto"], "--tile does not apply with --projection equirect"),
    ],
)
def test_bad_projection_options_are_usage_errors(pano, tmp_path, depth_d, args, message):
    r = lotus("depth", pano, "-o", tmp_path / "o", "-m", depth_d, *args)
    assert r.exit_code == 2 and message in r.stderr, r.output


def test_uncertainty_refuses_a_panorama(pano, tmp_path, depth_g):
    """`lotus uncertainty` does not offer --projection (its --help does not list it); the library refuses it."""
    from lotus_cli.errors import UsageError
    from lotus_cli.run.predict import PredictRequest, plan

    r = lotus("uncertainty", pano, "-o", tmp_path / "o", "-m", depth_g, "--projection", "equirect")
    assert r.exit_code == 2 and "--projection" in r.stderr and "--projection" not in lotus("uncertainty", "-h").stdout
    request = PredictRequest("depth", (str(pano),), model=str(depth_g), uncertainty=True, projection="equirect")
    with pytest.raises(UsageError, match="lotus uncertainty does not take --projection equirect"):
        plan(request)


def test_a_360_clip_works_the_same(tmp_path, depth_d):
    from .test_video import make_clip

    clip = make_clip(tmp_path / "clip.mp4", n=3, fps=3, size=(128, 64))
    out = tmp_path / "v"
    r = lotus("depth", clip, "-o", out, "-m", depth_d, "--projection", "equirect", "-f", "npy", *FAST)
    assert r.exit_code == 0, r.output
    frames = sorted(out.rglob("*.npy"))
    assert frames and all(np.load(f).shape == (64, 128) for f in frames)
    side = json.loads((out / "clip.json").read_text())
    assert side["options"]["projection"] == "equirect" and len(side["panorama"]["views"]) == 6  # the clip's plan


# -------------------------------------------------------------------------------------------- pointcloud


def read_ply(path):
    import open3d as o3d

    pc = o3d.t.io.read_point_cloud(str(path))
    return pc.point.positions.numpy(), pc.point.colors.numpy(), pc.point.normals.numpy()


def test_pointcloud_of_a_panorama_lies_on_the_sphere_and_its_mesh_closes(pano, tmp_path, depth_d):
    out = tmp_path / "pc"
    args = ("-m", depth_d, "--normals", "depth", "--near", "1", "--far", "5", "--mesh-format", "ply,glb")
    r = lotus("pointcloud", pano, "-o", out, "--projection", "equirect", "--edge-threshold", "0", *args, *FAST)
    assert r.exit_code == 0, r.output
    side = json.loads((out / "room.json").read_text())
    assert side["camera"]["projection"] == "equirect" and side["options"]["projection"] == "equirect"
    assert len(side["panorama"]["views"]) == 6 and side["cloud"]["points"] == 64 * 128
    pts, _, nrm = read_ply(out / "room.ply")
    d = np.linalg.norm(pts, axis=-1)
    assert d.min() == pytest.approx(1.0, rel=1e-4) and d.max() == pytest.approx(5.0, rel=1e-4)
    assert ((nrm * pts).sum(-1) <= 1e-6).all()  # every normal faces the centre
    mesh = side["mesh"]
    assert mesh["wrap_triangles"] > 0 and mesh["pole_triangles"] > 0 and (out / "room.glb").is_file()
    # every pixel kept: blocks on 63 rows x 128 columns (the last closing onto column 0), two fans of 126
    assert mesh["triangles"] == 2 * 63 * 128 + 2 * 126


def test_pointcloud_of_a_true_distance_map_is_the_room(pano, tmp_path):
    """--depth with a metric map: every point at its pixel's true distance along its ray."""
    from lotus_cli.geometry.panorama import pixel_directions

    scene = render_panorama(64, 128, furnished_room())
    np.save(tmp_path / "room.npy", scene["distance"].astype(np.float32))
    out = tmp_path / "pc"
    args = ("--depth-kind", "depth", "--depth-units", "m", "--normals", "depth", "--mesh", "--edge-threshold", "0")
    r = lotus("pointcloud", pano, "--depth", tmp_path / "room.npy", "-o", out, "--projection", "equirect", *args)
    assert r.exit_code == 0, r.output
    pts, _, _ = read_ply(out / "room.ply")
    want = pixel_directions(64, 128, dtype=np.float64) * scene["distance"][..., None]
    np.testing.assert_allclose(pts, want.reshape(-1, 3), atol=1e-5)


def test_pointcloud_refuses_pinhole_options_with_a_panorama(pano, tmp_path, depth_d):
    r = lotus("pointcloud", pano, "-o", tmp_path / "o", "-m", depth_d, "--projection", "equirect", "--fov", "90")
    assert r.exit_code == 2 and "--fov need a pinhole camera" in r.stderr, r.output


def test_an_image_that_is_not_2_to_1_fails_alone(pano, tmp_path, depth_d):
    src = tmp_path / "in"
    src.mkdir()
    Image.open(pano).save(src / "room.png")
    Image.open(pano).crop((0, 0, 100, 64)).save(src / "cropped.png")
    r = lotus("depth", src, "-o", tmp_path / "o", "-m", depth_d, "-f", "npy", "--projection", "equirect", *FAST)
    assert r.exit_code == 1 and "1 done, 0 skipped, 1 failed" in r.stderr, r.output
    assert "100x64 image is not an equirectangular panorama" in r.stderr
    assert (tmp_path / "o" / "room.npy").is_file() and not (tmp_path / "o" / "cropped.npy").exists()


def test_pointcloud_auto_says_which_rule_decided(pano, tmp_path, depth_d):
    src = tmp_path / "in"
    src.mkdir()
    rgb = np.asarray(Image.open(pano))
    Image.fromarray(rgb).save(src / "tagged.jpg", quality=95, xmp=XMP)
    Image.fromarray(rgb).save(src / "plain.jpg", quality=95)
    out = tmp_path / "pc"
    r = lotus("pointcloud", src, "-o", out, "-m", depth_d, "--normals", "depth", "--projection", "auto", *FAST)
    assert r.exit_code == 0, r.output
    tagged, plain = (json.loads((out / f"{k}.json").read_text()) for k in ("tagged", "plain"))
    assert tagged["camera"]["projection"] == "equirect" and tagged["panorama"]["rule"].startswith("auto: 2:1 and XMP")
    assert "fx" in plain["camera"] and plain["projection"]["rule"] == "auto: 2:1 but no XMP GPano:ProjectionType"
