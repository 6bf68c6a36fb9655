"""`lotus eval`: oracle runs through the real loop, outputs read back, a tiny model end to end, usage errors."""

import csv
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.evaluate import datasets as D
from lotus_cli.evaluate.run import EvalOptions, FolderSource, evaluate
from lotus_cli.io.visualize import normal_to_uint16

from .test_eval_datasets import write_depth_set, write_normal_set

runner = CliRunner()
NYU_FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "rgbd" / "nyu"


def lotus(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_predictions(folder: Path, ds, maps: list[np.ndarray], fmt: str = "npy", sidecar: dict | None = None):
    for s, m in zip(ds.samples, maps):
        p = folder / f"{s.key}.{fmt}"
        p.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "npy":
            np.save(p, m.astype(np.float32))
        else:  # 16-bit grey PNG over the map's own range
            lo, hi = float(m.min()), float(m.max())
            cv2.imwrite(str(p), np.rint((m - lo) / (hi - lo) * 65535).astype(np.uint16))
        if sidecar is not None:
            p.with_name(p.name.split(".")[0] + ".json").write_text(json.dumps(sidecar))


def disparity(gt):
    return np.where(gt > 0, 1 / np.where(gt > 0, gt, 1), 0)


# ------------------------------------------------------------------------------------ oracle runs


@pytest.mark.parametrize("name,tar", [("nyuv2", False), ("kitti", True), ("diode", False)])
def test_oracle_depth_affine_in_depth_space_scores_perfectly(tmp_path, name, tar):
    path, gts = write_depth_set(tmp_path / "data", name, n=2, tar=tar)
    ds = D.open_dataset("depth", name, path)
    # KITTI predictions of the full frame are cropped like the image; the others are at the GT's size
    write_predictions(tmp_path / "pred", ds, [0.25 * g + 3.0 for g in gts])
    r = evaluate(ds, FolderSource(tmp_path / "pred", "depth"), EvalOptions("depth", alignment="depth"))
    assert r.alignment == "depth" and r.evaluated == 2 and not r.failed
    assert r.metrics["abs_rel"] < 1e-6 and r.metrics["rmse"] < 1e-5 and r.metrics["delta1"] == 1.0
    assert [rec["scale"] for rec in r.records] == pytest.approx([4.0, 4.0])
    assert [rec["shift"] for rec in r.records] == pytest.approx([-12.0, -12.0])


def test_oracle_disparity_via_sidecar_and_the_wrong_space_is_worse(tmp_path):
    path, gts = write_depth_set(tmp_path / "data", "scannet", n=2)
    ds = D.open_dataset("depth", "scannet", path)
    write_predictions(tmp_path / "pred", ds, [0.02 * disparity(g) + 0.1 for g in gts], sidecar={"kind": "disparity"})
    src = FolderSource(tmp_path / "pred", "depth")
    good = evaluate(ds, src, EvalOptions("depth"))
    assert good.alignment == "disparity"
    assert good.metrics["abs_rel"] < 1e-6 and good.metrics["delta1"] == 1.0
    bad = evaluate(ds, src, EvalOptions("depth", alignment="depth"))
    assert bad.metrics["abs_rel"] > 0.05  # a disparity map fitted as depth is far off


def test_oracle_16bit_png_predictions(tmp_path):
    path, gts = write_depth_set(tmp_path / "data", "eth3d", n=2, tar=True)
    ds = D.open_dataset("depth", "eth3d", path)
    write_predictions(tmp_path / "pred" / "eth3d", ds, [2.0 * g + 1 for g in gts], fmt="png")
    r = evaluate(ds, FolderSource(tmp_path / "pred", "depth"), EvalOptions("depth", "depth"))  # DIR/<dataset>/ is used
    assert r.evaluated == 2
    assert r.metrics["abs_rel"] < 1e-4 and r.metrics["delta1"] == 1.0  # 16-bit quantisation only


@pytest.mark.parametrize("name", ["nyuv2", "sintel"])
def test_oracle_normals_score_zero_degrees(tmp_path, name):
    if D.NORMAL_SETS[name].gt == "exr":
        pytest.importorskip("OpenEXR", reason="EXR ground truth needs the OpenEXR package (the eval extra)")
    path, gts = write_normal_set(tmp_path / "data", name)
    ds = D.open_dataset("normal", name, path)
    write_predictions(tmp_path / "pred", ds, [g for g, _ in gts])
    r = evaluate(ds, FolderSource(tmp_path / "pred", "normal"), EvalOptions("normal"))
    assert r.evaluated == 2
    assert r.metrics["mean"] < 1e-3 and r.metrics["median"] < 1e-3 and r.metrics["a5"] == 1.0
    # the same maps as 16-bit RGB PNGs (`lotus normal --format png16`): only the quantisation is left
    for s, (g, _) in zip(ds.samples, gts):
        p = tmp_path / "png16" / f"{s.key}.16bit.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), normal_to_uint16(g)[:, :, ::-1])
    q = evaluate(ds, FolderSource(tmp_path / "png16", "normal"), EvalOptions("normal"))
    assert q.evaluated == 2 and q.metrics["mean"] < 0.01 and q.metrics["a5"] == 1.0
    # mirrored in x: a real error the metrics must see (pooled over the valid pixels of both images)
    write_predictions(tmp_path / "flip", ds, [g * [-1, 1, 1] for g, _ in gts])
    f = evaluate(ds, FolderSource(tmp_path / "flip", "normal"), EvalOptions("normal"))
    g = np.concatenate([gt[v] for gt, v in gts])
    cos = (g * (g * [-1, 1, 1])).sum(-1) / (np.linalg.norm(g, axis=-1) ** 2)
    assert f.metrics["mean"] == pytest.approx(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean(), rel=1e-6)


def test_bad_prediction_files_fail_their_sample_only(tmp_path):
    path, gts = write_depth_set(tmp_path / "data", "scannet", n=3)
    ds = D.open_dataset("depth", "scannet", path)
    maps = [g + 1 for g in gts]
    maps[0][3, 3] = np.nan
    maps[1] = np.ones((2, 2, 2))  # not [H, W] or [H, W, 3]
    write_predictions(tmp_path / "pred", ds, maps)
    r = evaluate(ds, FolderSource(tmp_path / "pred", "depth"), EvalOptions("depth", alignment="depth"))
    assert [rec["status"] for rec in r.records] == ["failed", "failed", "ok"]
    assert "1 non-finite values" in r.records[0]["error"] and "shape (2, 2, 2)" in r.records[1]["error"]
    assert r.metrics["abs_rel"] < 1e-6  # the average is over the good sample


# ------------------------------------------------------------------------------------------- CLI


def test_cli_scores_predictions_writes_json_and_csv_and_reports_missing_ones(tmp_path):
    path, gts = write_depth_set(tmp_path / "data", "scannet", n=3)
    ds = D.open_dataset("depth", "scannet", path)
    write_predictions(tmp_path / "pred", ds, [0.5 * g + 1 for g in gts])
    (tmp_path / "pred" / f"{ds.samples[2].key}.npy").unlink()
    out = tmp_path / "out"
    r = lotus(
        "eval",
        "depth",
        "--predictions",
        tmp_path / "pred",
        "--dataset",
        f"scannet={path}",
        "--out",
        out,
        "--alignment",
        "depth",
    )
    assert r.exit_code == 1, r.output  # one sample had no prediction
    assert "no prediction for scene02/color/000002" in r.output and "ScanNet" in r.output
    res = json.loads((out / "results.json").read_text())
    d = res["datasets"]["scannet"]
    assert (d["evaluated"], d["failed"], d["alignment"]) == (2, 1, "depth")
    assert d["metrics"]["abs_rel"] < 1e-6 and d["metrics"]["delta1"] == 1.0
    assert res["predictions"] == str(tmp_path / "pred")
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    assert [row["status"] for row in rows] == ["ok", "ok", "failed"]
    assert float(rows[0]["scale"]) == pytest.approx(2.0) and float(rows[0]["abs_rel"]) < 1e-6


def test_cli_max_samples_and_a_missing_dataset_among_good_ones(tmp_path):
    path, gts = write_depth_set(tmp_path / "data", "scannet", n=3)
    ds = D.open_dataset("depth", "scannet", path)
    write_predictions(tmp_path / "pred", ds, [g + 1 for g in gts])
    r = lotus(
        "eval",
        "depth",
        "--predictions",
        tmp_path / "pred",
        "--dataset",
        f"scannet={path}",
        "--dataset",
        f"kitti={tmp_path / 'missing'}",
        "--max-samples",
        "1",
        "--out",
        tmp_path / "o",
        "--alignment",
        "depth",
    )
    assert r.exit_code == 1, r.output
    assert "kitti_eigen_split_test.tar" in r.output  # the message names the expected layout
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["datasets"]["scannet"]["evaluated"] == 1 and "kitti" in res["dataset_errors"]


def test_cli_maps_without_sidecar_need_alignment_stated(tmp_path):
    """Disparity maps without a sidecar were scored as depth (AbsRel far from 0): now nothing is scored until
    --alignment says what they are, and the alignment used (and why) is in the table and results.json."""
    path, gts = write_depth_set(tmp_path / "data", "scannet", n=2)
    ds = D.open_dataset("depth", "scannet", path)
    write_predictions(tmp_path / "pred", ds, [0.02 * disparity(g) + 0.1 for g in gts])
    r = lotus(
        "eval", "depth", "--predictions", tmp_path / "pred", "--dataset", f"scannet={path}", "--out", tmp_path / "o"
    )
    assert r.exit_code == 2, r.output
    assert "--alignment" in r.stderr and "depth or disparity" in r.stderr
    assert not (tmp_path / "o" / "results.json").exists()
    r = lotus(
        "eval",
        "depth",
        "--predictions",
        tmp_path / "pred",
        "--dataset",
        f"scannet={path}",
        "--out",
        tmp_path / "o",
        "--alignment",
        "disparity",
    )
    assert r.exit_code == 0, r.output
    assert "ScanNet (disparity)" in r.stderr and "disparity alignment (from --alignment)" in r.stderr
    d = json.loads((tmp_path / "o" / "results.json").read_text())["datasets"]["scannet"]
    assert (d["alignment"], d["alignment_source"]) == ("disparity", "--alignment")
    assert d["metrics"]["abs_rel"] < 1e-6
    # a sidecar that says so is enough, and named as the source
    for m in (tmp_path / "pred").rglob("*.npy"):
        m.with_name(m.name.split(".")[0] + ".json").write_text(json.dumps({"kind": "disparity"}))
    r = lotus(
        "eval", "depth", "--predictions", tmp_path / "pred", "--dataset", f"scannet={path}", "--out", tmp_path / "o2"
    )
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "o2" / "results.json").read_text())["datasets"]["scannet"]
    assert d["alignment"] == "disparity" and d["alignment_source"].startswith("sidecar ")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "nyu3=/x"], "unknown depth dataset 'nyu3'"),
        (["--dataset", "nyuv2"], "not NAME=PATH"),
        (["--dataset", "nyuv2=/x", "--model", "depth-d", "--predictions", "/tmp"], "exclude each other"),
        (["--dataset", "nyuv2=/x", "--save-predictions"], "needs --out"),
        (["--dataset", "nyuv2=/x", "--alignment", "affine"], "--alignment must be one of"),
        (["--dataset", "nyuv2=/x", "--dataset", "nyu=/y"], "--dataset nyuv2 given more than once"),
        (["--dataset", "nyuv2=/x", "--model", "depth-q"], "unknown model 'depth-q'"),
        (["--dataset", "nyuv2=/x", "--model", "normal-d"], "predicts normal, not depth"),
    ],
)
def test_cli_usage_errors_exit_2_before_any_work(args, message):
    r = lotus("eval", "depth", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_cli_tiny_normal_model_end_to_end(tmp_path, checkpoints):
    path, _ = write_normal_set(tmp_path / "data", "scannet", n=2)
    out = tmp_path / "out"
    r = lotus("eval", "normal", "--model", checkpoints[("normal", "d")], "--dataset", f"scannet={path}", "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "results.json").read_text())["datasets"]["scannet"]["metrics"]
    assert 0 < m["mean"] < 180 and 0 <= m["a30"] <= 1


@pytest.mark.skipif(not (NYU_FRAMES / "rgb_00000.jpg").is_file(), reason="needs ../shared/data/rgbd/nyu")
def test_cli_tiny_depth_model_on_three_real_nyu_frames(tmp_path, depth_d):
    """End to end over the three real NYUv2 frames (a tiny random model: no accuracy claim), then the saved
    predictions re-scored with --predictions give the same numbers."""
    data = tmp_path / "nyu"
    lines = []
    for i in ("00000", "00050", "00100"):
        (data / "test" / "room").mkdir(parents=True, exist_ok=True)
        shutil.copy(NYU_FRAMES / f"rgb_{i}.jpg", data / "test" / "room" / f"rgb_{i}.jpg")
        shutil.copy(NYU_FRAMES / f"depth_{i}.png", data / "test" / "room" / f"depth_{i}.png")
        lines.append(f"test/room/rgb_{i}.jpg test/room/depth_{i}.png")
    (data / "filename_list_test.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    r = lotus(
        "eval",
        "depth",
        "--model",
        depth_d,
        "--dataset",
        f"nyuv2={data}",
        "--out",
        out,
        "--save-predictions",
        "--processing-res",
        "64",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert "NYUv2 test (disparity)" in r.output  # the paper's figures beside ours:
    assert "(paper 5.1)" in r.output and "(paper 97.1)" in r.output
    first = json.loads((out / "results.json").read_text())["datasets"]["nyuv2"]
    assert first["evaluated"] == 3 and first["processing_res"] == 64 and first["alignment"] == "disparity"
    assert first["paper"] == {"abs_rel": 0.051, "delta1": 0.971}
    assert 0 < first["metrics"]["abs_rel"] < 10 and 0 <= first["metrics"]["delta1"] <= 1
    saved = out / "predictions" / "nyuv2" / "test" / "room" / "rgb_00050.npy"
    assert np.load(saved).shape == (480, 640)
    r2 = lotus(
        "eval",
        "depth",
        "--predictions",
        out / "predictions",
        "--dataset",
        f"nyuv2={data}",
        "--alignment",
        "disparity",
        "--out",
        tmp_path / "again",
    )
    assert r2.exit_code == 0, r2.output
    again = json.loads((tmp_path / "again" / "results.json").read_text())["datasets"]["nyuv2"]
    assert again["metrics"] == pytest.approx(first["metrics"], rel=1e-9)


def test_maps_written_by_lotus_depth_on_the_unpacked_set_are_found_and_read_as_disparity(tmp_path, depth_d):
    path, _ = write_depth_set(tmp_path / "data", "scannet", n=1)
    preds = tmp_path / "preds"
    r = lotus(
        "depth",
        path / "scene00" / "color",
        "--out",
        preds / "scene00" / "color",
        "--format",
        "npy",
        "--model",
        depth_d,
        "--processing-res",
        "32",
    )
    assert r.exit_code == 0, r.output
    r = lotus("eval", "depth", "--predictions", preds, "--dataset", f"scannet={path}", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "o" / "results.json").read_text())["datasets"]["scannet"]
    assert d["evaluated"] == 1 and d["alignment"] == "disparity"  # from the sidecar of `lotus depth`


# -------------------------------------------------------------------------------- released weights

PAPER_NYU_ABS_REL = 5.1  # Lotus-D, paper Table 1, percent


@pytest.mark.slow
@pytest.mark.weights
@pytest.mark.gpu
@pytest.mark.skipif(not os.environ.get("LOTUS_EVAL_NYU"), reason="set LOTUS_EVAL_NYU to Marigold's NYUv2 test set")
def test_released_depth_d_reaches_the_paper_on_full_nyuv2(tmp_path):
    """The released depth-d checkpoint on the 654 NYUv2 test frames: AbsRel within 0.2 points of the
    paper's 5.1 (delta1 there: 97.1)."""
    out = tmp_path / "out"
    r = lotus(
        "eval",
        "depth",
        "--model",
        "depth-d",
        "--dataset",
        f"nyuv2={os.environ['LOTUS_EVAL_NYU']}",
        "--out",
        out,
        "--device",
        "cuda",
    )
    assert r.exit_code == 0, r.output
    d = json.loads((out / "results.json").read_text())["datasets"]["nyuv2"]
    assert d["evaluated"] == 654
    assert abs(d["metrics"]["abs_rel"] * 100 - PAPER_NYU_ABS_REL) <= 0.2, d["metrics"]
