import json

import cv2
import matplotlib
import numpy as np
import pytest

from lotus_cli import sinks, visualize
from lotus_cli.errors import UsageError


def test_depth_colour_map_is_the_reference_formula():
    d = np.random.default_rng(0).random((7, 9)).astype(np.float32)
    ours = visualize.colorize_depth(d, "disparity")
    t = (d - d.min()) / (d.max() - d.min())
    ref = (matplotlib.colormaps["Spectral"](1 - t)[..., :3] * 255).astype(np.uint8)  # reference: cmap(1-d)
    assert np.array_equal(ours, ref)
    near = visualize.colorize_depth(np.array([[1.0, 0.0]]), "disparity")
    assert near[0, 0, 0] > 150 and near[0, 0, 2] < 100  # near (disparity 1) is red
    near_depth = visualize.colorize_depth(np.array([[0.0, 1.0]]), "depth")
    assert np.array_equal(near_depth[0, 0], near[0, 0])  # near is warm for both kinds


def test_normal_encoding():
    n = np.array([[[0, 0, 1], [0, 1, 0]]], np.float32)
    rgb = visualize.normal_to_rgb(n)
    assert rgb[0, 0].tolist() == [127, 127, 255] and rgb[0, 1].tolist() == [127, 255, 127]


def test_formats_parse():
    assert sinks.parse_formats("png, NPY") == ("png", "npy")
    assert sinks.parse_formats("all") == ("png", "png16", "npy", "exr")  # every format, EXR included
    with pytest.raises(UsageError):
        sinks.parse_formats("png,exr2")


def test_write_outputs_round_trip(tmp_path):
    d = np.linspace(0.2, 0.7, 30, dtype=np.float32).reshape(5, 6)
    paths = sinks.output_paths(tmp_path, "a/x", ("png", "png16", "npy"))
    assert paths["npy"] == tmp_path / "a" / "x.npy" and paths["png16"].name == "x.16bit.png"
    rec = sinks.write_outputs(paths, d, "disparity", {"model": "m"})
    assert np.array_equal(np.load(paths["npy"]), d)
    png16 = cv2.imread(str(paths["png16"]), cv2.IMREAD_UNCHANGED)
    assert png16.dtype == np.uint16 and png16.min() == 0 and png16.max() == 65535  # the full range
    side = json.loads(paths["json"].read_text())
    assert side == json.loads(json.dumps(rec))
    m = side["outputs"]["png16"]
    decoded = m["min"] + png16 / 65535 * (m["max"] - m["min"])
    assert np.abs(decoded - d).max() < 1e-5
    assert side["kind"] == "disparity" and side["value_range"] == pytest.approx([0.2, 0.7])
    colour = cv2.imread(str(paths["png"]))[:, :, ::-1]
    assert np.array_equal(colour, visualize.colorize_depth(d, "disparity"))


def test_normal_png16_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    n = rng.normal(size=(4, 5, 3)).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    paths = sinks.output_paths(tmp_path, "n", ("png16",))
    sinks.write_outputs(paths, n, "normal", {})
    back = cv2.imread(str(paths["png16"]), cv2.IMREAD_UNCHANGED)[:, :, ::-1] / 65535 * 2 - 1
    assert np.abs(back - n).max() < 2e-5


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.npy"
    with pytest.raises(RuntimeError):
        with sinks.atomic_open(target) as f:
            f.write(b"partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with sinks.atomic_open(target) as f:
            f.write(b"new but partial")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1
