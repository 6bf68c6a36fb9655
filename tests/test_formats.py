"""The format registry: suffixes, encodings read back, and EXR maps that OpenEXR and OpenCV read (issue 17)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.errors import InputError, UsageError
from lotus_cli.evaluate.run import read_prediction
from lotus_cli.io import formats, sources
from lotus_cli.io.formats import Style
from lotus_cli.io.outputs import output_paths, write_map, write_outputs

from .conftest import make_image

OpenEXR = pytest.importorskip("OpenEXR", reason="EXR maps need the OpenEXR package")
runner = CliRunner()


def depth_map(h=23, w=31, seed=0) -> np.ndarray:
    """Values that float16 cannot hold exactly, so bit-exactness of float32 files means something."""
    return np.random.default_rng(seed).random((h, w)).astype(np.float32)


def unit_normals(h=9, w=11, seed=1) -> np.ndarray:
    n = np.random.default_rng(seed).normal(size=(h, w, 3)).astype(np.float32)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def exr_channels(path: Path) -> tuple[dict, dict]:
    with OpenEXR.File(str(path), separate_channels=True) as f:
        return {k: c.pixels for k, c in f.channels().items()}, dict(f.header())


def test_registry_names_suffixes_and_sidecars():
    assert [f.name for f in formats.FORMATS.values()] == ["png", "png16", "npy", "exr"]
    assert formats.get_format("exr").suffix == ".exr"
    with pytest.raises(UsageError, match="unknown format 'tiff'"):
        formats.get_format("tiff")
    for name, fmt in [("x.16bit.png", "png16"), ("x.PNG", "png"), ("x.npy", "npy"), ("a.b.exr", "exr")]:
        assert formats.format_of(Path(name)).name == fmt
    assert formats.format_of(Path("x.tif")) is None
    assert sources.sidecar_of(Path("d/x.16bit.png")) == Path("d/x.json")
    assert sources.sidecar_of(Path("d/a.b.exr")) == Path("d/a.b.json")
    assert sources.sidecar_of(Path("d/x.mean.npy")) == Path("d/x.mean.json")
    assert output_paths(Path("o"), "a/x", ("exr", "png16"))["exr"] == Path("o/a/x.exr")
    # per-frame formats: every one but the colour picture, which goes into the clip's mp4
    assert [f.name for f in formats.FORMATS.values() if f.per_frame] == ["png16", "npy", "exr"]


def test_png16_decoded_through_the_sidecar_note(tmp_path):
    d = 0.2 + 0.5 * depth_map()
    paths = output_paths(tmp_path, "x", ("png16",))
    rec = write_outputs(paths, d, "depth", {})
    back = formats.read_map(paths["png16"], "depth", rec["outputs"]["png16"])
    assert np.abs(back - d).max() < 0.5 * 0.5 / 65535 + 1e-6  # one 16-bit step over the map's range


def test_exr_depth_equals_npy_bit_for_bit_with_its_meaning_in_the_header(tmp_path):
    d = depth_map()
    paths = output_paths(tmp_path, "x", ("npy", "exr"))
    rec = write_outputs(paths, d, "disparity", {"model": "some/model"})
    ch, header = exr_channels(paths["exr"])
    assert ch["Z"].dtype == np.float32 and ch["Z"].shape == d.shape
    assert np.array_equal(ch["Z"].view(np.uint32), np.load(paths["npy"]).view(np.uint32))
    assert np.array_equal(ch["Y"], ch["Z"])  # the copy OpenCV reads
    assert header["compression"] == OpenEXR.ZIP_COMPRESSION
    assert header["lotus:kind"] == "disparity" and header["lotus:scale"] == "affine-invariant"
    assert header["lotus:unit"].startswith("none") and "larger = nearer" in header["lotus:values"]
    assert header["lotus:model"] == "some/model" and "disparity" in header["comments"]
    assert rec["outputs"]["exr"]["dtype"] == "float32" and rec["outputs"]["exr"]["channels"] == ["Z", "Y"]


def test_exr_half_within_half_precision_and_other_compression(tmp_path):
    d = depth_map()
    paths = output_paths(tmp_path, "x", ("exr",))
    rec = write_outputs(paths, d, "depth", {}, Style(exr_half=True, exr_compression="piz"))
    ch, header = exr_channels(paths["exr"])
    assert ch["Z"].dtype == np.float16 and header["compression"] == OpenEXR.PIZ_COMPRESSION
    assert np.array_equal(ch["Z"], d.astype(np.float16))
    assert np.all(np.abs(ch["Z"].astype(np.float32) - d) <= np.spacing(np.float16(1)) / 2)  # [0, 1]: <= 2^-11
    assert header["lotus:kind"] == "depth" and "larger = farther" in header["lotus:values"]
    assert rec["outputs"]["exr"]["dtype"] == "float16" and rec["outputs"]["exr"]["compression"] == "piz"
    with pytest.raises(UsageError, match="--exr-compression 'zstd9'"):
        Style(exr_compression="zstd9")


def test_exr_normals_are_rgb_xyz_in_the_stated_frame_and_spread_is_y(tmp_path):
    n = unit_normals()
    paths = output_paths(tmp_path, "n", ("npy", "exr"))
    write_outputs(paths, n, "normal", {"normal_frame": "opencv", "axes": "x right, y down, z forward"})
    ch, header = exr_channels(paths["exr"])
    assert set(ch) == {"R", "G", "B"}
    got = np.stack([ch["R"], ch["G"], ch["B"]], axis=-1)
    assert np.array_equal(got.view(np.uint32), np.load(paths["npy"]).view(np.uint32))
    assert header["lotus:normal_frame"] == "opencv" and header["lotus:axes"] == "x right, y down, z forward"
    spread = depth_map(9, 11) * 40  # degrees
    paths = output_paths(tmp_path, "u", ("exr",))
    write_outputs(paths, spread, "uncertainty", {}, layers={"mean": (n, "normal")})
    ch, header = exr_channels(paths["exr"])
    assert set(ch) == {"Y"} and np.array_equal(ch["Y"], spread) and header["lotus:kind"] == "uncertainty"
    mean, _ = exr_channels(tmp_path / "u.mean.exr")
    assert set(mean) == {"R", "G", "B"} and np.array_equal(mean["B"], n[..., 2])


def test_exr_maps_read_back_by_pointcloud_and_eval_readers(tmp_path):
    d = depth_map()
    paths = output_paths(tmp_path, "x", ("exr",))
    write_outputs(paths, d, "disparity", {})
    values, info = sources.read_depth_map(paths["exr"])
    assert np.array_equal(values, d) and info["kind"] == "disparity" and info["sidecar"] == str(paths["json"])
    paths["json"].unlink()  # the EXR header alone says what it is
    values, info = sources.read_depth_map(paths["exr"])
    assert np.array_equal(values, d) and info["kind"] == "disparity" and "EXR header" in info["units"]
    assert np.array_equal(read_prediction(paths["exr"], "depth"), d)
    n = unit_normals()
    npaths = output_paths(tmp_path, "n", ("exr",))
    write_outputs(npaths, n, "normal", {})
    assert np.array_equal(read_prediction(npaths["exr"], "normal"), n)
    with pytest.raises(InputError, match="not a single-channel map"):
        sources.read_depth_map(npaths["exr"])
    (tmp_path / "bad.exr").write_bytes(b"not an exr")
    with pytest.raises(InputError, match="bad.exr: not a readable prediction"):
        read_prediction(tmp_path / "bad.exr", "depth")


def test_metric_exr_without_sidecar_keeps_its_unit(tmp_path):
    z = 1.0 + 3 * depth_map()
    path = tmp_path / "m.exr"
    write_map(path, "exr", z, "depth", about={"unit": "m"})
    _, header = exr_channels(path)
    assert header["lotus:scale"] == "metric" and header["lotus:unit"] == "m"
    values, info = sources.read_depth_map(path)
    assert np.array_equal(values, z) and info["per_metre"] == 1.0


OPENCV_SCRIPT = """
import os, sys
os.environ["OPENCV_IO_ENABLE_OPENEXR"] = "1"  # before cv2 is imported: its EXR codec is off by default
import cv2
import numpy as np
if "OpenEXR:                     NO" in cv2.getBuildInformation().replace("\\t", " "):
    print("SKIP OpenCV", cv2.__version__, "was built without OpenEXR")
    sys.exit(0)
flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH
d = cv2.imread(sys.argv[1], flags)
n = cv2.imread(sys.argv[2], flags)
assert d is not None and n is not None, "OpenCV could not read the files"
np.save(sys.argv[3], d)
np.save(sys.argv[4], n[:, :, ::-1])  # BGR -> RGB
print("OK", cv2.__version__)
"""


def test_opencv_reads_our_exr(tmp_path):
    d, n = depth_map(), unit_normals()
    dp, np_ = output_paths(tmp_path, "d", ("exr",)), output_paths(tmp_path, "n", ("exr",))
    write_outputs(dp, d, "disparity", {})
    write_outputs(np_, n, "normal", {})
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            OPENCV_SCRIPT,
            str(dp["exr"]),
            str(np_["exr"]),
            str(tmp_path / "d.npy"),
            str(tmp_path / "n.npy"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip() + " (opencv-python-headless 4.x wheels have it)")
    assert np.array_equal(np.load(tmp_path / "d.npy"), d)
    assert np.array_equal(np.load(tmp_path / "n.npy"), n)


def test_cli_writes_exr_for_images_videos_and_tiles(tmp_path, checkpoints):
    from PIL import Image

    from .test_video import make_clip

    depth_d = checkpoints[("depth", "d")]
    Image.fromarray(make_image(40, 56)).save(tmp_path / "x.png")
    r = runner.invoke(
        app,
        [
            "depth",
            str(tmp_path / "x.png"),
            "-o",
            str(tmp_path / "o"),
            "-m",
            str(depth_d),
            "--processing-res",
            "32",
            "-f",
            "exr,npy",
        ],
    )
    assert r.exit_code == 0, r.output
    ch, _ = exr_channels(tmp_path / "o" / "x.exr")
    assert np.array_equal(ch["Z"], np.load(tmp_path / "o" / "x.npy"))
    make_clip(tmp_path / "c.mp4", n=5, fps=5)
    r = runner.invoke(
        app,
        [
            "normal",
            str(tmp_path / "c.mp4"),
            "-o",
            str(tmp_path / "v"),
            "-m",
            str(checkpoints[("normal", "d")]),
            "--processing-res",
            "32",
            "-f",
            "exr,npy",
        ],
    )
    assert r.exit_code == 0, r.output
    exrs = sorted((tmp_path / "v" / "c").glob("*.exr"))
    npys = sorted((tmp_path / "v" / "c").glob("*.npy"))
    assert [p.stem for p in exrs] == [p.stem for p in npys] and exrs[0].name == "000000_000000.000s.exr"
    ch, _ = exr_channels(exrs[2])
    assert np.array_equal(np.stack([ch[c] for c in "RGB"], -1), np.load(npys[2]))
    side = json.loads((tmp_path / "v" / "c.json").read_text())
    assert side["outputs"]["exr"]["channels"] == ["R", "G", "B"] and side["outputs"]["exr"]["folder"] == "c"
    Image.fromarray(make_image(96, 128, 7)).save(tmp_path / "big.png")
    r = runner.invoke(
        app,
        [
            "depth",
            str(tmp_path / "big.png"),
            "-o",
            str(tmp_path / "t"),
            "-m",
            str(depth_d),
            "-f",
            "exr,npy",
            "--processing-res",
            "32",
            "--tile",
            "48",
            "--tile-res",
            "32",
        ],
    )
    assert r.exit_code == 0, r.output
    ch, _ = exr_channels(tmp_path / "t" / "big.exr")
    assert ch["Z"].shape == (96, 128) and np.array_equal(ch["Z"], np.load(tmp_path / "t" / "big.npy"))


def test_exr_without_openexr_is_one_usage_error_naming_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "OpenEXR" else real(name, *a))
    with pytest.raises(UsageError, match="--format exr needs the OpenEXR package") as e:
        formats.parse_formats("png,exr")
    assert "pip install OpenEXR" in e.value.hint
    assert formats.parse_formats("png,npy") == ("png", "npy")  # other formats do not need it
    monkeypatch.setitem(sys.modules, "OpenEXR", None)  # an import that fails
    with pytest.raises(UsageError, match="EXR maps need the OpenEXR package"):
        formats.FORMATS["exr"].encode(depth_map(), "depth")


def test_exr_written_through_a_file_where_the_bindings_take_only_paths(tmp_path, monkeypatch):
    class PathOnlyFile(OpenEXR.File):  # OpenEXR before 3.5: write() takes a file name, not a stream
        def write(self, target):
            if not isinstance(target, str):
                raise TypeError("write(): incompatible function arguments")
            super().write(target)

    monkeypatch.setattr(OpenEXR, "File", PathOnlyFile)
    d = depth_map()
    data, _ = formats.FORMATS["exr"].encode(d, "depth")
    monkeypatch.undo()
    (tmp_path / "x.exr").write_bytes(data)
    ch, _ = exr_channels(tmp_path / "x.exr")
    assert np.array_equal(ch["Z"], d)
