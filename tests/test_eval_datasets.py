"""Dataset loaders on tiny fixture sets written here in each format (folder and tar), and their errors.

The writers (``write_depth_set``, ``write_normal_set``) are shared with test_eval_cli.py.
"""

import io
import pickle
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from lotus_cli.errors import InputError, UsageError
from lotus_cli.evaluate import datasets as D
from lotus_cli.io.outputs import encode_png as _png

# (h, w) of the fixture frames: NYUv2's Eigen crop needs 640x480, KITTI's benchmark crop at least 1216x352
SIZES = {"nyuv2": (480, 640), "kitti": (375, 1242), "scannet": (30, 40), "eth3d": (30, 40), "diode": (30, 40)}


def smooth_depth(h: int, w: int, seed: int, lo: float = 0.8, hi: float = 6.0) -> np.ndarray:
    """A smooth positive depth map [h, w] float64 in metres with a few holes (0)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    d = lo + (hi - lo) * (0.5 + 0.5 * np.sin(xx / w * 3 + seed) * np.cos(yy / h * 2))
    d[rng.random((h, w)) < 0.05] = 0.0
    return d


def _jpg(a: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", a[:, :, ::-1])
    assert ok
    return buf.tobytes()


def _npy(a: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.save(f, a)
    return f.getvalue()


def _rgb(h, w, seed):
    return np.random.default_rng(seed + 100).integers(0, 256, (h, w, 3), dtype=np.uint8)


def depth_files(name: str, n: int) -> tuple[dict[str, bytes], list[str], list[np.ndarray]]:
    """({relative path: bytes}, split lines, decoded GT depth per sample) of a tiny set in Marigold's format."""
    h, w = SIZES[name]
    files, lines, gts = {}, [], []
    for i in range(n):
        d = smooth_depth(h, w, i)
        if name == "nyuv2":
            scene = f"test/kitchen_000{i}"
            mm = np.rint(d * 1000).astype(np.uint16)
            files[f"{scene}/rgb_000{i}.png"] = _png(_rgb(h, w, i))
            files[f"{scene}/depth_000{i}.png"] = _png(mm)
            files[f"{scene}/filled_000{i}.png"] = _png(np.maximum(mm, 500).astype(np.uint16))
            lines.append(f"{scene}/rgb_000{i}.png {scene}/depth_000{i}.png {scene}/filled_000{i}.png")
            gts.append(mm / 1000.0)
        elif name == "kitti":
            drive = "2011_09_26/2011_09_26_drive_0002_sync"
            q = np.rint(d * 256 * 10).astype(np.uint16)  # up to 60 m
            files[f"{drive}/image_02/data/000000000{i}.png"] = _png(_rgb(h, w, i))
            files[f"gt/{drive}/000000000{i}.png"] = _png(q)
            lines.append(f"{drive}/image_02/data/000000000{i}.png gt/{drive}/000000000{i}.png 721.5377")
            gts.append(q / 256.0)
        elif name == "scannet":
            mm = np.rint(d * 1000).astype(np.uint16)
            files[f"scene0{i}/color/00000{i}.jpg"] = _jpg(_rgb(h, w, i))
            files[f"scene0{i}/depth/00000{i}.png"] = _png(mm)
            lines.append(f"scene0{i}/color/00000{i}.jpg scene0{i}/depth/00000{i}.png")
            gts.append(mm / 1000.0)
        elif name == "eth3d":
            f = d.astype("<f4")
            f[0, :3] = np.inf  # ETH3D marks no measurement with inf
            files[f"rgb/office/images/dslr_images/DSC_000{i}.JPG"] = _jpg(_rgb(h, w, i))
            files[f"depth/office/ground_truth_depth/dslr_images/DSC_000{i}.JPG"] = f.tobytes()
            lines.append(
                f"rgb/office/images/dslr_images/DSC_000{i}.JPG "
                f"depth/office/ground_truth_depth/dslr_images/DSC_000{i}.JPG"
            )
            gts.append(np.where(np.isinf(f), 0.0, f).astype(np.float64))
        elif name == "diode":
            base = f"val/indoors/scene_0001/scan_0001/00001_0001_indoors_000_00{i}"
            files[f"{base}.png"] = _png(_rgb(h, w, i))
            files[f"{base}_depth.npy"] = _npy(d.astype(np.float32)[:, :, None])
            files[f"{base}_depth_mask.npy"] = _npy((d > 0).astype(np.float32))
            lines.append(f"{base}.png {base}_depth.npy {base}_depth_mask.npy")
            gts.append(d.astype(np.float32).astype(np.float64))
    if name == "kitti":
        lines.insert(1, "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000099.png None 721.5377")
    return files, lines, gts


def write_depth_set(root: Path, name: str, n: int = 2, tar: bool = False) -> tuple[Path, list[np.ndarray]]:
    """A tiny Marigold-format set under ``root``: the archive (members './'-prefixed, as Marigold's) or the
    unpacked folder, with the split list beside it. Returns (path to pass to --dataset, GT depths)."""
    spec = D.DEPTH_SETS[name]
    files, lines, gts = depth_files(name, n)
    root.mkdir(parents=True, exist_ok=True)
    (root / spec.split).write_text("\n".join(lines) + "\n")
    if tar:
        with tarfile.open(root / spec.archive, "w") as t:
            for rel, data in files.items():
                info = tarfile.TarInfo("./" + rel)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    else:
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
    return root, gts


def unit_normals(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = rng.normal(size=(h, w, 3)) + np.array([0, 0, 2.0])
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def write_normal_set(
    root: Path, name: str, n: int = 2, h: int = 24, w: int = 32, split: bool = True
) -> tuple[Path, list[tuple[np.ndarray, np.ndarray]]]:
    """A tiny DSINE-format set; returns (folder, [(decoded GT normals, valid mask)])."""
    spec = D.NORMAL_SETS[name]
    root.mkdir(parents=True, exist_ok=True)
    out, lines = [], []
    for i in range(n):
        rel = f"scene{i}/00000{i}_img.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(_rgb(h, w, i)))
        nrm = unit_normals(h, w, i)
        base = root / rel.replace("_img.png", "")
        if spec.gt == "png":
            q = np.clip((nrm + 1) / 2 * 255, 0, 255).astype(np.uint8)
            q[:2] = 0  # black = no ground truth
            base.with_name(base.name + "_normal.png").write_bytes(_png(q))
            gt, valid = q / 255.0 * 2 - 1, q.sum(-1) > 0
        elif spec.gt == "exr":
            import OpenEXR

            f = nrm.astype(np.float32)
            f[:2] = 0
            hdr = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
            with OpenEXR.File(hdr, {"RGB": f}) as e:
                e.write(str(base.with_name(base.name + "_normal.exr")))
            gt, valid = f, np.linalg.norm(f, axis=-1) > 0.5
        else:  # OASIS: the ROI box rows 3..h-3, cols 2..w-5 inclusive
            y0, y1, x0, x1 = 3, h - 3, 2, w - 5
            roi = nrm[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32)
            roi[0, 0] = 0
            with open(base.with_name(base.name + "_normal.pkl"), "wb") as fh:
                pickle.dump({"min_y": y0, "max_y": y1, "min_x": x0, "max_x": x1, "normal": roi}, fh)
            gt = np.zeros((h, w, 3))
            gt[y0 : y1 + 1, x0 : x1 + 1] = roi * [-1, -1, 1]
            valid = np.zeros((h, w), bool)
            valid[y0 : y1 + 1, x0 : x1 + 1] = True
            valid[y0, x0] = False
        lines.append(rel)
        out.append((gt, valid))
    if split:
        (root / spec.split).parent.mkdir(parents=True, exist_ok=True)
        (root / spec.split).write_text("\n".join(lines) + "\n")
    return root, out


# ----------------------------------------------------------------------------------------- depth


@pytest.mark.parametrize("tar", [False, True], ids=["folder", "tar"])
@pytest.mark.parametrize("name", ["nyuv2", "kitti", "scannet", "eth3d", "diode"])
def test_depth_sets_decode_ground_truth_and_masks(tmp_path, name, tar):
    path, gts = write_depth_set(tmp_path / name, name, n=2, tar=tar)
    ds = D.open_dataset("depth", name, path)
    assert isinstance(ds.store, D.TarStore) == tar
    assert len(ds.samples) == 2 and ds.skipped == (1 if name == "kitti" else 0)
    spec = ds.spec
    for s, gt in zip(ds.samples, gts):
        item = ds.load(s)
        lo, hi = spec.depth_range
        expect_valid = (gt > lo) & (gt < hi) if name != "diode" else gt > 0
        if name == "kitti":
            gt, expect_valid = gt[375 - 352 :, 13 : 13 + 1216], expect_valid[375 - 352 :, 13 : 13 + 1216]
            win = np.zeros_like(expect_valid)
            win[int(0.3324324 * 352) : int(0.91351351 * 352), int(0.0359477 * 1216) : int(0.96405229 * 1216)] = True
            expect_valid &= win
        if name == "nyuv2":
            win = np.zeros_like(expect_valid)
            win[45:471, 41:601] = True
            expect_valid &= win
        assert item.rgb.dtype == np.uint8 and item.rgb.shape == (*gt.shape, 3)
        np.testing.assert_allclose(item.gt, gt, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(item.valid, expect_valid)
        assert expect_valid.sum() > 0.3 * expect_valid.size * (0.4 if name == "kitti" else 1)
    assert (
        ds.samples[0].key
        == {
            "nyuv2": "test/kitchen_0000/rgb_0000",
            "kitti": "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000000",
            "scannet": "scene00/color/000000",
            "eth3d": "rgb/office/images/dslr_images/DSC_0000",
            "diode": "val/indoors/scene_0001/scan_0001/00001_0001_indoors_000_000",
        }[name]
    )


def test_the_archive_can_be_passed_itself_and_the_split_given_elsewhere(tmp_path):
    path, _ = write_depth_set(tmp_path / "n", "scannet", tar=True)
    split = tmp_path / "lists" / "mine.txt"
    split.parent.mkdir()
    (path / D.DEPTH_SETS["scannet"].split).rename(split)
    with pytest.raises(InputError, match="no split list scannet_val_sampled_list_800_1.txt.*--split scannet=FILE"):
        D.open_dataset("depth", "scannet", path / "scannet_val_sampled_800_1.tar")
    ds = D.open_dataset("depth", "scannet", path / "scannet_val_sampled_800_1.tar", split)
    assert len(ds.samples) == 2 and ds.split_path == str(split)


def test_missing_and_malformed_files_name_the_file_and_the_layout(tmp_path):
    with pytest.raises(InputError, match="no such file or folder.*nyu_labeled_extracted.tar"):
        D.open_dataset("depth", "nyuv2", tmp_path / "nope")
    path, _ = write_depth_set(tmp_path / "s", "scannet")
    (path / "scene01/depth/000001.png").unlink()
    (path / "scene00/depth/000000.png").write_bytes(_png(_rgb(30, 40, 0)))  # an RGB image as depth
    ds = D.open_dataset("depth", "scannet", path)
    with pytest.raises(InputError, match=r"scene00/depth/000000.png: uint8 \(30, 40, 3\), not a single-channel"):
        ds.load(ds.samples[0])
    with pytest.raises(InputError, match="scene01/depth/000001.png: cannot read.*expected ScanNet: Marigold's"):
        ds.load(ds.samples[1])
    (path / D.DEPTH_SETS["scannet"].split).write_text("only_one_column.jpg\n")
    with pytest.raises(InputError, match="line 1: 1 column.*'rgb depth'"):
        D.open_dataset("depth", "scannet", path)


def test_eth3d_depth_of_the_wrong_size_is_refused(tmp_path):
    path, _ = write_depth_set(tmp_path / "e", "eth3d", tar=True)
    ds = D.open_dataset("depth", "eth3d", path)
    ds.store.members[D._norm(ds.samples[0].gt)].size -= 4  # a truncated member: one float short
    with pytest.raises(InputError, match="1199 float32 values, not 30 x 40"):
        ds.load(ds.samples[0])


@pytest.mark.parametrize("mask_shape", [(30, 41), (29, 40)])
def test_a_diode_mask_of_another_shape_is_refused(tmp_path, mask_shape):
    """With the file and both shapes named, not numpy's broadcasting error."""
    path, _ = write_depth_set(tmp_path / "d", "diode", n=1)
    ds = D.open_dataset("depth", "diode", path)
    (path / ds.samples[0].extra).write_bytes(_npy(np.ones(mask_shape, np.float32)))
    with pytest.raises(
        InputError, match=rf"_depth_mask.npy: mask shape \({mask_shape[0]}, {mask_shape[1]}\) != depth \(30, 40\)"
    ):
        ds.load(ds.samples[0])


def test_nyu_frames_must_be_640x480_for_the_eigen_crop(tmp_path):
    path, _ = write_depth_set(tmp_path / "n", "nyuv2", n=1)
    rel = "test/kitchen_0000"
    (path / rel / "rgb_0000.png").write_bytes(_png(_rgb(48, 64, 0)))
    (path / rel / "depth_0000.png").write_bytes(_png(np.full((48, 64), 1000, np.uint16)))
    ds = D.open_dataset("depth", "nyuv2", path)
    with pytest.raises(InputError, match="64x48, not 640x480"):
        ds.load(ds.samples[0])


def test_unknown_names_and_bad_pairs_are_usage_errors():
    with pytest.raises(UsageError, match="unknown depth dataset 'nyu3'"):
        D.spec_for("depth", "nyu3")
    assert D.spec_for("normal", "iBims-1").name == "ibims" and D.spec_for("depth", "NYU").name == "nyuv2"
    with pytest.raises(UsageError, match="not NAME=PATH"):
        D.parse_pairs(["nyuv2"], "--dataset")


# ---------------------------------------------------------------------------------------- normals


@pytest.mark.parametrize("name", ["nyuv2", "ibims", "oasis"])
def test_normal_sets_decode_ground_truth(tmp_path, name):
    if D.NORMAL_SETS[name].gt == "exr":
        pytest.importorskip("OpenEXR", reason="EXR ground truth needs the OpenEXR package (the eval extra)")
    path, gts = write_normal_set(tmp_path / name, name)
    ds = D.open_dataset("normal", name, path)
    assert [s.key for s in ds.samples] == ["scene0/000000_img", "scene1/000001_img"]
    assert ds.split_path.endswith(D.NORMAL_SETS[name].split)
    for s, (gt, valid) in zip(ds.samples, gts):
        item = ds.load(s)
        np.testing.assert_allclose(item.gt, gt, atol=1e-6)
        np.testing.assert_array_equal(item.valid, valid)


def test_normal_set_without_split_list_uses_every_img_file(tmp_path):
    path, _ = write_normal_set(tmp_path / "sc", "scannet", n=3, split=False)
    ds = D.open_dataset("normal", "scannet", path)
    assert ds.split_path is None and len(ds.samples) == 3
    with pytest.raises(InputError, match="--split .*mine.txt: no such file"):  # a named list must exist
        D.open_dataset("normal", "scannet", path, tmp_path / "mine.txt")
    (path / "scene2/000002_normal.png").unlink()
    with pytest.raises(InputError, match="scene2/000002_normal.png: ground truth missing"):
        ds.load(ds.samples[2])


def test_oasis_pickles_may_not_run_code(tmp_path):
    path, _ = write_normal_set(tmp_path / "o", "oasis", n=1)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(path / "scene0/000000_normal.pkl", "wb") as fh:
        pickle.dump({"min_y": Evil()}, fh)
    ds = D.open_dataset("normal", "oasis", path)
    with pytest.raises(InputError, match="not an OASIS normal pickle.*refusing builtins.print"):
        ds.load(ds.samples[0])


def test_exr_without_openexr_asks_for_the_package(tmp_path, monkeypatch):
    path, _ = write_normal_set(tmp_path / "s", "nyuv2", n=1)
    (path / "scene0/000000_normal.exr").write_bytes(b"not read")
    monkeypatch.setitem(__import__("sys").modules, "OpenEXR", None)  # import OpenEXR -> ImportError
    with pytest.raises(UsageError, match="needs the OpenEXR package.*pip install OpenEXR"):
        D.read_exr(D.FolderStore(path), "scene0/000000_normal.exr")
