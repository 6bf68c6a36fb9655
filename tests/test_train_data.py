"""Training data: Hypersim distance -> planar depth, the VKITTI crop, the generic folder format, flips,
per-batch mixing and the synthetic scenes the debug preset trains on."""

import json

import numpy as np
import pytest
from PIL import Image

from lotus_cli.errors import UsageError
from lotus_cli.geometry.camera import Intrinsics, angular_error, normals_from_depth
from lotus_cli.model.synthetic import render_scene, write_synthetic_dataset
from lotus_cli.train import data as D


def test_hypersim_distance_to_planar_depth_on_a_fronto_parallel_plane():
    h, w, f = 4, 6, 5.0
    u = np.arange(w) - (w - 1) / 2  # pixel centres: -2.5 .. 2.5
    v = np.arange(h) - (h - 1) / 2
    distance = 2.0 * np.sqrt(u[None] ** 2 + v[:, None] ** 2 + f**2) / f  # a plane at z = 2
    np.testing.assert_allclose(D.hypersim_planar_depth(distance, f), 2.0, rtol=1e-6)
    # corner pixel by hand: distance 3 at (u, v) = (2.5, 1.5) -> z = 3 * 5 / sqrt(6.25 + 2.25 + 25)
    d = np.ones((h, w)) * 3.0
    assert D.hypersim_planar_depth(d, f)[0, 0] == pytest.approx(15 / np.sqrt(33.5), rel=1e-6)
    assert D.hypersim_planar_depth(np.ones((768, 1024)))[384, 512] == pytest.approx(1.0, abs=1e-6)


def test_face_camera_turns_normals_that_point_away():
    """The authors' rule (GeoWizard's align_normals): flip n where n . K^-1 (u, v, 1) < 0, principal point
    (W/2, H/2), Lotus normals against OpenCV rays."""
    f = 10.0
    n = np.zeros((4, 6, 3), np.float32)
    n[..., 2] = -1  # Lotus z points to the camera: -1 faces away everywhere
    np.testing.assert_array_equal(D.face_camera(n, f)[..., 2], 1)
    n = np.zeros((4, 6, 3), np.float32)
    n[..., 0] = 1  # Lotus x left; rays at u = 0 .. 5, cx = 3: u - cx = -3 .. 2
    got = D.face_camera(n, f)[0, :, 0]
    np.testing.assert_array_equal(got, [-1, -1, -1, 1, 1, 1])  # u < 3: n . ray = (u - 3) / f < 0 -> turned
    tilted = np.array([0.6, 0.0, 0.8], np.float32)  # facing the camera, leaning left
    ray = np.array([(5 - 3) / f, (1 - 2) / f, 1.0])
    assert tilted @ ray > 0 and (D.face_camera(np.broadcast_to(tilted, (4, 6, 3)).copy(), f)[1, 5] == tilted).all()


def test_bottom_centre_crop():
    a = np.arange(5 * 7).reshape(5, 7)
    c = D.bottom_centre_crop(a, 3, 4)  # left offset (7 - 4) // 2 = 1, bottom 3 rows
    np.testing.assert_array_equal(c, a[2:5, 1:5])
    rgb = np.zeros((375, 1242, 3))
    assert D.bottom_centre_crop(rgb, *D.VKITTI_CROP).shape == (352, 1216, 3)
    with pytest.raises(ValueError):
        D.bottom_centre_crop(a, 6, 4)


def test_folder_format_round_trip(tmp_path):
    for sub in ("rgb", "depth", "normal", "mask"):
        (tmp_path / sub).mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb" / "a.png")
    depth_mm = np.full((6, 8), 2500, np.uint16)
    depth_mm[0, 0] = 0  # no measurement
    Image.fromarray(depth_mm).save(tmp_path / "depth" / "a.png")
    n_gl = np.zeros((6, 8, 3), np.float32)
    n_gl[..., 0] = 1.0  # OpenGL x right
    np.save(tmp_path / "normal" / "a.npy", n_gl)
    mask = np.full((6, 8), 255, np.uint8)
    mask[5, 7] = 0
    Image.fromarray(mask).save(tmp_path / "mask" / "a.png")
    (tmp_path / "lotus_data.json").write_text(json.dumps({"depth_scale": 1000, "normal_frame": "opengl"}))
    s = D.FolderData(tmp_path).load(0)
    np.testing.assert_array_equal(s["rgb"], rgb)
    assert s["depth"][1, 1] == pytest.approx(2.5) and s["depth"][0, 0] == 0
    assert not s["valid"][0, 0] and not s["valid"][5, 7] and s["valid"].sum() == 46
    np.testing.assert_allclose(s["normal"][2, 2], [-1, 0, 0])  # Lotus x points left
    small = D.FolderData(tmp_path, size=(3, 4)).load(0)
    assert small["rgb"].shape == (3, 4, 3) and small["valid"].shape == (3, 4)


def test_a_sample_without_the_tasks_map_is_refused(tmp_path):
    write_synthetic_dataset(tmp_path, 2, (8, 8), holes=False)
    for p in (tmp_path / "depth").iterdir():
        p.unlink()
    ds = D.FolderData(tmp_path)
    assert ds.load(0)["depth"] is None and D.to_tensors(ds.load(0), False)["depth"].abs().sum() == 0
    plan = D.BatchPlan((2,), (1.0,), global_batch=2)
    assert D.StepBatches([ds], plan, 1, task="normal")[0]["normal"].shape == (2, 3, 8, 8)
    with pytest.raises(UsageError, match="has no depth map"):
        D.StepBatches([ds], plan, 1, task="depth")[0]


def test_flip_mirrors_and_negates_normal_x():
    s = render_scene(8, 10, seed=3)
    s["valid"] = np.ones((8, 10), bool)
    a, b = D.to_tensors(s, False), D.to_tensors(s, True)
    assert (a["rgb"].flip(-1) == b["rgb"]).all() and (a["depth"].flip(-1) == b["depth"]).all()
    assert (a["normal"][0].flip(-1) == -b["normal"][0]).all() and (a["normal"][1:].flip(-1) == b["normal"][1:]).all()
    assert a["rgb"].min() >= -1 and a["rgb"].max() <= 1


def test_rendered_scene_normals_agree_with_its_depth():
    s = render_scene(48, 64, seed=1)
    f = 0.9 * 64
    n = normals_from_depth(s["depth"], Intrinsics(f, f, 31.5, 23.5, 64, 48))  # OpenCV frame
    lotus = n * np.array([-1, -1, -1], np.float32)  # OpenCV -> Lotus: every axis flips
    err = angular_error(lotus, s["normal"])
    assert np.nanmedian(err) < 1.0  # exact planes and spheres; edges excluded by the median
    assert np.isfinite(s["depth"]).all() and (s["depth"] > 0).all()


def test_batch_plan_is_deterministic_mixes_and_splits_over_ranks(tmp_path):
    write_synthetic_dataset(tmp_path / "a", 6, (8, 8), seed=1)
    write_synthetic_dataset(tmp_path / "b", 3, (12, 12), seed=2, holes=False)
    ds = [D.FolderData(tmp_path / "a"), D.FolderData(tmp_path / "b")]
    plan = D.BatchPlan((6, 3), (0.9, 0.1), global_batch=4, seed=7)
    picks = [plan.pick(s, 0)[0] for s in range(400)]
    assert picks == [plan.pick(s, 0)[0] for s in range(400)]
    assert 0.84 < picks.count(0) / 400 < 0.96
    whole = D.StepBatches(ds, plan, accum=1)
    halves = [D.StepBatches(ds, plan, accum=1, rank=r, world=2) for r in (0, 1)]
    for k in range(5):
        full, parts = whole[k], [h[k] for h in halves]
        for key in full:
            assert (np.concatenate([p[key] for p in parts]) == full[key].numpy()).all()
    only_b = D.BatchPlan((6, 3), (0.0, 1.0), global_batch=2)
    assert {only_b.pick(s, 0)[0] for s in range(50)} == {1}
    with pytest.raises(UsageError, match="does not split"):
        D.StepBatches(ds, D.BatchPlan((6, 3), (1, 1), global_batch=3), 1, 0, 2)


def test_open_data_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown dataset"):
        D.open_data(f"nyu={tmp_path}")
    with pytest.raises(UsageError, match="no rgb/ folder"):
        D.open_data(f"folder={tmp_path}")
    with pytest.raises(UsageError, match="split file"):
        D.open_data(f"hypersim={tmp_path}")
    with pytest.raises(UsageError, match="SceneXX"):
        D.open_data(f"vkitti={tmp_path}")


def test_vkitti_reader_on_fake_frames_trains_sky_as_farthest(tmp_path):
    """The authors' Virtual KITTI rules: both cameras; valid 1e-5 < d < 80 m; sky d >= 80 m kept in the loss
    as the farthest value; a pixel without depth holds 1/0 clipped to +1 and stays out of the loss."""
    import cv2
    import torch

    from lotus_cli.train.options import StepOptions
    from lotus_cli.train.step import annotation, loss_mask

    for cam in ("Camera_0", "Camera_1"):
        rgb_dir = tmp_path / "Scene02" / "clone" / "frames" / "rgb" / cam
        dep_dir = tmp_path / "Scene02" / "clone" / "frames" / "depth" / cam
        rgb_dir.mkdir(parents=True)
        dep_dir.mkdir(parents=True)
        cv2.imwrite(str(rgb_dir / "rgb_00000.jpg"), np.full((375, 1242, 3), 100, np.uint8))
        depth_cm = np.tile(np.linspace(500, 5000, 1242).astype(np.uint16), (375, 1))  # 5 .. 50 m, left to right
        depth_cm[-1, 13] = 65535  # sky (655.35 m); the crop's left edge is column (1242 - 1216) // 2 = 13
        depth_cm[-1, 14] = 0  # no measurement
        cv2.imwrite(str(dep_dir / "depth_00000.png"), depth_cm)
    ds = D.open_data(f"vkitti={tmp_path}")
    assert len(ds) == 2 and {k[0].parent.name for k in ds.items} == {"Camera_0", "Camera_1"}
    s = ds.load(0)
    assert s["rgb"].shape == (352, 1216, 3) and s["depth"].shape == (352, 1216)
    assert s["depth"][0, 0] == pytest.approx(5 + 45 * 13 / 1241, abs=0.01)
    assert s["depth"][-1, 0] == pytest.approx(655.35) and s["sky"][-1, 0] and not s["valid"][-1, 0]
    assert s["depth"][-1, 1] == 0 and not s["sky"][-1, 1] and not s["valid"][-1, 1]
    assert s["valid"].sum() == 352 * 1216 - 2 and s["sky"].sum() == 1
    n = s["normal"][100, 600]  # a wall receding to the right faces the camera and the right (Lotus x < 0)
    assert np.linalg.norm(n) == pytest.approx(1, abs=1e-5) and n[2] > 0.5 and n[0] < 0 and abs(n[1]) < 1e-5
    assert (s["normal"][-1, 0] == 0).all()  # no normal in the sky
    batch = {k: v[None] for k, v in D.to_tensors(s, False).items()}
    anno, mask = annotation(batch, StepOptions()), loss_mask(batch, StepOptions())
    assert anno[0, 0, -1, 0] == -1.0 and mask[0, 0, -1, 0]  # sky: farthest, trained
    assert anno[0, 0, -1, 1] == 1.0 and not mask[0, 0, -1, 1]  # no depth: 1/0 -> +1, not trained
    assert mask.sum() == 352 * 1216 - 1
    normal_mask = loss_mask(batch, StepOptions(task="normal"))
    assert not normal_mask[0, 0, -1, 0] and not normal_mask[0, 0, -1, 1]
    assert torch.equal(D.to_tensors(s, True)["sky"], batch["sky"][0].flip(-1))


def test_hypersim_reader_on_fake_frames(tmp_path):
    h5py = pytest.importorskip("h5py")
    rows = ["scene_name,camera_name,frame_id,included_in_public_release,exclude_reason,split_partition_name"]
    distance = np.full((768, 1024), 3.0, np.float16)
    normal = np.zeros((768, 1024, 3), np.float16)
    normal[..., 0] = 1  # Hypersim camera frame: x right
    normal[:8] = 0  # no usable normal: still valid, as the authors train Hypersim without a mask
    for i, nan in enumerate([False, True]):
        img = tmp_path / "ai_001_001" / "images"
        (img / "scene_cam_00_final_preview").mkdir(parents=True, exist_ok=True)
        (img / "scene_cam_00_geometry_hdf5").mkdir(parents=True, exist_ok=True)
        preview = img / "scene_cam_00_final_preview" / f"frame.{i:04d}.tonemap.jpg"
        Image.fromarray(np.full((768, 1024, 3), 90, np.uint8)).save(preview)
        d = distance.copy()
        if nan:
            d[10, 10] = np.nan  # a frame with any NaN depth is dropped
        for name, arr in (("depth_meters", d), ("normal_cam", normal)):
            with h5py.File(img / "scene_cam_00_geometry_hdf5" / f"frame.{i:04d}.{name}.hdf5", "w") as f:
                f["dataset"] = arr
        rows.append(f"ai_001_001,cam_00,{i},True,,train")
    rows.append("ai_001_001,cam_00,7,True,,test")
    (tmp_path / "metadata_images_split_scene_v1.csv").write_text("\n".join(rows) + "\n")
    ds = D.open_data(f"hypersim={tmp_path}")
    assert len(ds) == 1 and (tmp_path / "lotus_nan_free_train.txt").is_file()
    s = ds.load(0)
    assert s["rgb"].shape == (576, 768, 3) and s["depth"].shape == (576, 768)
    corner = 3.0 * 886.81 / np.sqrt(511.5**2 + 383.5**2 + 886.81**2)  # planar depth of the corner ray
    assert s["depth"][0, 0] == pytest.approx(corner, rel=2e-3)
    assert s["depth"].max() == pytest.approx(3.0, rel=1e-3)
    np.testing.assert_allclose(s["normal"][50, 5], [-1, 0, 0])  # Lotus x points left
    # right of the centre the ray has x > 0 (OpenCV): a normal pointing right there faces away and is turned
    np.testing.assert_allclose(s["normal"][50, 700], [1, 0, 0])
    assert s["valid"].all() and s.get("sky") is None


def test_every_data_name_the_options_accept_has_a_reader():
    from lotus_cli.train.options import DATASETS

    assert set(DATASETS) == set(D.READERS)
