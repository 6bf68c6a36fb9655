"""The trainer end to end on a tiny base and synthetic scenes this test renders: training lowers the
validation error and the saved folder loads with `lotus depth --model`; a resumed run continues the same
loss curve exactly; two data-parallel processes (torchrun, gloo) give the loss of one with the same batch."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lotus_cli.model.synthetic import render_scene, write_synthetic_dataset
from lotus_cli.train import data as D
from lotus_cli.train.debug import autoencoder_images
from lotus_cli.train.options import StepOptions, TrainOptions
from lotus_cli.train.surgery import build_tiny_base
from lotus_cli.train.trainer import LOG_FILE, train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic scenes (train with invalid holes, val and a hole-free set) and a tiny SD2-like base whose
    VAE is fitted to them, so that decoded predictions mean something."""
    root = tmp_path_factory.mktemp("train-world")
    train_dir = write_synthetic_dataset(root / "train", 48, (32, 32), seed=1)
    val_dir = write_synthetic_dataset(root / "val", 6, (32, 32), seed=2, holes=False)
    full_dir = write_synthetic_dataset(root / "full", 8, (32, 32), seed=3, holes=False)
    base = build_tiny_base(root / "base", fit_images=autoencoder_images(D.FolderData(train_dir)), fit_steps=250)
    return {"root": root, "train": train_dir, "val": val_dir, "full": full_dir, "base": base}


def options(world, out, **kw):
    base = dict(
        base=str(world["base"]),
        out=out,
        data=(f"folder={world['train']}",),
        steps=20,
        batch_size=4,
        lr=1e-3,
        checkpoint_every=1000,
        log_every=1,
        seed=0,
    )
    base.update(kw)
    return TrainOptions(**base)


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


@pytest.mark.heavy
def test_training_lowers_validation_error_and_the_result_loads(world, tmp_path):
    from typer.testing import CliRunner

    from lotus_cli.cli import app

    opts = options(
        world,
        tmp_path / "run",
        steps=250,
        val_data=f"folder={world['val']}",
        log_every=50,
        step=StepOptions(family="g"),
    )
    run = train(opts)
    first, last = run.validation[0]["error"], run.validation[-1]["error"]
    assert last < 0.75 * first, (first, last)
    assert run.losses[-1]["loss_anno"] < 0.5 * run.losses[0]["loss_anno"]
    assert (tmp_path / "run" / "validation" / "step-0000250.png").is_file()
    meta = json.loads((run.final / "lotus.json").read_text())
    assert (meta["task"], meta["kind"], meta["family"]) == ("depth", "disparity", "g")
    img = world["val"] / "rgb" / "00000.png"
    res = CliRunner().invoke(
        app,
        [
            "depth",
            str(img),
            "--model",
            str(run.final),
            "--processing-res",
            "0",
            "--format",
            "npy",
            "--out",
            str(tmp_path / "pred"),
        ],
    )
    assert res.exit_code == 0, res.output
    pred = np.load(tmp_path / "pred" / "00000.npy")
    gt = np.load(world["val"] / "depth" / "00000.npy")
    assert pred.shape == gt.shape
    assert np.corrcoef(pred.ravel(), 1 / gt.ravel())[0, 1] > 0.5  # disparity: follows 1 / depth


def test_resume_continues_the_same_loss_curve(world, tmp_path):
    whole = options(world, tmp_path / "whole", steps=12, checkpoint_every=6, step=StepOptions(family="g"))
    train(whole)

    class Crash(Exception):
        pass

    def crash_at_9(event, record):
        if event == "log" and record["step"] == 9:
            raise Crash

    cut = replace(whole, out=tmp_path / "cut")
    with pytest.raises(Crash):
        train(cut, crash_at_9)
    assert (tmp_path / "cut" / "checkpoints" / "step-0000006").is_dir()
    (tmp_path / "cut" / LOG_FILE).write_text("")  # keep only what the resumed run logs
    train(replace(cut, resume="latest"))
    after = losses(tmp_path / "cut")
    assert [r["step"] for r in after] == list(range(7, 13))
    ref = {r["step"]: r for r in losses(tmp_path / "whole")}
    for r in after:
        assert (r["loss"], r["loss_anno"], r["loss_rgb"]) == (
            ref[r["step"]]["loss"],
            ref[r["step"]]["loss_anno"],
            ref[r["step"]]["loss_rgb"],
        )


@pytest.mark.heavy
def test_two_processes_match_one_with_the_same_global_batch(world, tmp_path):
    common = [
        "--base",
        str(world["base"]),
        "--data",
        f"folder={world['full']}",
        "--steps",
        "4",
        "--lr",
        "1e-3",
        "--family",
        "g",
        "--checkpoint-every",
        "1000",
        "--log-every",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    one = subprocess.run(
        [sys.executable, "-m", "lotus_cli.train", *common, "--batch-size", "4", "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    # torchrun in a session of its own: on a timeout the whole group (its ranks too) is killed, so a rank
    # stuck in a collective is not left behind
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "lotus_cli.train",
            *common,
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"2-rank torchrun did not finish in 300 s:\n{stderr[-3000:]}")
    two = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stderr and "global batch 4" in two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    assert a[-1]["loss"] != pytest.approx(a[0]["loss"], rel=1e-3)  # it did train


def fake_scannet(src: Path, dest: Path) -> Path:
    """Synthetic scenes in Marigold's ScanNet layout: rgb + depth png in mm, split list 'rgb depth'."""
    from PIL import Image

    dest.mkdir(parents=True)
    lines = []
    for p in sorted((src / "rgb").glob("*.png")):
        depth_mm = np.round(np.load(src / "depth" / f"{p.stem}.npy") * 1000).astype(np.uint16)
        Image.fromarray(np.asarray(Image.open(p))).save(dest / f"{p.stem}_color.png")
        Image.fromarray(depth_mm).save(dest / f"{p.stem}_depth.png")
        lines.append(f"{p.stem}_color.png {p.stem}_depth.png")
    (dest / "scannet_val_sampled_list_800_1.txt").write_text("\n".join(lines) + "\n")
    return dest


@pytest.mark.heavy
def test_normal_training_and_benchmark_evaluation_during_training(world, tmp_path):
    from lotus_cli.model.predictor import LotusPredictor

    opts = options(
        world,
        tmp_path / "normal",
        steps=15,
        step=StepOptions(task="normal", family="d"),
        val_data=f"folder={world['val']}",
    )
    run = train(opts)
    assert all(np.isfinite(r["loss"]) for r in run.losses) and run.validation[0]["error"] > 0
    pred = LotusPredictor.from_pretrained(run.final, device="cpu")
    assert (pred.task, pred.kind, pred.family) == ("normal", "normal", "d")
    n = pred.predict(np.asarray(render_scene(32, 32, 5)["rgb"])).map
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-4)
    scannet = fake_scannet(world["val"], tmp_path / "scannet")
    run = train(options(world, tmp_path / "bench", steps=3, eval_data=(f"scannet={scannet}",)))
    (rec,) = run.evaluation
    assert rec["dataset"] == "scannet" and rec["evaluated"] == 6 and 0 < rec["metrics"]["abs_rel"] < 1
    assert json.loads((tmp_path / "bench" / "eval.jsonl").read_text())["metrics"] == rec["metrics"]


@pytest.mark.parametrize("family", ["g", "d"])
def test_validation_scores_exactly_what_the_predictor_predicts(checkpoints, family):
    """Validation runs the predictor's own steps: its AbsRel is that of `LotusPredictor.predict`'s maps
    (42 x 50 px: the decoded 40 x 48 is resized back by the predictor's finish)."""
    from lotus_cli.evaluate import metrics as M
    from lotus_cli.model.predictor import LotusPredictor, PredictOptions
    from lotus_cli.train.trainer import evaluate_samples

    pred = LotusPredictor.from_pretrained(
        checkpoints[("depth", family)], device="cpu", channels_last=False, pack_weights=False
    )
    samples = [dict(render_scene(42, 50, seed=k), valid=np.ones((42, 50), bool)) for k in range(2)]
    got = evaluate_samples(pred, samples[:1] if family == "g" else samples, StepOptions(family=family))
    want = []
    for s in samples[:1] if family == "g" else samples:  # G: sample i gets noise seed i, predict's seed is 0
        m = pred.predict(s["rgb"], PredictOptions(processing_res=0)).map
        gt = s["depth"].astype(np.float64)
        aligned = M.align_depth(m, gt, s["valid"], "disparity", (float(gt.min()), float(gt.max())))
        want.append(M.depth_metrics(aligned.depth, gt, s["valid"])["abs_rel"])
    assert got["abs_rel"] == pytest.approx(float(np.mean(want)), rel=1e-9)
