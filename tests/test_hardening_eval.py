"""Issue 28, `lotus eval --predictions`: it reads what each sample's sidecar lists (not the first existing
file), scores normals in Lotus's frame whatever frame they were written in, refuses maps their sidecar does
not vouch for, and takes a sidecar-less EXR's kind from its header."""

import numpy as np
import pytest

from lotus_cli.evaluate import datasets as D
from lotus_cli.evaluate.run import EvalOptions, FolderSource, evaluate
from lotus_cli.geometry.camera import NORMAL_FRAMES, convert_normals
from lotus_cli.io.formats import Style
from lotus_cli.io.outputs import output_paths, write_outputs
from lotus_cli.io.sidecar import sidecar

from .test_eval_datasets import write_depth_set, write_normal_set

OpenEXR = pytest.importorskip("OpenEXR", reason="EXR maps need the OpenEXR package")


def lotus_outputs(folder, key, value, kind, formats, model="some/model", frame=None, **sections):
    """What `lotus depth|normal` writes for one input: the maps, then the sidecar listing them."""
    extra = {"normal_frame": frame, "axes": NORMAL_FRAMES[frame][1]} if frame else {}
    record = sidecar(kind, model={"model": model}, key=key, **extra, **sections)
    return write_outputs(output_paths(folder, key, formats), value, kind, record, Style())


def test_a_stale_npy_beside_a_sidecar_that_lists_the_exr_is_not_read(tmp_path):
    """The npy of an earlier run (another model) stayed beside the sidecar of a later `-f exr` run, and eval
    read the npy first (AbsRel 22.36 instead of 23.16): the sidecar's file is read now."""
    path, gts = write_depth_set(tmp_path / "data", "scannet", n=2)
    ds = D.open_dataset("depth", "scannet", path)
    pred = tmp_path / "pred"
    for s, g in zip(ds.samples, gts):
        lotus_outputs(pred, s.key, 0.25 * g + 3.0, "depth", ("exr",), model="model-b")
        np.save(pred / f"{s.key}.npy", np.random.default_rng(0).random(g.shape).astype(np.float32))  # stale
    r = evaluate(ds, FolderSource(pred, "depth"), EvalOptions("depth"))
    assert r.evaluated == 2 and not r.failed and r.alignment == "depth"
    assert r.metrics["abs_rel"] < 1e-6 and r.metrics["delta1"] == 1.0


@pytest.mark.parametrize("fmt", ["npy", "exr", "png16"])
@pytest.mark.parametrize("frame", ["opengl", "opencv", "lotus"])
def test_normals_written_in_any_frame_score_as_in_lotus_frame(tmp_path, frame, fmt):
    """`lotus normal --frame opengl|opencv` maps were scored as if in Lotus's frame (101.0 / 101.2 / 79.0
    degrees for the same predictions): the sidecar's normal_frame is converted now."""
    path, gts = write_normal_set(tmp_path / "data", "scannet")
    ds = D.open_dataset("normal", "scannet", path)
    pred = tmp_path / "pred"
    for s, (g, _) in zip(ds.samples, gts):
        lotus_outputs(pred, s.key, convert_normals(g.astype(np.float32), frame), "normal", (fmt,), frame=frame)
    r = evaluate(ds, FolderSource(pred, "normal"), EvalOptions("normal"))
    assert r.evaluated == 2 and not r.failed
    assert r.metrics["mean"] < (0.01 if fmt == "png16" else 1e-3) and r.metrics["a5"] == 1.0


def test_a_sidecar_less_exr_says_its_frame_and_kind_in_its_header(tmp_path):
    path, gts = write_normal_set(tmp_path / "data", "scannet")
    ds = D.open_dataset("normal", "scannet", path)
    pred = tmp_path / "pred"
    for s, (g, _) in zip(ds.samples, gts):
        lotus_outputs(pred, s.key, convert_normals(g.astype(np.float32), "opencv"), "normal", ("exr",), frame="opencv")
        (pred / f"{s.key}.json").unlink()  # the EXR header alone says what it is
    r = evaluate(ds, FolderSource(pred, "normal"), EvalOptions("normal"))
    assert r.evaluated == 2 and r.metrics["mean"] < 1e-3

    dpath, dgts = write_depth_set(tmp_path / "ddata", "scannet", n=2)
    dds = D.open_dataset("depth", "scannet", dpath)
    for s, g in zip(dds.samples, dgts):
        disparity = np.where(g > 0, 1 / np.where(g > 0, g, 1), 0)
        lotus_outputs(tmp_path / "d", s.key, 0.02 * disparity + 0.1, "disparity", ("exr",))
        (tmp_path / "d" / f"{s.key}.json").unlink()
    # eval used to ask for --alignment here while `lotus pointcloud` read lotus:kind
    r = evaluate(dds, FolderSource(tmp_path / "d", "depth"), EvalOptions("depth"))
    assert r.alignment == "disparity" and r.alignment_source.startswith("EXR header of ")
    assert r.metrics["abs_rel"] < 1e-5 and r.metrics["delta1"] == 1.0


def test_maps_a_sidecar_does_not_vouch_for_fail_their_sample(tmp_path):
    path, gts = write_depth_set(tmp_path / "data", "scannet", n=4)
    ds = D.open_dataset("depth", "scannet", path)
    pred = tmp_path / "pred"
    keys = [s.key for s in ds.samples]
    for k, g in zip(keys, gts):
        lotus_outputs(pred, k, 0.25 * g + 3.0, "depth", ("npy",))
    # 1: the sidecar lists an exr that is not there, only an unlisted npy of another run
    lotus_outputs(pred, keys[1], 0.25 * gts[1] + 3.0, "depth", ("exr",))
    (pred / f"{keys[1]}.exr").unlink()
    np.save(pred / f"{keys[1]}.npy", gts[1].astype(np.float32))
    # 2: an uncertainty map, not a depth prediction
    spread = {"statistic": "standard deviation of the [0, 1] maps"}
    lotus_outputs(pred, keys[2], 0.01 * gts[2], "uncertainty", ("npy",), uncertainty=spread)
    # 3: a run that did not finish
    side = pred / f"{keys[3]}.json"
    side.write_text(side.read_text().replace('"complete": true', '"complete": false'))
    r = evaluate(ds, FolderSource(pred, "depth"), EvalOptions("depth"))
    status = {rec["key"]: (rec["status"], rec["error"] or "") for rec in r.records}
    assert status[keys[0]][0] == "ok" and r.metrics["abs_rel"] < 1e-6
    assert status[keys[1]][0] == "failed" and "left by another run" in status[keys[1]][1]
    assert f"lists {keys[1].rsplit('/', 1)[1]}.exr, not {keys[1].rsplit('/', 1)[1]}.npy" in status[keys[1]][1]
    assert status[keys[2]][0] == "failed" and "an uncertainty map, not a depth prediction" in status[keys[2]][1]
    assert status[keys[3]][0] == "failed" and "did not finish" in status[keys[3]][1]


def test_a_map_of_the_other_kind_than_the_run_aligns_fails_its_sample(tmp_path):
    path, gts = write_depth_set(tmp_path / "data", "scannet", n=2)
    ds = D.open_dataset("depth", "scannet", path)
    pred = tmp_path / "pred"
    disparity = [np.where(g > 0, 1 / np.where(g > 0, g, 1), 0) for g in gts]
    lotus_outputs(pred, ds.samples[0].key, 0.02 * disparity[0] + 0.1, "disparity", ("npy",))
    lotus_outputs(pred, ds.samples[1].key, 0.25 * gts[1] + 3.0, "depth", ("npy",), model="another")
    r = evaluate(ds, FolderSource(pred, "depth"), EvalOptions("depth"))
    assert r.alignment == "disparity" and [rec["status"] for rec in r.records] == ["ok", "failed"]
    assert "a depth map" in r.records[1]["error"] and "aligns disparity" in r.records[1]["error"]
    # stated on the command line, the alignment is the user's: every map is scored with it
    r = evaluate(ds, FolderSource(pred, "depth"), EvalOptions("depth", alignment="disparity"))
    assert r.evaluated == 2


def test_a_colour_mapped_depth_png_is_not_scored_as_values(tmp_path):
    path, gts = write_depth_set(tmp_path / "data", "scannet", n=1)
    ds = D.open_dataset("depth", "scannet", path)
    lotus_outputs(tmp_path / "pred", ds.samples[0].key, 0.25 * gts[0] + 3.0, "depth", ("png",))
    r = evaluate(ds, FolderSource(tmp_path / "pred", "depth"), EvalOptions("depth"))
    assert r.records[0]["status"] == "failed" and "colour-mapped picture" in r.records[0]["error"]
