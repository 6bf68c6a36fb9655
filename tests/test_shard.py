"""--shard K/N and torchrun ranks: a deterministic, disjoint, stable split of the work list."""

import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lotus_cli.errors import UsageError
from lotus_cli.io.sources import Item
from lotus_cli.scale.shard import Shard, env_rank, parse_shard, resolve_shard, select, shard_of, worker_device
from lotus_cli.scale.worker import Job, Reuse, checkpoint_facts, predictor_facts

from .conftest import make_image

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--processing-res", "32"]


def items(n: int, start: int = 0) -> list[Item]:
    return [Item(Path(f"/in/d{i % 7}/img{i:05d}.jpg"), f"d{i % 7}/img{i:05d}") for i in range(start, start + n)]


def test_shards_partition_the_work_list_and_are_balanced():
    work = items(1000)
    parts = [select(work, Shard(k, 4)) for k in range(4)]
    keys = [i.key for p in parts for i in p]
    assert sorted(keys) == sorted(i.key for i in work)  # union is everything, nothing twice
    assert len(keys) == len(set(keys))
    assert all(200 < len(p) < 300 for p in parts)  # a hash, not a bias to one shard
    # order within a shard follows the given order
    assert [i.key for i in parts[1]] == [i.key for i in work if shard_of(i.key, 4) == 1]


def test_adding_files_never_moves_finished_work():
    before = {i.key: k for k in range(5) for i in select(items(300), Shard(k, 5))}
    after = {i.key: k for k in range(5) for i in select(items(300) + items(200, start=300), Shard(k, 5))}
    assert all(after[key] == k for key, k in before.items())
    # the hash is of the key alone: fixed across processes and Python's per-run string hashing
    assert (
        shard_of("d0/img00000", 1000)
        == int.from_bytes(__import__("hashlib").blake2b(b"d0/img00000", digest_size=8).digest(), "big") % 1000
    )


@pytest.mark.parametrize("spec", ["2/2", "-1/3", "a/b", "3", "1/0", "1/2/3"])
def test_bad_shard_specs_are_usage_errors(spec):
    with pytest.raises(UsageError, match="K/N"):
        parse_shard(spec)
    assert parse_shard("2/3") == Shard(2, 3) and str(Shard(2, 3)) == "2/3"


def test_torchrun_environment_gives_shard_and_device():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert resolve_shard(None, env) == Shard(3, 4)
    assert resolve_shard("1/2", env) == Shard(1 * 4 + 3, 8)  # a Slurm array of torchrun jobs
    assert resolve_shard(None, {}) is None and resolve_shard("0/3", {"WORLD_SIZE": "1"}) == Shard(0, 3)
    import torch

    assert worker_device("auto", env) == ("cuda:1" if torch.cuda.is_available() else "cpu")
    assert worker_device("cpu", env) == "cpu" and worker_device("auto", {}) == "auto"
    with pytest.raises(UsageError, match="RANK"):
        resolve_shard(None, {"WORLD_SIZE": "2"})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("shard-in")
    for i in range(10):
        (d / f"s{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(make_image(24 + 8 * (i % 3), 40, seed=i)).save(d / f"s{i % 2}" / f"im{i}.png")
    return d


def lotus(*args, env=None, timeout=240, prefix=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = (prefix or [sys.executable, "-m", "lotus_cli"]) + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def cli(*args):
    """The command in this process (no interpreter and torch start-up per run)."""
    from typer.testing import CliRunner

    from lotus_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_shards_into_one_folder_write_every_output_once(folder, tmp_path, depth_d):
    out = tmp_path / "out"
    recs = []
    for k in range(3):
        r = cli("depth", folder, "--out", out, "-m", depth_d, *FAST, "--shard", f"{k}/3", "--json")
        assert r.exit_code == 0, r.stderr
        recs += records(r.stdout)
    assert Counter(r["key"] for r in recs) == Counter(f"s{i % 2}/im{i}" for i in range(10))
    assert {r["status"] for r in recs} == {"done"}
    assert len(list(out.rglob("*.json"))) == 10
    # the shards' maps are the single-process maps, byte for byte
    ref = tmp_path / "ref"
    assert cli("depth", folder, "--out", ref, "-m", depth_d, *FAST).exit_code == 0
    for f in ref.rglob("*.png"):
        assert (out / f.relative_to(ref)).read_bytes() == f.read_bytes()
    # a shard resumes: a second run skips everything it owns
    again = records(cli("depth", folder, "--out", out, "-m", depth_d, *FAST, "--shard", "1/3", "--json").stdout)
    assert again and {r["status"] for r in again} == {"skipped"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_two_ranks_write_every_output_once(folder, tmp_path, depth_d):
    out = tmp_path / "out"
    r = lotus(
        "depth",
        folder,
        "--out",
        out,
        "-m",
        depth_d,
        *FAST,
        "--json",
        timeout=300,
        prefix=["torchrun", "--nproc_per_node", "2", "--master-port", str(free_port()), "-m", "lotus_cli"],
    )
    assert r.returncode == 0, r.stderr[-2000:]
    recs = records(r.stdout)
    assert Counter(x["key"] for x in recs) == Counter(f"s{i % 2}/im{i}" for i in range(10))
    assert {x["status"] for x in recs} == {"done"}
    sidecars = list(out.rglob("*.json"))
    assert len(sidecars) == 10
    assert r.stderr.count(" on cpu in ") == 2  # two processes each loaded the model, on the CPU
    assert all(np.isfinite(json.loads(s.read_text())["value_range"]).all() for s in sidecars)
    assert env_rank({}) is None


# ------------------------------------------------------- reruns decide as --skip-existing does (issue 13)


@pytest.fixture
def three(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        Image.fromarray(make_image(24, 32 + 8 * i, seed=i)).save(d / f"p{i}.png")
    return d


def run_shard(inp, out, model, *more):
    r = cli("depth", inp, "--out", out, "-m", model, *FAST, "--shard", "0/1", "--json", *more)
    assert r.exit_code == 0, r.stderr
    return {x["key"]: x for x in records(r.stdout)}, r.stderr


def test_an_interrupted_or_failed_item_is_redone_by_a_shard(three, tmp_path, depth_d):
    out = tmp_path / "out"
    run_shard(three, out, depth_d)
    for key, change in (("p0", {"interrupted": True}), ("p1", {"complete": False, "error": "disk full"})):
        side = out / f"{key}.json"
        side.write_text(json.dumps({**json.loads(side.read_text()), **change}))
    recs, err = run_shard(three, out, depth_d)
    assert {k: r["status"] for k, r in recs.items()} == {"p0": "done", "p1": "done", "p2": "skipped"}
    assert recs["p0"]["redone"] == "its run was interrupted"
    assert recs["p1"]["redone"] == "its run failed (disk full)"
    assert "redone: " in err and "its run was interrupted" in err
    assert all(json.loads((out / f"p{i}.json").read_text())["complete"] for i in range(2))


def test_a_shard_redoes_outputs_made_with_other_options_and_says_why(three, tmp_path, depth_d, depth_g):
    out = tmp_path / "out"
    run_shard(three, out, depth_d)
    recs, err = run_shard(three, out, depth_d, "--processing-res", "40")  # the later option wins
    assert {r["status"] for r in recs.values()} == {"done"}
    assert all("processing_res 32 -> 40" in r["redone"] for r in recs.values())
    assert err.count("redone: ") == 3 and "processing_res 32 -> 40" in err
    assert json.loads((out / "p0.json").read_text())["options"]["processing_res"] == 40
    recs, err = run_shard(three, out, depth_d, "--processing-res", "40")  # the same command again keeps them
    assert {r["status"] for r in recs.values()} == {"skipped"} and "redone" not in err
    recs, _ = run_shard(three, out, depth_g, "--processing-res", "40")  # another model
    assert all(r["status"] == "done" and "made with another model" in r["redone"] for r in recs.values())


def test_an_output_folder_inside_the_input_folder_is_never_input(three, depth_d):
    out = three / "lotus-depth"
    (three / "loop").symlink_to(three)  # a symlink loop: one warning, walked once
    runs = [run_shard(three, out, depth_d) for _ in range(2)]
    assert [set(recs) for recs, _ in runs] == [{"p0", "p1", "p2"}] * 2
    assert {r["status"] for r in runs[1][0].values()} == {"skipped"}
    assert not (out / "lotus-depth").exists()
    assert all("warning: " in err and "loop" in err for _, err in runs)


@pytest.mark.parametrize("family", ["d", "g"])
def test_the_driver_reads_the_facts_the_predictor_reports(checkpoints, family, tmp_path):
    """The driver decides before any model loads: family, task, label and kind from the checkpoint's files
    must be the loaded predictor's, or reruns would redo (or keep) the wrong items."""
    from lotus_cli.model import registry
    from lotus_cli.model.predictor import LotusPredictor, PredictOptions
    from lotus_cli.run.made import OutputSpec, VideoSpec

    ref = registry.resolve(checkpoints[("depth", family)], "depth")
    for kind in (None, "uncertainty"):
        job = Job(ref, "depth", OutputSpec(tmp_path), PredictOptions(), VideoSpec(), kind=kind)
        predictor = LotusPredictor.from_pretrained(ref, device="cpu", dtype="fp32")
        facts = checkpoint_facts(job)
        assert facts == predictor_facts(predictor, job)
        assert facts[0] == family and facts[3] == (kind or "disparity")


def test_a_first_run_judges_nothing_and_reads_no_checkpoint(tmp_path):
    """Without a sidecar there is nothing to compare: the driver asks for the model's facts (a checkpoint
    read and the runner's torch import) only once an earlier output exists."""
    from lotus_cli.model.predictor import PredictOptions
    from lotus_cli.run.made import OutputSpec, VideoSpec

    asked = []
    job = Job("unused", "depth", OutputSpec(tmp_path), PredictOptions(processing_res=32), VideoSpec())
    reuse = Reuse(job, None, lambda: asked.append(1) or ("d", "depth", "m", "disparity"))
    item = Item(Path("/in/a/x.png"), "a/x")
    assert reuse(item) == (False, None) and not asked
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    assert reuse(item) == (False, "no sidecar: its run did not finish") and not asked
    (tmp_path / "a" / "x.json").write_text(
        json.dumps({"complete": True, "model": "m", "kind": "disparity", "options": {}, "outputs": {}})
    )
    keep, why = reuse(item)
    assert not keep and why == "x.16bit.png missing" and not asked  # files are checked before the facts
    (tmp_path / "a" / "x.16bit.png").write_bytes(b"")
    keep, why = reuse(item)
    assert asked == [1] and not keep and "processing_res None -> 32" in why


def test_scaled_out_messages_print_names_once_escaped(tmp_path, depth_d):
    (tmp_path / "in").mkdir()
    Image.fromarray(make_image(24, 32)).save(tmp_path / "in" / "ok.png")
    (tmp_path / "in" / "bad [x].png").write_bytes(b"not a png")
    r = cli("depth", tmp_path / "in", "-o", tmp_path / "o", "-m", depth_d, "--processing-res", "32", "--shard", "0/1")
    assert r.exit_code == 1, r.output
    assert "bad [x].png" in r.stderr and "bad \\[x]" not in r.stderr  # say() escapes; escaping twice showed a \
