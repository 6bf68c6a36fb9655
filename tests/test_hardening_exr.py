"""Issue 28, EXR maps: every --exr-compression value round-trips (float32 and half), names are read in any
case, the depth Y copy says when DWA made it lossy, and an uncertainty map's header states its statistic."""

import json

import numpy as np
import pytest

from lotus_cli.errors import UsageError
from lotus_cli.io import formats
from lotus_cli.io.formats import EXR_COMPRESSIONS, LOSSLESS_EXR, Style
from lotus_cli.io.outputs import output_paths, write_outputs

OpenEXR = pytest.importorskip("OpenEXR", reason="EXR maps need the OpenEXR package")


def smooth_depth(h=32, w=48) -> np.ndarray:
    """A smooth [0, 1] map with fine detail that float16 cannot hold exactly (lossy codecs are made for
    smooth images; their error bound below is for such maps)."""
    yy, xx = np.mgrid[0:h, 0:w] / np.float32(max(h, w))
    return (0.2 + 0.5 * xx + 0.2 * yy**2 + 0.01 * np.sin(7 * xx + 3 * yy) + 1e-4 * xx * yy).astype(np.float32)


def unit_normals(h=32, w=48) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / np.float32(max(h, w))
    n = np.stack([xx - 0.5, 0.3 - yy, np.ones_like(xx)], -1).astype(np.float32)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def channels(path):
    with OpenEXR.File(str(path), separate_channels=True) as f:
        return {k: c.pixels for k, c in f.channels().items()}, dict(f.header())


# the largest error each lossy compression may leave on these smooth maps, float32 / half
LOSSY_BOUND = {"pxr24": 2e-5, "b44": 1e-2, "b44a": 1e-2, "dwaa": 2e-2, "dwab": 2e-2}
OPENEXR_NAME = {c: ("NO" if c == "none" else c.upper()) + "_COMPRESSION" for c in EXR_COMPRESSIONS}


@pytest.mark.parametrize("half", [False, True], ids=["float32", "half"])
@pytest.mark.parametrize("compression", EXR_COMPRESSIONS)
def test_every_compression_writes_and_reads_back(tmp_path, compression, half):
    """`--exr-compression none` crashed the batch (OpenEXR has no NONE_COMPRESSION): each documented value
    now writes depth, normal and uncertainty maps that OpenEXR and our reader read back."""
    style = Style(exr_half=half, exr_compression=compression)
    dtype = np.float16 if half else np.float32
    for key, value, kind, channel in [
        ("d", smooth_depth(), "disparity", "Z"),
        ("n", unit_normals(), "normal", "RGB"),
        ("u", smooth_depth() * 40, "uncertainty", "Y"),
    ]:
        paths = output_paths(tmp_path, key, ("exr",))
        rec = write_outputs(paths, value, kind, {"task": "depth"}, style)
        assert rec["outputs"]["exr"]["compression"] == compression
        ch, header = channels(paths["exr"])
        assert header["compression"] == getattr(OpenEXR, OPENEXR_NAME[compression])
        got = np.stack([ch[c] for c in "RGB"], -1) if channel == "RGB" else ch[channel]
        assert got.dtype == dtype and got.shape == value.shape
        back, _ = formats.FORMATS["exr"].read(paths["exr"])
        assert np.array_equal(back, got)
        want = value.astype(dtype)
        err = np.abs(got.astype(np.float64) - want.astype(np.float64)).max() / max(1.0, float(np.abs(value).max()))
        if compression in LOSSLESS_EXR or (half and compression == "pxr24"):  # pxr24 keeps half exactly
            assert err == 0, (kind, err)
        elif compression in ("b44", "b44a") and not half:
            assert err == 0, (kind, err)  # B44 compresses half channels only
        elif compression in formats.LOSSY_COLOUR_EXR and channel == "Z":
            assert err == 0, (kind, err)  # DWA keeps Z (not a colour channel) exact
        else:
            assert err <= LOSSY_BOUND[compression], (kind, err)


def test_compression_names_are_read_in_any_case_like_format_names(tmp_path):
    assert Style(exr_compression="ZIP").exr_compression == "zip"
    assert Style(exr_compression=" Dwab ").exr_compression == "dwab"
    assert formats.parse_formats("EXR,Npy") == ("exr", "npy")
    with pytest.raises(UsageError, match="--exr-compression 'zip9'"):
        Style(exr_compression="ZIP9")
    paths = output_paths(tmp_path, "x", ("exr",))
    rec = write_outputs(paths, smooth_depth(), "depth", {}, Style(exr_compression="PIZ"))
    assert rec["outputs"]["exr"]["compression"] == "piz"
    assert channels(paths["exr"])[1]["compression"] == OpenEXR.PIZ_COMPRESSION


@pytest.mark.parametrize("compression", ["dwaa", "dwab"])
def test_a_lossy_y_copy_is_said_to_be_lossy(tmp_path, compression):
    """DWA compresses Y (luminance) lossily and Z exactly: the header and sidecar no longer call Y a copy of Z
    without saying so (OpenCV, which reads Y, was 7.9e-3 off)."""
    d = smooth_depth()
    paths = output_paths(tmp_path, "x", ("exr",))
    rec = write_outputs(paths, d, "depth", {}, Style(exr_compression=compression))
    ch, header = channels(paths["exr"])
    assert np.array_equal(ch["Z"], d) and not np.array_equal(ch["Y"], d)
    for note in (header["lotus:Y"], rec["outputs"]["exr"]["Y"]):
        assert f"compressed lossily by {compression}" in note and "Z is exact" in note
    rec = write_outputs(paths, d, "depth", {}, Style(exr_compression="zip"))
    ch, header = channels(paths["exr"])
    assert np.array_equal(ch["Y"], ch["Z"]) and "lossily" not in header["lotus:Y"] + rec["outputs"]["exr"]["Y"]


@pytest.mark.parametrize(
    "task,statistic,unit",
    [
        ("depth", "standard deviation of the [0, 1] maps", "the [0, 1] map's own units"),
        ("normal", "RMS angle in degrees between each sample's normal and the mean direction", "degrees"),
    ],
)
def test_the_uncertainty_header_states_its_statistic_and_unit(tmp_path, task, statistic, unit):
    spread = smooth_depth() * (40 if task == "normal" else 0.1)
    paths = output_paths(tmp_path, "u", ("exr",))
    frame = {"normal_frame": "opengl", "axes": "x right, y up, z toward the camera"}
    side = {"task": task, "model": "m", **frame, "uncertainty": {"statistic": statistic, "samples": 4}}
    mean = (unit_normals(), "normal") if task == "normal" else (smooth_depth(), "disparity")
    rec = write_outputs(paths, spread, "uncertainty", side, Style(), layers={"mean": mean})
    _, header = channels(paths["exr"])
    assert header["lotus:statistic"] == statistic and header["lotus:unit"].startswith(unit)
    assert statistic in header["comments"] and "'uncertainty'" not in header["comments"]  # no missing attribute
    assert rec["uncertainty"]["unit"].startswith(unit) and rec["uncertainty"]["samples"] == 4
    assert json.loads(paths["json"].read_text())["uncertainty"]["statistic"] == statistic
    _, mean_header = channels(tmp_path / "u.mean.exr")  # the mean map is no spread: no statistic there
    assert "lotus:statistic" not in mean_header and mean_header["lotus:kind"] == mean[1]
    # a frame describes vectors: the mean normals carry it, the spread (a scalar) does not
    assert "lotus:normal_frame" not in header and header["lotus:model"] == "m"
    assert ("lotus:normal_frame" in mean_header) == (task == "normal")
