"""--engine ray on a local Ray cluster started here (2 logical GPUs on a CPU machine): the same bytes as the
single-process run, a killed worker, a killed driver and a bad file. Every run is a subprocess with a
timeout, so a stuck pipeline fails instead of hanging the suite."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from .conftest import make_image
from .test_shard import free_port, records
from .test_video import make_clip

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'lotus-cli[ray]'")
psutil = pytest.importorskip("psutil")
pytestmark = [pytest.mark.ray, pytest.mark.heavy]  # a Ray cluster per test: the full tier only

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--processing-res", "64"]
ENGINE = ["--engine", "ray", "--workers", "2", "--gpus-per-worker", "1", "--cpus-per-worker", "1"]
N_IMAGES = 40
RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 small images of three sizes in two folders, two short clips and one file that is no image."""
    root = tmp_path_factory.mktemp("ray-in")
    for i in range(N_IMAGES):
        p = root / f"set{i % 2}" / f"im{i:02d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(make_image(48 + 8 * (i % 3), 64, seed=i)).save(p)
    (root / "clips").mkdir()
    make_clip(root / "clips" / "a.mp4", n=8, fps=8)
    make_clip(root / "clips" / "b.mp4", n=6, fps=6, size=(48, 32))
    (root / "set0" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


KEYS = Counter([f"set{i % 2}/im{i:02d}" for i in range(N_IMAGES)] + ["clips/a", "clips/b", "set0/broken"])


# `ray start` turns on token authentication unless told not to; the test cluster is private to this machine
NO_AUTH = {"RAY_AUTH_MODE": "disabled"}


def run(*args, wait=True, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **NO_AUTH, **(env or {})}
    cmd = [sys.executable, "-m", "lotus_cli", *[str(a) for a in args]]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT)


@pytest.fixture(scope="module")
def cluster():
    """`ray start --head --block` in its own process group, ended by group id at the end (its workers, in
    groups of their own, exit with the raylet): 3 CPUs and 2 logical GPUs, so two GPU workers fit."""
    port = free_port()
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            "--port",
            str(port),
            "--num-cpus",
            "3",
            "--num-gpus",
            "2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, **NO_AUTH},
    )
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            line = head.stdout.readline()
            if "Ray runtime started" in line:
                break
            if not line and head.poll() is not None:
                pytest.fail("ray start exited early")
        else:
            pytest.fail("ray start took over 120 s")
        yield {"address": f"127.0.0.1:{port}", "head": head}
    finally:
        started = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(30)
        psutil.wait_procs(started, timeout=30)


@pytest.fixture(scope="module")
def reference(data, depth_d, tmp_path_factory):
    """The single-process run: the bytes every engine run must reproduce. On one CPU thread, as Ray runs a
    one-CPU actor: the thread count changes the order of float sums (maps differ by ~1e-4)."""
    out = tmp_path_factory.mktemp("ray-ref") / "out"
    r = run("depth", data, "--out", out, "-m", depth_d, *ARGS, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr  # the broken file
    return out


def same_as_reference(out: Path, ref: Path) -> None:
    """Every output file of the reference exists in ``out`` with the same bytes (sidecars: the same
    record but for timings); no temporary or extra files."""
    ref_files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    out_files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert out_files == ref_files
    for rel in ref_files:
        a, b = (ref / rel), (out / rel)
        if rel.suffix == ".json":
            strip = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
            assert strip(json.loads(a.read_text())) == strip(json.loads(b.read_text())), rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel


def test_engine_writes_the_single_process_bytes_and_one_failed_record(data, cluster, reference, depth_d, tmp_path):
    out = tmp_path / "out"
    r = run("depth", data, "--out", out, "-m", depth_d, *ARGS, *ENGINE, "--ray-address", cluster["address"], "--json")
    assert r.returncode == 1, r.stderr[-3000:]  # exit code as today: some input failed
    recs = records(r.stdout)
    assert Counter(x["key"] for x in recs if x.get("key")) == KEYS
    failed = [x for x in recs if x["status"] == "failed"]
    assert len(failed) == 1 and "broken.png" in failed[0]["error"] and "not a readable image" in failed[0]["error"]
    assert Counter(x["status"] for x in recs) == {"done": N_IMAGES + 2, "failed": 1}
    assert {x["frames"] for x in recs if x["key"].startswith("clips/")} == {8, 6}
    assert f"{N_IMAGES + 2} done, 0 skipped, 1 failed" in r.stderr
    same_as_reference(out, reference)


def _workers(head: subprocess.Popen) -> list:
    """The pool's actor processes (Ray titles them after the map function)."""
    found = []
    for p in psutil.Process(head.pid).children(recursive=True):
        try:
            if "_Worker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _sidecars(out: Path) -> list[Path]:
    return list(out.rglob("*.json")) if out.exists() else []


def test_killed_worker_has_its_items_retried_elsewhere(data, cluster, reference, depth_d, tmp_path):
    out = tmp_path / "out"
    proc = run(
        "depth",
        data,
        "--out",
        out,
        "-m",
        depth_d,
        *ARGS,
        *ENGINE,
        "--ray-address",
        cluster["address"],
        "--json",
        wait=False,
    )
    killed = None
    deadline = time.time() + RUN_TIMEOUT
    try:
        while killed is None and time.time() < deadline and proc.poll() is None:
            workers = _workers(cluster["head"])
            if len(workers) == 2 and len(_sidecars(out)) >= 4:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)  # mid-run: most items are still to do
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=max(1, deadline - time.time()))
    finally:
        proc.kill()
    assert killed is not None, "the run ended before a worker could be killed"
    assert proc.returncode == 1, stderr[-3000:]
    # stdout stays NDJSON: Ray's notice of the dead worker goes elsewhere
    assert not [line for line in stdout.splitlines() if not line.startswith("{")], stdout[-3000:]
    recs = records(stdout)
    assert Counter(x["key"] for x in recs) == KEYS  # every item reported once
    assert Counter(x["status"] for x in recs) == {"done": N_IMAGES + 2, "failed": 1}
    same_as_reference(out, reference)  # every output complete, none half-written


def _files_of(sidecar: Path) -> list[Path]:
    """A finished item's files: x.json, x.png, x.16bit.png, or a clip's x.mp4 and its frames in x/."""
    stem = sidecar.name[: -len(".json")]
    frames = sidecar.with_name(stem)
    return [
        p
        for p in sidecar.parent.iterdir()
        if p.is_file() and p.name.split(".")[0] == stem.split(".")[0] and p.name.startswith(stem + ".")
    ] + (list(frames.iterdir()) if frames.is_dir() else [])


def test_killed_driver_then_rerun_finishes_only_the_rest(data, cluster, reference, depth_d, tmp_path):
    out = tmp_path / "out"
    args = ["depth", data, "--out", out, "-m", depth_d, *ARGS, *ENGINE, "--ray-address", cluster["address"], "--json"]
    proc = run(*args, wait=False)
    deadline = time.time() + RUN_TIMEOUT
    try:
        while len(_sidecars(out)) < 8 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the driver could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    # the job's actors go with their driver; wait until nothing more lands
    stable, last = 0.0, None
    while stable < 4 and time.time() < deadline:
        now = sorted(map(str, _sidecars(out)))
        stable = stable + 0.5 if now == last else 0.0
        last = now
        time.sleep(0.5)
    before = {p: p.stat().st_mtime_ns for s in _sidecars(out) for p in _files_of(s)}
    finished = len(_sidecars(out))
    assert 8 <= finished < N_IMAGES + 2

    r = run(*args)
    assert r.returncode == 1, r.stderr[-3000:]
    recs = records(r.stdout)
    assert Counter(x["key"] for x in recs) == KEYS
    assert Counter(x["status"] for x in recs) == {"skipped": finished, "done": N_IMAGES + 2 - finished, "failed": 1}
    assert len(before) >= 3 * 8
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing finished was recomputed
    same_as_reference(out, reference)


def test_rerun_redoes_an_interrupted_clip_and_a_failed_image_with_the_reason(
    data, cluster, reference, depth_d, tmp_path
):
    """The driver keeps what --skip-existing would keep: an interrupted clip (issue 13: its mp4 holds part
    of the frames) and an image whose run failed are redone on the workers, the reason reaching the CLI."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    for key, change in (("clips/a", {"interrupted": True}), ("set1/im01", {"complete": False, "error": "x"})):
        side = out / f"{key}.json"
        side.write_text(json.dumps({**json.loads(side.read_text()), **change}))
    r = run("depth", data, "--out", out, "-m", depth_d, *ARGS, *ENGINE, "--ray-address", cluster["address"], "--json")
    assert r.returncode == 1, r.stderr[-3000:]  # the broken file
    recs = {x["key"]: x for x in records(r.stdout)}
    assert Counter(x["status"] for x in recs.values()) == {"skipped": N_IMAGES, "done": 2, "failed": 1}
    assert recs["clips/a"]["status"] == "done" and recs["clips/a"]["redone"] == "its run was interrupted"
    assert recs["set1/im01"]["status"] == "done" and recs["set1/im01"]["redone"] == "its run failed (x)"
    assert r.stderr.count("redone: ") == 2
    same_as_reference(out, reference)


def test_pool_larger_than_the_cluster_is_refused_not_hung(data, cluster, depth_d, tmp_path):
    r = run(
        "depth",
        data,
        "--out",
        tmp_path / "out",
        "-m",
        depth_d,
        *ARGS,
        "--engine",
        "ray",
        "--workers",
        "3",
        "--gpus-per-worker",
        "1",
        "--ray-address",
        cluster["address"],
    )
    assert r.returncode == 2
    assert "needs 3 CPUs and 3 GPUs; the Ray cluster has 3 and 2" in r.stderr
