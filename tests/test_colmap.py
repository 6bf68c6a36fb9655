"""`lotus colmap`: a rendered room of known geometry, its COLMAP model written by pycolmap (true poses, sparse
points sampled from the surfaces with noise and 10 % floating outliers, with tracks), and for the network
each view's true disparity under an unknown scale and shift of its own (tests/colmap_scene.py)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycolmap")
sys.path.insert(0, str(Path(__file__).parent))

from colmap_scene import build_scene, fake_maps, surface_distance  # noqa: E402

from lotus_cli.errors import InputError, UsageError  # noqa: E402
from lotus_cli.geometry.camera import angular_error, convert_normals  # noqa: E402
from lotus_cli.geometry.fusion import read_ply_points  # noqa: E402
from lotus_cli.io.sources import read_depth_map  # noqa: E402
from lotus_cli.run.colmap import ColmapRequest, colmap_scene  # noqa: E402
from lotus_cli.run.events import Reporter  # noqa: E402

FUSED_P99 = 0.02  # reconstruction units (the room is 5 x 2.5 x 9): fused points this close to a true surface


class Recorder(Reporter):
    def __init__(self):
        self.results, self.notes = [], []

    def result(self, r):
        self.results.append(r)

    def note(self, text):
        self.notes.append(text)


def run(scene, out, **kw):
    rec = Recorder()
    request = ColmapRequest(
        scene.root, out=out, depth=scene.root / "maps", depth_kind="disparity", normals_from=scene.root / "nmaps", **kw
    )
    return colmap_scene(request, rec), rec


@pytest.fixture(scope="module")
def binary_scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("room-bin")
    scene = build_scene(root, binary=True)
    fake_maps(scene, root / "maps", root / "nmaps")
    return scene


@pytest.fixture(scope="module")
def binary_run(binary_scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("out-bin")
    summary, rec = run(binary_scene, out, world_normals=True)
    return summary, rec, out


def sidecar(out, key):
    return json.loads((out / "lotus-colmap" / f"{key}.json").read_text())


def test_metric_depth_within_one_percent_of_the_truth(binary_scene, binary_run):
    summary, _, out = binary_run
    assert (summary.done, summary.failed) == (len(binary_scene.names), 0)
    for name, truth in zip(binary_scene.names, binary_scene.depth):
        key = Path(name).stem
        depth = np.load(out / "mono_depth" / f"{key}_aligned.npy")
        rel = np.abs(depth - truth) / truth
        assert np.median(rel) < 0.01, key
        assert np.percentile(rel, 90) < 0.02, key
        # the nerfstudio PNG holds the same depth in thousandths of the unit
        png = read_depth_map(out / "depths" / f"{key}.png", "depth", "mm")[0]
        np.testing.assert_allclose(png, depth, atol=0.0006)
        a = sidecar(out, key)["alignment"]
        assert a["refused"] is None and a["used"] >= 20 and a["residual_median"] < 0.02


def test_world_normals_within_one_degree(binary_scene, binary_run):
    _, _, out = binary_run
    for name, truth, (R, _) in zip(binary_scene.names, binary_scene.normals_world, binary_scene.poses):
        key = Path(name).stem
        world = np.load(out / "normals_world" / f"{key}.npy")
        assert np.median(angular_error(world, truth)) < 1.0
        # dn-splatter's PNG: (n + 1) / 2 in the OpenGL camera frame
        from PIL import Image

        png = np.asarray(Image.open(out / "normals_from_pretrain" / f"{key}.png")).astype(np.float64) / 255 * 2 - 1
        cam_gl = convert_normals((truth.astype(np.float64) @ R.T), "opengl", "opencv")
        assert np.median(angular_error(png, cam_gl)) < 1.0


def test_fused_cloud_lies_on_the_true_surfaces(binary_run):
    _, _, out = binary_run
    ply = read_ply_points(out / "fused.ply")
    dist = surface_distance(ply["points"].astype(np.float64))
    assert len(dist) > 2000
    assert np.percentile(dist, 99) < FUSED_P99
    assert np.abs(np.linalg.norm(ply["normals"], axis=-1) - 1).max() < 1e-3
    scene = json.loads((out / "lotus-colmap" / "scene.json").read_text())
    assert scene["fusion"]["kept"] == len(dist) and scene["complete"]
    assert scene["scale_consistency"]["views"] == 6 and scene["scale_consistency"]["flagged"] == []


def test_outlying_sfm_points_are_rejected(binary_scene, binary_run):
    import pycolmap

    _, _, out = binary_run
    rec = pycolmap.Reconstruction(str(binary_scene.root / "sparse/0"))
    for image_id in rec.reg_image_ids():
        im = rec.images[image_id]
        seen = {p.point3D_id for p in im.points2D if p.has_point3D()}
        planted = seen & binary_scene.outlier_ids
        rejected = set(sidecar(out, Path(im.name).stem)["alignment"]["outlier_point_ids"])
        # a floater can lie on a surface by chance; nearly all others must go
        assert len(planted) >= 20
        assert len(planted & rejected) >= 0.85 * len(planted), im.name


def test_transforms_json_for_nerfstudio(binary_scene, binary_run):
    _, _, out = binary_run
    meta = json.loads((out / "transforms.json").read_text())
    assert len(meta["frames"]) == len(binary_scene.names)
    for f, (R, t) in zip(meta["frames"], binary_scene.poses):
        assert (out / f["depth_file_path"]).is_file() and (out / f["file_path"]).is_file()
        c2w = np.array(f["transform_matrix"])
        np.testing.assert_allclose(c2w[:3, 3], -R.T @ t, atol=1e-9)
        np.testing.assert_allclose(c2w[:3, 2], -R[2], atol=1e-9)  # OpenGL: the camera looks down -z


def test_text_model_reads_the_same(binary_scene, binary_run, tmp_path):
    root = tmp_path / "room-txt"
    scene = build_scene(root, binary=False)
    assert (root / "sparse/0/cameras.txt").is_file() and not (root / "sparse/0/cameras.bin").exists()
    fake_maps(scene, root / "maps", root / "nmaps")
    summary, _ = run(scene, tmp_path / "out", fuse=False)
    assert summary.done == len(scene.names)
    for name in scene.names:
        a, b = (
            sidecar(binary_run[2], Path(name).stem)["alignment"],
            sidecar(tmp_path / "out", Path(name).stem)["alignment"],
        )
        assert a["used"] == b["used"] and a["scale"] == pytest.approx(b["scale"], rel=1e-5)


def test_distorted_opencv_camera(tmp_path):
    scene = build_scene(tmp_path / "room", model="OPENCV", views=5)
    fake_maps(scene, tmp_path / "room/maps", tmp_path / "room/nmaps")
    summary, _ = run(scene, tmp_path / "out")
    assert summary.done == 5
    for name, truth in zip(scene.names, scene.depth):
        depth = np.load(tmp_path / "out/mono_depth" / f"{Path(name).stem}_aligned.npy")
        assert np.median(np.abs(depth - truth) / truth) < 0.01
    assert sidecar(tmp_path / "out", "view_00")["colmap"]["camera"]["model"] == "OPENCV"
    dist = surface_distance(read_ply_points(tmp_path / "out/fused.ply")["points"].astype(np.float64))
    assert np.percentile(dist, 99) < FUSED_P99


def test_refusals_write_nothing(binary_scene, tmp_path):
    # a map that holds one value cannot be fitted; too few points can not be trusted
    maps = tmp_path / "maps"
    maps.mkdir()
    for name in binary_scene.names:
        np.save(maps / f"{Path(name).stem}.npy", np.load(binary_scene.root / "maps" / f"{Path(name).stem}.npy"))
    np.save(maps / "view_01.npy", np.full_like(binary_scene.depth[1], 0.5))
    rec = Recorder()
    summary = colmap_scene(
        ColmapRequest(binary_scene.root, out=tmp_path / "o", depth=maps, depth_kind="disparity", normals="none"), rec
    )
    failed = {r.item.key: r.error for r in rec.results if r.status == "failed"}
    assert list(failed) == ["view_01"] and "one value" in failed["view_01"]
    assert not (tmp_path / "o/mono_depth/view_01_aligned.npy").exists()
    assert sidecar(tmp_path / "o", "view_01")["alignment"]["refused"].startswith("degenerate")
    assert summary.exit_code == 1
    summary = colmap_scene(
        ColmapRequest(
            binary_scene.root, out=tmp_path / "p", depth=maps, depth_kind="disparity", min_points=100000, normals="none"
        )
    )
    assert summary.failed == len(binary_scene.names) and "too few SfM points" in summary.failures[0].error
    assert not (tmp_path / "p/depths").exists() and not (tmp_path / "p/fused.ply").exists()
    # disparity read as depth: the map orders the points backwards
    summary = colmap_scene(ColmapRequest(binary_scene.root, out=tmp_path / "q", depth=maps, normals="none"))
    assert summary.failed == len(binary_scene.names) and "orders the points backwards" in summary.failures[0].error


def test_not_a_workspace(tmp_path, binary_scene):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a COLMAP workspace"):
        colmap_scene(ColmapRequest(tmp_path / "empty", depth=binary_scene.root / "maps"))
    half = tmp_path / "half/sparse/0"
    half.mkdir(parents=True)
    (half / "images.txt").write_text("")
    with pytest.raises(InputError, match=r"cameras.bin/.txt, points3D.bin/.txt missing"):
        colmap_scene(ColmapRequest(tmp_path / "half", depth=binary_scene.root / "maps"))
    bad = tmp_path / "bad/sparse/0"
    bad.mkdir(parents=True)
    (tmp_path / "bad/images").mkdir()
    (bad / "cameras.txt").write_text("1 NO_SUCH_MODEL 10 10 1 2 3\n")
    (bad / "images.txt").write_text("")
    (bad / "points3D.txt").write_text("")
    with pytest.raises(InputError, match="pycolmap cannot read"):
        colmap_scene(ColmapRequest(tmp_path / "bad", depth=binary_scene.root / "maps"))
    with pytest.raises(InputError, match="none of the model's 6 images"):
        colmap_scene(ColmapRequest(binary_scene.root, images=tmp_path / "empty", depth=binary_scene.root / "maps"))


def test_an_absent_image_fails_alone(binary_scene, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(binary_scene.root / "images", images)
    (images / "view_03.png").unlink()
    rec = Recorder()
    summary = colmap_scene(
        ColmapRequest(
            binary_scene.root,
            images=images,
            out=tmp_path / "o",
            depth=binary_scene.root / "maps",
            depth_kind="disparity",
            normals="none",
        ),
        rec,
    )
    assert summary.done == 5 and summary.failed == 1
    assert "view_03.png: listed in" in summary.failures[0].error and "but absent" in summary.failures[0].error


def test_skip_existing_and_shards(binary_scene, binary_run, tmp_path):
    import shutil

    out = tmp_path / "o"
    shutil.copytree(binary_run[2], out)
    summary, _ = run(binary_scene, out, world_normals=True, skip_existing=True)
    assert summary.skipped == len(binary_scene.names) and summary.done == 0
    assert (out / "fused.ply").is_file()
    summary, _ = run(binary_scene, out, skip_existing=True)  # another option: redone, and said why
    assert summary.done == len(binary_scene.names) and summary.redone == summary.done

    from lotus_cli.scale.shard import Shard, select

    rec = Recorder()
    request = ColmapRequest(
        binary_scene.root, out=tmp_path / "s", depth=binary_scene.root / "maps", depth_kind="disparity", normals="none"
    )
    summary = colmap_scene(request, rec, lambda items: select(items, Shard(0, 2)))
    assert 0 < summary.done < len(binary_scene.names)
    assert not (tmp_path / "s/fused.ply").exists() and any("no fusion" in n for n in rec.notes)
    assert json.loads((tmp_path / "s/lotus-colmap/scene.json").read_text())["complete"] is False


def test_missing_pycolmap_is_a_usage_error(binary_scene, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycolmap", None)
    with pytest.raises(UsageError) as e:
        colmap_scene(ColmapRequest(binary_scene.root, depth=binary_scene.root / "maps"))
    assert "pip install" in e.value.hint


def test_option_checks_before_any_model(tmp_path):
    with pytest.raises(UsageError, match="--min-views"):
        colmap_scene(ColmapRequest(tmp_path, min_views=9, neighbours=8))
    with pytest.raises(UsageError, match="--normals"):
        colmap_scene(ColmapRequest(tmp_path, normals="depth"))
    with pytest.raises(UsageError, match="--depth .*no such folder"):
        colmap_scene(ColmapRequest(tmp_path, depth=tmp_path / "nope"))


def test_cli_with_a_tiny_checkpoint(tmp_path, checkpoints):
    from typer.testing import CliRunner

    from lotus_cli.cli import app
    from lotus_cli.run.results import RECORD_FIELDS

    scene = build_scene(tmp_path / "room", views=4, size=(64, 48), points_per_view=120)
    args = ["colmap", str(scene.root), "-o", str(tmp_path / "o"), "--json", "--min-points", "5"]
    args += ["-m", str(checkpoints[("depth", "d")]), "--normal-model", str(checkpoints[("normal", "d")])]
    args += ["--processing-res", "64", "--world-normals"]
    r = CliRunner().invoke(app, args)
    records = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 4, r.output
    for rec in records:
        assert tuple(rec) == RECORD_FIELDS and rec["kind"] == "depth"
        if rec["status"] == "done":  # a random network's map may be refused: then it says so, writing nothing
            for name in ("depth_png", "depth_npy", "normals", "normals_png", "normals_world", "json"):
                assert Path(rec["outputs"][name]).is_file(), name
        else:
            assert "alignment refused" in rec["error"]
            assert not (tmp_path / "o/mono_depth" / f"{rec['key']}_aligned.npy").exists()
    assert r.exit_code == (1 if any(rec["status"] == "failed" for rec in records) else 0)
    assert (tmp_path / "o/lotus-colmap/scene.json").is_file()


def test_resized_images_and_a_rerun_fuse_alike(binary_scene, tmp_path):
    """Images at half the model's size (nerfstudio's images_2): the camera is rescaled with them, also for views
    a --skip-existing rerun keeps, so fusion finds the same agreement."""
    from PIL import Image

    half = tmp_path / "images_2"
    half.mkdir()
    for name in binary_scene.names:
        im = Image.open(binary_scene.root / "images" / name)
        im.resize((im.width // 2, im.height // 2), Image.BILINEAR).save(half / name)
    out = tmp_path / "o"
    summary, _ = run(binary_scene, out, images=half)
    assert summary.done == len(binary_scene.names)
    first = json.loads((out / "lotus-colmap/scene.json").read_text())["fusion"]["kept"]
    dist = surface_distance(read_ply_points(out / "fused.ply")["points"].astype(np.float64))
    assert first > 500 and np.percentile(dist, 99) < 2 * FUSED_P99
    assert np.load(out / "mono_depth/view_00_aligned.npy").shape == (36, 48)
    summary, _ = run(binary_scene, out, images=half, skip_existing=True)
    assert summary.skipped == len(binary_scene.names)
    assert json.loads((out / "lotus-colmap/scene.json").read_text())["fusion"]["kept"] == first


def test_exr_depth_in_the_stated_units(binary_scene, tmp_path):
    with pytest.raises(UsageError, match="--exr"):
        run(binary_scene, tmp_path / "o", exr=True, fuse=False)
    summary, _ = run(binary_scene, tmp_path / "o", exr=True, scene_units="m", fuse=False)
    assert summary.done == len(binary_scene.names)
    values, info = read_depth_map(tmp_path / "o/depth_exr/view_02.exr")  # its header says metric, in m
    npy = np.load(tmp_path / "o/mono_depth/view_02_aligned.npy")
    assert info["per_metre"] == 1.0 and "from its EXR header" in info["units"]
    np.testing.assert_array_equal(values[npy > 0], npy[npy > 0])
    assert "m (--scene-units)" in sidecar(tmp_path / "o", "view_02")["alignment"]["units"]


def test_an_existing_transforms_json_gains_depth_paths(binary_scene, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    frames = [
        {"file_path": f"images/{n}", "transform_matrix": np.eye(4).tolist(), "mine": i}
        for i, n in enumerate(binary_scene.names)
    ]
    (out / "transforms.json").write_text(
        json.dumps({"camera_model": "OPENCV", "frames": frames, "ply_file_path": "x.ply"})
    )
    summary, _ = run(binary_scene, out, fuse=False)
    meta = json.loads((out / "transforms.json").read_text())
    assert meta["camera_model"] == "OPENCV" and meta["ply_file_path"] == "x.ply"
    for i, f in enumerate(meta["frames"]):
        assert f["mine"] == i and f["transform_matrix"] == np.eye(4).tolist()
        assert f["depth_file_path"] == f"depths/{Path(binary_scene.names[i]).stem}.png"


class StandIn:
    """The network's stand-in: the true map of the view whose image it is given (disparity under an unknown
    scale and shift, or normals in Lotus's frame), found by the image's bytes."""

    def __init__(self, task, maps, images):
        self.task, self.kind = task, "disparity" if task == "depth" else "normal"
        self.source, self.device, self.dtype, self.family = f"stand-in-{task}", "cpu", "float32", "d"
        self.maps = {images[k].tobytes(): m for k, m in maps.items()}

    latent_factor = 8

    def predict_batch(self, images, opts):
        from lotus_cli.model.predictor import Prediction

        return [Prediction(self.maps[rgb.tobytes()], rgb.shape[:2]) for rgb in images]


def test_the_model_path_with_stand_in_predictors(binary_scene, tmp_path, monkeypatch):
    from PIL import Image

    import lotus_cli.run.colmap as colmap_run

    keys = [Path(n).stem for n in binary_scene.names]
    images = {k: np.asarray(Image.open(binary_scene.root / "images" / f"{k}.png").convert("RGB")) for k in keys}
    depth = {k: np.load(binary_scene.root / "maps" / f"{k}.npy") for k in keys}
    normal = {k: np.load(binary_scene.root / "nmaps" / f"{k}.npy") for k in keys}
    models = {"depth": StandIn("depth", depth, images), "normal": StandIn("normal", normal, images)}
    monkeypatch.setattr(colmap_run, "load_predictor", lambda ref, task, *a, **k: models[task])
    summary = colmap_scene(ColmapRequest(binary_scene.root, out=tmp_path / "o", world_normals=True, fuse=False))
    assert summary.done == len(keys)
    for k, truth, n_truth in zip(keys, binary_scene.depth, binary_scene.normals_world):
        got = np.load(tmp_path / "o/mono_depth" / f"{k}_aligned.npy")
        assert np.median(np.abs(got - truth) / truth) < 0.01
        assert np.median(angular_error(np.load(tmp_path / "o/normals_world" / f"{k}.npy"), n_truth)) < 1.0
    side = sidecar(tmp_path / "o", keys[0])
    assert side["model"] == "jingheya/lotus-depth-d-v2-0-disparity" and side["normal_model"].endswith("normal-d-v1-1")
    # a rerun that keeps every image loads no model
    loaded = []
    monkeypatch.setattr(colmap_run, "load_predictor", lambda ref, task, *a, **k: loaded.append(task) or models[task])
    request = ColmapRequest(binary_scene.root, out=tmp_path / "o", world_normals=True, skip_existing=True)
    assert colmap_scene(request).skipped == len(keys) and loaded == []
    (tmp_path / "o/mono_depth/view_03_aligned.npy").unlink()
    summary = colmap_scene(request)
    assert (summary.skipped, summary.done, loaded) == (len(keys) - 1, 1, ["depth", "normal"])


def test_an_image_below_the_model_minimum_fails_named(binary_scene, tmp_path, monkeypatch):
    import lotus_cli.run.colmap as colmap_run

    monkeypatch.setattr(colmap_run, "load_predictor", lambda *a, **k: StandIn("depth", {}, {}))
    req = ColmapRequest(binary_scene.root, out=tmp_path / "o", normals="none", processing_res=4, fuse=False)
    summary = colmap_scene(req)
    assert summary.failed == len(binary_scene.names)
    error = summary.failures[0].error
    assert error.startswith(str(binary_scene.root / "images" / binary_scene.names[0])) and "minimum of 8 px" in error
