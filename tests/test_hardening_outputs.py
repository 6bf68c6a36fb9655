"""Issue 28, outputs: a rewrite removes what its sidecar no longer lists (and nothing else), --out names a
file as a file, and --out memory:// (gone with the process) is refused."""

import json

import numpy as np
import pytest
from PIL import Image

from lotus_cli.errors import OutputError, UsageError
from lotus_cli.io import remote
from lotus_cli.io.atomic import check_out_dir
from lotus_cli.io.formats import Style
from lotus_cli.io.outputs import output_paths, remove_unlisted, write_outputs
from lotus_cli.io.sidecar import listed_files, read_record, sidecar

from .conftest import make_image


def depth(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((6, 8)).astype(np.float32)


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_rerun_with_fewer_formats_removes_the_maps_it_no_longer_lists(tmp_path):
    """After `-f png,npy` then `-f png16` alone, the old x.npy and x.png stood beside a sidecar that did not list
    them, and `lotus eval` read the npy: now the folder holds what the sidecar lists."""
    write_outputs(output_paths(tmp_path, "x", ("png", "npy")), depth(0), "disparity", sidecar("disparity"))
    assert names(tmp_path) == ["x.json", "x.npy", "x.png"]
    rec = write_outputs(output_paths(tmp_path, "x", ("png16",)), depth(1), "disparity", sidecar("disparity"))
    assert names(tmp_path) == ["x.16bit.png", "x.json"]
    assert set(rec["outputs"]) == {"png16"} and listed_files(read_record(tmp_path / "x.json")) == {"x.16bit.png"}


def test_layers_of_an_earlier_uncertainty_run_go_too_and_other_files_stay(tmp_path):
    paths = output_paths(tmp_path, "x", ("png", "npy"))
    side = sidecar("uncertainty", uncertainty={"statistic": "standard deviation of the [0, 1] maps"})
    write_outputs(paths, depth(0), "uncertainty", side, layers={"mean": (depth(1), "disparity")})
    assert {"x.mean.png", "x.mean.npy"} <= set(names(tmp_path))
    Image.fromarray(make_image(6, 8)).save(tmp_path / "x.16bit.png")  # not ours: no sidecar listed it
    (tmp_path / "y.npy").write_bytes(b"another item's")
    write_outputs(paths, depth(2), "disparity", sidecar("disparity"))  # a plain depth run now
    assert names(tmp_path) == ["x.16bit.png", "x.json", "x.npy", "x.png", "y.npy"]


def test_the_sidecar_is_written_after_the_removal(tmp_path, monkeypatch):
    """A removal that fails leaves no sidecar: nothing vouches for a folder that still holds a stale map."""
    write_outputs(output_paths(tmp_path, "x", ("png", "npy")), depth(0), "disparity", sidecar("disparity"))
    import lotus_cli.io.outputs as O

    def refuse(folder, earlier, now):
        raise OutputError("cannot remove", "fix it")

    monkeypatch.setattr(O, "remove_unlisted", refuse)
    with pytest.raises(OutputError):
        write_outputs(output_paths(tmp_path, "x", ("png",)), depth(1), "disparity", sidecar("disparity"))
    assert not (tmp_path / "x.json").exists()


def test_remove_unlisted_touches_only_plain_names_it_was_given(tmp_path):
    (tmp_path / "a.glb").write_bytes(b"old mesh")
    (tmp_path / "a.mtl").write_bytes(b"old material")
    (tmp_path / "keep.ply").write_bytes(b"cloud")
    (tmp_path / "sub").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("not in the folder")
    earlier = {"a.glb", "a.mtl", "keep.ply", "sub", "../" + outside.name, "gone.obj"}
    removed = remove_unlisted(tmp_path, earlier, {"keep.ply"})
    assert sorted(p.name for p in removed) == ["a.glb", "a.mtl"]
    assert names(tmp_path) == ["keep.ply", "sub"] and outside.exists()
    record = {"outputs": {"obj": {"file": "a.obj", "companions": ["a.mtl", "a_albedo.png"]}, "x": {"file": "../e"}}}
    assert listed_files(record) == {"a.obj", "a.mtl", "a_albedo.png"}


def test_out_that_is_a_file_is_called_a_file(tmp_path):
    (tmp_path / "outfile").write_text("x")
    with pytest.raises(OutputError, match=r"--out .*outfile: not writable: it is a file, not a folder"):
        check_out_dir(tmp_path / "outfile")
    with pytest.raises(OutputError, match=r"outfile/sub: not writable: .*outfile is a file, not a folder"):
        check_out_dir(tmp_path / "outfile" / "sub")
    check_out_dir(tmp_path / "new" / "folder")  # created
    assert (tmp_path / "new" / "folder").is_dir()


@pytest.mark.parametrize("url", ["memory://pc", "memory:///bucket/out", "MEMORY://x", "memory:/pc"])
def test_out_in_memory_is_refused(url):
    """--out memory://... reported success and kept nothing: the filesystem dies with the process."""
    with pytest.raises(UsageError, match="keeps nothing after the run ends") as e:
        remote.Outputs(remote.normalise(url)).check()
    assert e.value.exit_code == 2 and "persistent" in e.value.hint
    remote.check_persistent("s3://bucket/out")  # not refused here (whether it is reachable is check()'s)


def test_an_exr_write_error_of_the_bindings_is_an_output_error(tmp_path, monkeypatch):
    """An encoder's RuntimeError (OpenEXR's bindings) becomes the item's OutputError, not a crash of the batch."""
    import OpenEXR

    class Broken:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, f):
            raise RuntimeError("simulated: cannot write")

    monkeypatch.setattr(OpenEXR, "File", Broken)
    with pytest.raises(OutputError, match="exr encoding failed"):
        write_outputs(output_paths(tmp_path, "x", ("exr",)), depth(), "depth", {}, Style())
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob(".*tmp"))


def test_a_sidecar_of_ours_lists_exactly_the_folder_after_a_model_change(tmp_path):
    first = sidecar("disparity", model={"model": "a"})
    write_outputs(output_paths(tmp_path, "x", ("npy", "exr")), depth(0), "disparity", first)
    second = sidecar("depth", model={"model": "b"})
    write_outputs(output_paths(tmp_path, "x", ("exr",)), depth(1), "depth", second)
    side = json.loads((tmp_path / "x.json").read_text())
    assert side["model"] == "b" and names(tmp_path) == ["x.exr", "x.json"]
