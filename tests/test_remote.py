"""fsspec URLs for inputs and --out: an in-memory filesystem under its own protocol (bucket://) and file://
stand in for s3:// / gs://; memory:// itself is an input only (--out there would die with the process)."""

import io
import json
import uuid
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.io import remote

from .conftest import make_image

FAST = ["--processing-res", "32"]


class BucketFileSystem(MemoryFileSystem):
    """A persistent object store as far as lotus can tell (s3:// in these tests): fsspec's in-memory
    filesystem with its own store under the protocol bucket://, which --out accepts (memory:// it refuses)."""

    protocol = ("bucket",)
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("bucket://"):
            path = path[len("bucket://") :]
        return super()._strip_protocol(path)


fsspec.register_implementation("bucket", BucketFileSystem, clobber=True)


def lotus(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def png(seed: int, h: int = 30, w: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_image(h, w, seed)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def bucket(tmp_path):
    """bucket://<name>/in holding a/x.png, a/y.png, b/z.png, b/z.v2.png (whose outputs z.v2.* share z's
    prefix) and a broken png; the same files on disk, and in memory://<name>/in."""
    fs = fsspec.filesystem("bucket")
    name = f"bucket-{uuid.uuid4().hex[:8]}"
    local = tmp_path / "local-in"
    files = {
        "a/x.png": png(1),
        "a/y.png": png(2, 24),
        "b/z.png": png(3),
        "b/z.v2.png": png(4),
        "b/broken.png": b"\x89PNG nope",
    }
    memory = fsspec.filesystem("memory")
    for rel, data in files.items():
        fs.pipe_file(f"/{name}/in/{rel}", data)
        memory.pipe_file(f"/{name}/in/{rel}", data)
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    yield {"fs": fs, "name": name, "local": local}
    fs.rm(f"/{name}", recursive=True)
    memory.rm(f"/{name}", recursive=True)


def test_urls_in_and_out_give_the_local_bytes(bucket, tmp_path, depth_d):
    fs, name = bucket["fs"], bucket["name"]
    r = lotus("depth", f"bucket://{name}/in", "--out", f"bucket://{name}/out", "-m", depth_d, *FAST, "--json")
    assert r.exit_code == 1, r.output  # the broken file
    recs = {x["key"]: x for x in records(r.stdout)}
    assert set(recs) == {"a/x", "a/y", "b/z", "b/z.v2", "b/broken"}
    assert recs["b/broken"]["status"] == "failed" and "not a readable image" in recs["b/broken"]["error"]
    assert recs["a/x"]["input"] == f"bucket:///{name}/in/a/x.png"  # records name the URL, not the cache
    assert recs["a/x"]["outputs"]["json"] == f"bucket://{name}/out/a/x.json"
    ref = tmp_path / "ref"
    assert lotus("depth", bucket["local"], "--out", ref, "-m", depth_d, *FAST).exit_code == 1
    for f in ref.rglob("*.png"):
        assert fs.cat_file(f"/{name}/out/{f.relative_to(ref).as_posix()}") == f.read_bytes(), f
    side = json.loads(fs.cat_file(f"/{name}/out/a/y.json"))
    assert side["input_size"] == [40, 24] and side["kind"] == "disparity"
    # staged outputs were removed once uploaded
    staging = remote.Outputs(f"bucket://{name}/out").staging
    assert not [p for p in staging.rglob("*") if p.is_file()]
    # a rerun finds every finished output at the URL and computes nothing
    again = records(
        lotus("depth", f"bucket://{name}/in", "--out", f"bucket://{name}/out", "-m", depth_d, *FAST, "--json").stdout
    )
    assert {x["key"]: x["status"] for x in again} == {
        "a/x": "skipped",
        "a/y": "skipped",
        "b/z": "skipped",
        "b/z.v2": "skipped",
        "b/broken": "failed",
    }


def test_uncertainty_layers_are_uploaded_too(bucket, depth_g):
    fs, name = bucket["fs"], bucket["name"]
    r = lotus(
        "uncertainty",
        f"memory://{name}/in/a/x.png",  # memory:// is fine as an input
        "--out",
        f"bucket://{name}/u",
        "-m",
        depth_g,
        *FAST,
        "--samples",
        "2",
        "--batch-size",
        "2",
    )
    assert r.exit_code == 0, r.output
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"/{name}/u"))
    assert names == ["x.16bit.png", "x.json", "x.mean.16bit.png", "x.mean.png", "x.png"]
    assert json.loads(fs.cat_file(f"/{name}/u/x.json"))["kind"] == "uncertainty"


def test_file_urls_are_local_paths(bucket, tmp_path, depth_d):
    out = tmp_path / "out"
    r = lotus("depth", f"file://{bucket['local']}/a", "--out", f"file://{out}", "-m", depth_d, *FAST, "--json")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["x.16bit.png", "x.json", "x.png", "y.16bit.png", "y.json", "y.png"]


def test_missing_url_and_missing_backend_say_what_to_do(bucket, tmp_path, depth_d):
    r = lotus("depth", f"bucket://{bucket['name']}/nothing", "--out", tmp_path / "o", "-m", depth_d, *FAST)
    assert r.exit_code == 1 and "no such file or folder" in r.stderr
    try:
        import s3fs  # noqa: F401
    except ImportError:
        r = lotus("depth", "s3://some-bucket/photos", "--out", tmp_path / "o", "-m", depth_d, *FAST)
        assert r.exit_code == 2 and "pip install s3fs" in r.stderr


@pytest.mark.parametrize(
    "given, expected",
    [
        ("s3://b/k/x.jpg", "s3://b/k/x.jpg"),
        ("s3:/b/k", "s3://b/k"),  # what a Path option leaves of a URL
        ("gs://b", "gs://b"),
        ("file:///tmp/x", "/tmp/x"),
        ("file:/tmp/x", "/tmp/x"),
        ("photos/a.jpg", "photos/a.jpg"),
        ("C:/photos", "C:/photos"),
    ],
)
def test_normalise(given, expected):
    assert remote.normalise(given) == expected
    assert remote.is_url(given) == expected.startswith(("s3:", "gs:"))


def test_out_in_memory_is_refused_before_any_work(bucket, tmp_path, depth_d):
    """--out memory://... reported success and kept nothing (issue 28): refused as a usage error, and the
    in-memory filesystem is left untouched."""
    name = bucket["name"]
    r = lotus("depth", bucket["local"] / "a", "--out", f"memory://{name}/out", "-m", depth_d, *FAST)
    assert r.exit_code == 2 and "keeps nothing after the run ends" in r.stderr, r.output
    assert not fsspec.filesystem("memory").exists(f"/{name}/out")


def test_a_rerun_at_a_url_redoes_what_skip_existing_would(bucket, depth_d):
    """--out at a URL: the sidecar there is read and judged as a local one (changed options, an
    interrupted run); an --out URL inside the input URL is never read as input."""
    fs, name = bucket["fs"], bucket["name"]
    inp, out = f"bucket://{name}/in/a", f"bucket://{name}/in/a/out"

    def run(*more):
        r = lotus("depth", inp, "--out", out, "-m", depth_d, *FAST, "--json", *more)
        assert r.exit_code == 0, r.output
        return {x["key"]: x for x in records(r.stdout)}, r.stderr

    run()
    recs, err = run("--processing-res", "40")
    assert set(recs) == {"x", "y"} and {r["status"] for r in recs.values()} == {"done"}
    assert all("processing_res 32 -> 40" in r["redone"] for r in recs.values()) and err.count("redone: ") == 2
    assert json.loads(fs.cat_file(f"/{name}/in/a/out/x.json"))["options"]["processing_res"] == 40
    recs, _ = run("--processing-res", "40")
    assert {r["status"] for r in recs.values()} == {"skipped"}
    side = json.loads(fs.cat_file(f"/{name}/in/a/out/y.json"))
    fs.pipe_file(f"/{name}/in/a/out/y.json", json.dumps({**side, "interrupted": True}).encode())
    recs, _ = run("--processing-res", "40")
    assert recs["x"]["status"] == "skipped"
    assert recs["y"]["status"] == "done" and recs["y"]["redone"] == "its run was interrupted"
    assert not fs.exists(f"/{name}/in/a/out/out")


def test_point_clouds_take_urls_as_the_other_commands_do(bucket, tmp_path, depth_d):
    """bucket:// in and out (the mesh's OBJ material and texture uploaded too, every file the sidecar lists), a
    resume judged at the URL, and file:// naming local paths (no folder literally named 'file:')."""
    fs, name = bucket["fs"], bucket["name"]
    args = ["pointcloud", f"bucket://{name}/in/a", "--out", f"bucket://{name}/pc", "-m", depth_d, "--processing-res",
            32, "--normals", "depth", "--mesh-format", "obj", "--json"]  # fmt: skip
    r = lotus(*args)
    assert r.exit_code == 0, r.output
    recs = {rec["key"]: rec for rec in records(r.stdout)}
    assert set(recs) == {"x", "y"} and recs["x"]["input"] == f"bucket:///{name}/in/a/x.png"
    assert recs["x"]["outputs"]["ply"] == f"bucket://{name}/pc/x.ply"
    side = json.loads(fs.cat_file(f"/{name}/pc/x.json"))
    for f in [o["file"] for o in side["outputs"].values()] + side["outputs"]["obj"]["companions"]:
        assert fs.isfile(f"/{name}/pc/{f}"), f
    r = lotus(*args, "--skip-existing")
    assert r.exit_code == 0 and {rec["status"] for rec in records(r.stdout)} == {"skipped"}, r.output
    local = bucket["local"] / "a" / "x.png"
    out = tmp_path / "pc"
    r = lotus("pointcloud", f"file://{local}", "--out", f"file://{out}", "-m", depth_d, "--processing-res", 32,
              "--normals", "depth")  # fmt: skip
    assert r.exit_code == 0 and (out / "x.ply").is_file(), r.output
    assert f"-> {out}" in r.stderr and not list(tmp_path.glob("file:*")) and not list(Path().glob("file:*"))
