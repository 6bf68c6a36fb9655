"""`lotus export onnx`: the three graphs, checked, run by ONNX Runtime and compared with the torch predictor."""

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from .conftest import make_image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lotus_cli.cli import app  # noqa: E402
from lotus_cli.errors import UsageError  # noqa: E402
from lotus_cli.model import onnx_export  # noqa: E402
from lotus_cli.model.predictor import PredictOptions  # noqa: E402

RES = 32  # a multiple of the tiny models' 8 px


@pytest.fixture(scope="module")
def exported(depth_d, depth_g, tmp_path_factory):
    """{family: (predictor, folder, manifest)}: D at a fixed size, G with --dynamic."""
    out = {}
    for family, ckpt, dynamic in (("d", depth_d, False), ("g", depth_g, True)):
        pred = onnx_export.load(ckpt, RES)
        folder = tmp_path_factory.mktemp(f"onnx-{family}")
        out[family] = (pred, folder, onnx_export.export(pred, folder, res=RES, dynamic=dynamic))
    return out


def torch_map(pred, image):
    return pred.predict(image, PredictOptions(processing_res=max(image.shape[:2]), seed=0)).map


def onnx_map(pred, folder, image, seed=0):
    h, w = image.shape[:2]
    f = pred.latent_factor
    noise = pred.noise([seed], (h // f, w // f)).numpy() if pred.family == "g" else None
    return pred.finish(torch.from_numpy(onnx_export.run_graphs(folder, image, noise)), (h, w))


@pytest.mark.parametrize("family", ["d", "g"])
def test_graphs_pass_the_checker_and_match_torch(exported, family):
    pred, folder, manifest = exported[family]
    for name in manifest["pipeline"]:
        onnx.checker.check_model(str(folder / f"{name}.onnx"))
    image = make_image(RES, RES, seed=3)  # not the built-in validation image
    got, want = onnx_map(pred, folder, image), torch_map(pred, image)
    assert got.shape == want.shape == (RES, RES)
    assert np.abs(got - want).max() < 1e-4
    assert want.std() > 1e-3  # a map that says something, not a constant both sides agree on
    assert manifest["validation"]["max_abs_diff_map"] < 1e-4


def test_the_unet_takes_the_noise_after_the_latent(exported):
    """G: the noise is an input, and a different draw gives a different map (it is not folded in)."""
    pred, folder, _ = exported["g"]
    image = make_image(RES, RES, seed=4)
    a, b = onnx_map(pred, folder, image, seed=0), onnx_map(pred, folder, image, seed=1)
    assert np.abs(a - b).max() > 1e-3
    names = [i.name for i in onnx.load(str(folder / "unet.onnx")).graph.input]
    assert names == ["latent", "noise"]
    names_d = [i.name for i in onnx.load(str(exported["d"][1] / "unet.onnx")).graph.input]
    assert names_d == ["latent"]


@pytest.mark.parametrize("hw", [(16, 40), (48, 24)])
def test_dynamic_graphs_run_at_other_sizes(exported, hw):
    pred, folder, _ = exported["g"]
    image = make_image(*hw, seed=5)
    got, want = onnx_map(pred, folder, image), torch_map(pred, image)
    assert got.shape == want.shape == hw
    assert np.abs(got - want).max() < 1e-4


def test_fixed_graphs_refuse_other_sizes(exported):
    pred, folder, _ = exported["d"]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        onnx_export.run_graphs(folder, make_image(16, 40), None)


def test_manifest_reads_back(exported):
    pred, folder, manifest = exported["g"]
    back = onnx_export.read_manifest(folder)
    assert back == json.loads(json.dumps(manifest))
    assert back["model"]["family"] == "g" and back["model"]["kind"] == "disparity"
    assert back["dynamic"] is True and back["size_multiple"] == 8 and back["opset"] == onnx_export.OPSET
    assert "dynamo=False" in back["exporter"] and back["versions"]["onnx"] == onnx.__version__
    unet = back["graphs"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["latent", "noise"]
    f = pred.latent_factor
    assert unet["inputs"][0]["shape"] == ["B", 4, f"H/{f}", f"W/{f}"]
    assert "127.5" in back["input"]["image"]
    for g in back["graphs"].values():
        assert sum((folder / f).stat().st_size for f in g["files"]) == g["bytes"]
    fixed = exported["d"][2]["graphs"]["vae_encoder"]["inputs"][0]["shape"]
    assert fixed == [1, 3, RES, RES]


def test_weights_over_the_limit_go_to_external_data(depth_d, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "TWO_GB", 0)  # every graph counts as large
    pred = onnx_export.load(depth_d, RES)
    manifest = onnx_export.export(pred, tmp_path, res=RES)
    assert manifest["graphs"]["unet"]["files"] == ["unet.onnx", "unet.onnx.data"]
    graph, data = (tmp_path / "unet.onnx").stat().st_size, (tmp_path / "unet.onnx.data").stat().st_size
    assert graph < data / 4  # the weights moved (onnx keeps tensors under 1 kB inline)
    assert graph + data == manifest["graphs"]["unet"]["bytes"]
    assert (tmp_path / "unet.onnx.data").stat().st_mode & 0o777 == (tmp_path / "unet.onnx").stat().st_mode & 0o777
    assert manifest["validation"]["max_abs_diff_map"] < 1e-4  # ONNX Runtime found the weights beside the graph


def test_a_resolution_off_the_grid_is_refused(depth_d, tmp_path):
    pred = onnx_export.load(depth_d, RES)
    with pytest.raises(UsageError, match="multiple of 8"):
        onnx_export.export(pred, tmp_path, res=36)
    assert not list(tmp_path.iterdir())


def test_cli_exports_and_reports(exported, depth_d, tmp_path):
    f = exported["d"][0].latent_factor
    result = CliRunner().invoke(app, ["export", "onnx", "-m", str(depth_d), "--out", str(tmp_path), "--res", "16"])
    assert result.exit_code == 0, result.output
    assert "max |diff|" in result.output
    assert onnx_export.read_manifest(tmp_path)["graphs"]["unet"]["inputs"][0]["shape"] == [1, 4, 16 // f, 16 // f]
    args = ["export", "onnx", "-m", str(depth_d), "--out", str(tmp_path / "dyn"), "--res", "16", "--dynamic"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert onnx_export.read_manifest(tmp_path / "dyn")["dynamic"] is True
    bad = CliRunner().invoke(app, ["export", "onnx", "-m", str(depth_d), "--out", str(tmp_path), "--res", "20"])
    assert bad.exit_code == 2
    assert "multiple of 8" in bad.output


def test_missing_onnxruntime_names_the_extra(depth_d, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if it were not installed
    with pytest.raises(UsageError, match=r"onnxruntime is missing.*lotus-cli\[onnx\]"):
        onnx_export.require_onnx()
    result = CliRunner().invoke(app, ["export", "onnx", "-m", str(depth_d), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "lotus-cli[onnx]" in result.output and not list(tmp_path.iterdir())
