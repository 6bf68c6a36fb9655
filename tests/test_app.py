"""`lotus app`'s library (no browser): the shared service against `lotus depth`, the folder browser, the path
and upload checks, and the command's refusals before any model loads."""

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lotus_cli.app.browse import Folder
from lotus_cli.app.security import Limits, check_upload, exposure_warning, is_loopback, parse_auth
from lotus_cli.app.service import AppOptions, Service, TryOptions
from lotus_cli.cli import app
from lotus_cli.errors import InputError, UsageError

from .conftest import make_image

runner = CliRunner()
RES = 64


def lotus(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def service(depth_g, tmp_path_factory):
    s = Service(AppOptions(models=(str(depth_g),), processing_res=RES), root=tmp_path_factory.mktemp("app"))
    yield s
    s.close()


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(make_image(36, 60, seed=3)).save(path)
    return path


def png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header states w x h and whose pixel data is cut short: readable size, undecodable pixels."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


# ------------------------------------------------------------------------------------------- service


def test_service_maps_equal_lotus_depth_for_the_same_image_and_options(service, depth_g, photo, tmp_path):
    r = service.predict(photo, TryOptions(processing_res=RES, mesh=False))
    out = tmp_path / "cli"
    result = lotus("depth", photo, "-m", depth_g, "--processing-res", RES, "-f", "png,npy", "-o", out)
    assert result.exit_code == 0, result.output
    ours, theirs = np.load(r.folder / "maps" / "photo.npy"), np.load(out / "photo.npy")
    assert ours.shape == (36, 60)
    np.testing.assert_array_equal(ours, theirs)
    png_ours = np.asarray(Image.open(r.image))
    np.testing.assert_array_equal(png_ours, np.asarray(Image.open(out / "photo.png")))
    assert png_ours.shape == (36, 60, 3) and png_ours.std() > 0  # a colour map, not a blank picture
    names = {f.name for f in r.files}
    assert {"photo.png", "photo.16bit.png", "photo.npy", "photo.exr", "photo.json"} <= names
    assert r.record["options"]["processing_res"] == RES and r.record["complete"] is True
    assert r.kind == "disparity" and r.seconds > 0


def test_service_builds_the_mesh_as_lotus_pointcloud_mesh_does(service, photo, tmp_path):
    trimesh = pytest.importorskip("trimesh")
    r = service.predict(photo, TryOptions(processing_res=RES))
    assert r.mesh is not None and r.mesh.suffix == ".glb"
    scene = trimesh.load(r.mesh)
    geometry = list(scene.geometry.values())[0] if hasattr(scene, "geometry") else scene
    assert len(geometry.faces) > 0 and len(geometry.vertices) <= 36 * 60
    ply = next(f for f in r.files if f.name == "photo.ply")
    header = ply.read_bytes()[:4000].decode("latin-1")
    assert "element vertex" in header
    # the same map through `lotus pointcloud --depth MAP IMAGE --mesh` gives the same GLB vertex count
    out = tmp_path / "pc"
    res = lotus(
        "pointcloud", photo, "--depth", r.folder / "maps" / "photo.npy", "--normals", "depth", "--mesh", "-o", out
    )
    assert res.exit_code == 0, res.output
    theirs = trimesh.load(out / "photo.glb")
    theirs = list(theirs.geometry.values())[0] if hasattr(theirs, "geometry") else theirs
    assert len(theirs.vertices) == len(geometry.vertices) and len(theirs.faces) == len(geometry.faces)


def test_a_request_for_another_model_loads_it_in_place_of_the_first(checkpoints, photo, tmp_path):
    """The page's model choice: depth and normal models in one app, one resident at a time; the normals are
    `lotus normal`'s for the same image and options."""
    depth, normal = str(checkpoints[("depth", "d")]), str(checkpoints[("normal", "d")])
    s = Service(AppOptions(models=(depth, normal), processing_res=RES), root=tmp_path / "root")
    try:
        assert s.models == [depth, normal] and s.tasks_of(normal) == ["normal"] and s.spec == depth
        first = s.predictor
        r = s.predict(photo, TryOptions(task="normal", processing_res=RES, mesh=False, model=normal))
        assert s.spec == normal and s.predictor is not first and r.kind == "normal"
        out = tmp_path / "cli"
        result = lotus("normal", photo, "-m", normal, "--processing-res", RES, "-f", "npy", "-o", out)
        assert result.exit_code == 0, result.output
        np.testing.assert_array_equal(np.load(r.folder / "maps" / "photo.npy"), np.load(out / "photo.npy"))
        back = s.predict(photo, TryOptions(processing_res=RES, mesh=False, model=depth))
        assert s.spec == depth and back.kind == "disparity" and s.tasks == ["depth"]
        with pytest.raises(UsageError, match="not one this app serves"):
            s.predict(photo, TryOptions(processing_res=RES, model=str(tmp_path / "elsewhere")))
        with pytest.raises(UsageError, match="not offered"):  # the depth model is loaded: no normals from it
            s.predict(photo, TryOptions(task="normal", processing_res=RES))
    finally:
        s.close()


def test_uncertainty_is_offered_for_a_g_model_and_refused_for_a_d_model(service, depth_d, photo, tmp_path):
    assert service.tasks == ["depth", "uncertainty"]
    r = service.predict(photo, TryOptions(task="uncertainty", processing_res=RES, samples=2))
    assert r.kind == "uncertainty" and r.mesh is None
    spread = np.load(r.folder / "maps" / "photo.npy")
    assert spread.shape == (36, 60) and spread.max() > 0
    d = Service(AppOptions(models=(str(depth_d),), processing_res=RES), root=tmp_path / "d")
    assert d.tasks == ["depth"]
    with pytest.raises(UsageError, match="uncertainty"):
        d.predict(photo, TryOptions(task="uncertainty", processing_res=RES))


def test_a_broken_upload_is_a_message_and_the_service_keeps_serving(service, photo, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(InputError, match="broken.jpg: not a readable image"):
        service.predict(broken, TryOptions(processing_res=RES))
    assert service.predict(photo, TryOptions(processing_res=RES, mesh=False)).image.is_file()


def test_a_video_upload_gives_the_colour_mapped_clip(service, tmp_path):
    from lotus_cli.io.video import open_video

    from .test_video import make_clip

    clip = make_clip(tmp_path / "walk.mp4", 5, 10.0, size=(64, 48))
    r = service.predict(clip, TryOptions(processing_res=RES))
    assert r.video is not None and r.video.name == "walk.mp4" and r.image is None and r.mesh is None
    info, frames = open_video(r.video)
    shown = [f.rgb for f in frames]
    assert len(shown) == 5 and shown[0].shape == (48, 64, 3) and shown[0].std() > 0
    assert r.record["complete"] is True


def test_old_request_folders_are_removed(depth_d, photo, tmp_path):
    s = Service(AppOptions(models=(str(depth_d),), processing_res=RES, keep=2), root=tmp_path / "root")
    folders = [s.predict(photo, TryOptions(processing_res=RES, mesh=False)).folder for _ in range(3)]
    assert [f.exists() for f in folders] == [False, True, True]


# ---------------------------------------------------------------------------------------------- limits


def test_upload_limits_refuse_from_the_header_before_decoding(tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)  # 900 MP stated, pixel data cut short
    with pytest.raises(InputError, match=r"bomb.png: 30000x30000 is 900.0 MP, above the app's 100 MP limit"):
        check_upload(bomb, Limits())
    # without a pixel limit the check passes this undecodable file: its size came from the header alone
    # (decoding would need 2.7 GB and then fail on the cut-short data)
    assert check_upload(bomb, Limits(max_pixels=0)) == (30000, 30000)


def test_upload_file_size_is_checked_before_anything_reads_it(tmp_path):
    junk = tmp_path / "big.png"
    junk.write_bytes(b"x" * 4096)  # not an image at all: the size refusal comes first
    with pytest.raises(InputError, match=r"big.png: 0.0 MB is above the app's 0.001 MB upload limit"):
        check_upload(junk, Limits(max_upload_mb=0.001))
    with pytest.raises(InputError, match="not an image or video file"):
        check_upload(tmp_path / "notes.txt", Limits())
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        check_upload(tmp_path / "empty.png", Limits())
    with pytest.raises(UsageError, match="--max-upload-mb must be >= 0"):
        Limits(max_upload_mb=-1)


def test_host_auth_and_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("0.0.0.0", ("a", "b")) is None
    assert "no authentication" in exposure_warning("0.0.0.0", None)
    assert parse_auth("alice:pa:ss") == ("alice", "pa:ss") and parse_auth(None) is None
    for bad in ("alice", ":x", "alice:"):
        with pytest.raises(UsageError, match="expected user:pass"):
            parse_auth(bad)


# ---------------------------------------------------------------------------------------------- browse


@pytest.fixture(scope="module")
def run_folder(depth_d, tmp_path_factory):
    """An output folder made by `lotus depth` over two photos and a broken file, with its --json records."""
    root = tmp_path_factory.mktemp("browse")
    src = root / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(make_image(30, 40, 1)).save(src / "a.png")
    Image.fromarray(make_image(30, 40, 2)).save(src / "sub" / "b.png")
    (src / "broken.png").write_bytes(b"garbage")
    out = root / "out"
    r = lotus("depth", src, "-m", depth_d, "--processing-res", RES, "--json", "-o", out)
    assert r.exit_code == 1  # one input failed
    records = [line for line in r.stdout.splitlines() if line.startswith("{")]
    (out / "records.jsonl").write_text("\n".join(records) + "\n")
    return root, out


def test_browse_lists_a_lotus_depth_folder_and_marks_the_failed_item(run_folder):
    _, out = run_folder
    folder = Folder(out)
    entries = {e.key: e for e in folder.scan()}
    assert set(entries) == {"a", "sub/b", "broken"}
    assert entries["a"].status == "done" and entries["a"].shown == "a.png"
    assert entries["sub/b"].shown == "sub/b.png" and "sub/b.16bit.png" in entries["sub/b"].files
    assert entries["broken"].status == "failed" and "not a readable image" in entries["broken"].error
    facts = entries["a"].facts()
    assert facts["kind"] == "disparity" and facts["options"]["processing_res"] == RES and facts["seconds"] > 0
    assert folder.input_path(entries["a"]).name == "a.png"
    assert [e.key for e in folder.filtered("failed")] == ["broken"]
    s = folder.summary()
    assert (s["items"], s["done"], s["failed"], s["interrupted"], s["redone"]) == (3, 2, 1, 0, 0)
    assert s["kinds"] == ["disparity"] and len(s["models"]) == 1


def test_browse_marks_interrupted_and_redone_items(run_folder, tmp_path):
    _, out = run_folder
    copy = tmp_path / "out"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    (copy / "a.json").unlink()  # a run stopped between the maps and the sidecar
    record = json.loads((copy / "sub" / "b.json").read_text())
    with open(copy / "records.jsonl", "a") as f:
        f.write(json.dumps({"key": "sub/b", "status": "done", "redone": "made with other options"}) + "\n")
    clip = {**record, "key": "c", "complete": False, "interrupted": True, "outputs": {}}
    (copy / "c.json").write_text(json.dumps(clip))
    folder = Folder(copy)
    entries = {e.key: e for e in folder.scan()}
    assert entries["a"].status == "interrupted" and "no sidecar" in entries["a"].error
    assert entries["c"].status == "interrupted"
    assert [e.key for e in folder.filtered("redone")] == ["sub/b"]
    assert sorted(e.key for e in folder.filtered("interrupted")) == ["a", "c"]
    with pytest.raises(UsageError, match="filter"):
        folder.filtered("nope")


def test_browse_refuses_paths_outside_the_folder(run_folder, tmp_path):
    root, out = run_folder
    folder = Folder(out)
    assert folder.resolve_inside("sub/b.png") == (out / "sub" / "b.png").resolve()
    secret = root / "secret.txt"
    secret.write_text("no")
    for name, why in (
        ("../secret.txt", "'..'"),
        ("sub/../../secret.txt", "'..'"),
        (str(secret), "absolute"),
        ("/etc/passwd", "absolute"),
        ("", "no path"),
    ):
        with pytest.raises(InputError, match=why):
            folder.resolve_inside(name)
    link_out = out / "link.txt"
    link_out.symlink_to(secret)
    dir_out = out / "elsewhere"
    dir_out.symlink_to(root / "in", target_is_directory=True)
    try:
        with pytest.raises(InputError, match="outside the browsed folder"):
            folder.resolve_inside("link.txt")
        with pytest.raises(InputError, match="outside the browsed folder"):
            folder.resolve_inside("elsewhere/a.png")
        assert {e.key for e in folder.scan()} == {"a", "sub/b", "broken"}  # nothing behind the links is listed
    finally:
        link_out.unlink()
        dir_out.unlink()
    with pytest.raises(InputError, match="no such file"):
        folder.resolve_inside("nothing.png")


# -------------------------------------------------------------------------------------------- command


def test_lotus_app_refuses_bad_options_before_loading_a_model(tmp_path, monkeypatch):
    r = lotus("app", "--browse", tmp_path / "missing", "-m", tmp_path / "no-model")
    assert r.exit_code == 2 and "--browse" in r.output and "no such folder" in r.output
    r = lotus("app", "--auth", "alice", "-m", tmp_path / "no-model")
    assert r.exit_code == 2 and "expected user:pass" in r.output
    r = lotus("app", "--max-upload-mb", "-1")
    assert r.exit_code == 2 and "--max-upload-mb must be >= 0" in r.output
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if it were not installed
    r = lotus("app")
    assert r.exit_code == 2 and "pip install 'lotus-cli[app]'" in r.output


def test_importing_lotus_cli_does_not_import_gradio():
    code = "import sys, lotus_cli, lotus_cli.cli, lotus_cli.app.serve; sys.exit('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
