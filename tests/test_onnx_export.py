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
from lotus_cli.errors import OutputError, UsageError  # noqa: E402
from lotus_cli.model import onnx_export, onnx_single  # noqa: E402
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


# -- --fp16 ---------------------------------------------------------------------------------------------


def float_bytes(path):
    """{"FLOAT": bytes, "FLOAT16": bytes} of a graph's initializers."""
    out = {"FLOAT": 0, "FLOAT16": 0}
    for t in onnx.load(str(path)).graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        if name in out:
            out[name] += t.ByteSize()
    return out


def io_dtypes(path):
    g = onnx.load(str(path), load_external_data=False).graph
    return {i.name: onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type) for i in (*g.input, *g.output)}


@pytest.fixture(scope="module")
def exported16(depth_g, tmp_path_factory):
    """{variant: (predictor, folder, manifest)}: --fp16 (VAE fp32), --fp16 --fp16-vae, --fp16 --single."""
    pred = onnx_export.load(depth_g, RES)
    out = {}
    for variant, kw in (("unet", {}), ("all", {"fp16_vae": True}), ("single", {"single": True, "dynamic": True})):
        folder = tmp_path_factory.mktemp(f"onnx16-{variant}")
        out[variant] = (pred, folder, onnx_export.export(pred, folder, res=RES, fp16=True, **kw))
    return out


def test_fp16_weights_are_half_and_the_edges_stay_float32(exported16):
    _, folder, manifest = exported16["unet"]
    assert manifest["precision"] == "fp16" and "convert_float_to_float16" in manifest["fp16"]["method"]
    assert {n: g["weights"] for n, g in manifest["graphs"].items()} == {
        "vae_encoder": "fp32",
        "unet": "fp16",
        "vae_decoder": "fp32",
    }
    for name in manifest["pipeline"]:
        onnx.checker.check_model(str(folder / f"{name}.onnx"))
        assert set(io_dtypes(folder / f"{name}.onnx").values()) == {"FLOAT"}  # fed as the fp32 export is
    unet = float_bytes(folder / "unet.onnx")
    assert unet["FLOAT16"] > 0.99 * (unet["FLOAT16"] + unet["FLOAT"])  # what stays fp32 is shape arithmetic
    assert float_bytes(folder / "vae_decoder.onnx")["FLOAT16"] == 0
    _, folder_all, manifest_all = exported16["all"]
    assert {g["weights"] for g in manifest_all["graphs"].values()} == {"fp16"}
    decoder = float_bytes(folder_all / "vae_decoder.onnx")
    assert decoder["FLOAT16"] > 0.99 * (decoder["FLOAT16"] + decoder["FLOAT"])
    assert manifest_all["graphs"]["vae_decoder"]["bytes"] < 0.6 * manifest["graphs"]["vae_decoder"]["bytes"]


@pytest.mark.parametrize("variant", ["unet", "all", "single"])
def test_fp16_runs_under_onnxruntime_and_its_difference_is_reported(exported16, variant):
    """ONNX Runtime's CPU provider runs the fp16 graphs (ops it has no fp16 kernel for between casts it
    inserts): the manifest reports the map's difference from torch fp32, with no tolerance."""
    pred, folder, manifest = exported16[variant]
    v = manifest["validation"]
    assert v["ran"] is True and v["finite"] is True and v["tolerance"] is None and v["reference"] == "torch fp32"
    assert 1e-5 < v["max_abs_diff_map"] < 0.05  # fp16 rounding shows, and the map is still the map
    image = make_image(RES, RES, seed=3)
    if variant == "single":
        f = pred.latent_factor
        got = onnx_single.as_map(onnx_export.run_single(folder, image, pred.noise([0], (RES // f,) * 2).numpy()))
    else:
        got = onnx_map(pred, folder, image)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - torch_map(pred, image)).max() < 0.05


def test_fp16_single_keeps_the_vae_in_fp32(exported16):
    _, folder, manifest = exported16["single"]
    assert manifest["graphs"]["lotus"]["weights"].startswith("fp16 UNet, fp32 VAE")
    weights = float_bytes(folder / "lotus.onnx")
    assert weights["FLOAT16"] > 0 and weights["FLOAT"] > 0
    assert set(io_dtypes(folder / "lotus.onnx").values()) == {"FLOAT"}


def test_fp16_that_onnxruntime_cannot_run_is_reported_not_raised(depth_d, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Conv")

    monkeypatch.setattr(onnx_export, "run_graphs", refuse)
    manifest = onnx_export.export(onnx_export.load(depth_d, RES), tmp_path, res=RES, fp16=True)
    v = onnx_export.read_manifest(tmp_path)["validation"]
    assert v == manifest["validation"]
    assert v["ran"] is False and v["max_abs_diff_map"] is None and "NOT_IMPLEMENTED" in v["error"]
    with pytest.raises(RuntimeError):  # fp32 graphs have no such excuse
        onnx_export.export(onnx_export.load(depth_d, RES), tmp_path / "fp32", res=RES)


def test_fp16_with_a_non_finite_map_fails(depth_d, tmp_path, monkeypatch):
    def overflow(*args, **kwargs):
        return np.full((1, 3, RES, RES), np.nan, dtype=np.float32)

    monkeypatch.setattr(onnx_export, "run_graphs", overflow)
    with pytest.raises(OutputError, match="inf or NaN"):
        onnx_export.export(onnx_export.load(depth_d, RES), tmp_path, res=RES, fp16=True)
    v = onnx_export.read_manifest(tmp_path)["validation"]  # written, so the failure can be looked at
    assert v["finite"] is False and v["max_abs_diff_map"] is None


def test_fp16_weights_over_the_limit_go_to_external_data(depth_d, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "TWO_GB", 0)
    manifest = onnx_export.export(onnx_export.load(depth_d, RES), tmp_path, res=RES, fp16=True)
    assert manifest["graphs"]["unet"]["files"] == ["unet.onnx", "unet.onnx.data"]
    assert float_bytes(tmp_path / "unet.onnx")["FLOAT16"] > 0  # loaded with its external data
    assert (tmp_path / "unet.onnx.data").stat().st_mode & 0o777 == (tmp_path / "unet.onnx").stat().st_mode & 0o777
    assert manifest["validation"]["ran"] is True


# -- --single -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(exported, checkpoints, tmp_path_factory):
    """{name: (predictor, folder, manifest)}: G depth --dynamic (the three-graph G export beside it in
    ``exported``), D normal at a fixed size."""
    out = {}
    for name, ckpt, dynamic in (
        ("g", checkpoints[("depth", "g")], True),
        ("normal", checkpoints[("normal", "d")], False),
    ):
        pred = onnx_export.load(ckpt, RES)
        folder = tmp_path_factory.mktemp(f"onnx-single-{name}")
        out[name] = (pred, folder, onnx_export.export(pred, folder, res=RES, dynamic=dynamic, single=True))
    return out


def single_map(pred, folder, image, seed=0):
    h, w = image.shape[:2]
    f = pred.latent_factor
    noise = pred.noise([seed], (h // f, w // f)).numpy() if pred.family == "g" else None
    return onnx_export.run_single(folder, image, noise)


@pytest.mark.parametrize("hw", [(RES, RES), (16, 40), (48, 24)])
def test_single_graph_equals_the_three_graphs_and_torch(single, exported, hw):
    pred, folder, manifest = single["g"]
    assert sorted(p.name for p in folder.iterdir()) == ["lotus-onnx.json", "lotus.onnx"]
    onnx.checker.check_model(str(folder / "lotus.onnx"))
    image = make_image(*hw, seed=6)
    out = single_map(pred, folder, image)
    assert out.shape == (1, 1, *hw) and out.dtype == np.float32  # the map itself, not the decoder's output
    got = onnx_single.as_map(out)
    three = onnx_map(exported["g"][0], exported["g"][1], image)  # the same checkpoint, three dynamic graphs
    want = torch_map(pred, image)
    assert np.abs(got - three).max() < 1e-4 and np.abs(got - want).max() < 1e-4
    assert want.std() > 1e-3
    assert manifest["validation"]["max_abs_diff_map"] < 1e-4 and manifest["precision"] == "fp32"


def test_the_three_graph_runner_names_the_single_graph(single):
    pred, folder, _ = single["normal"]
    with pytest.raises(UsageError, match="lotus.onnx.*--single"):
        onnx_export.run_graphs(folder, make_image(RES, RES), None)


def test_single_graph_takes_the_noise_and_a_batch(single):
    pred, folder, _ = single["g"]
    image = make_image(RES, RES, seed=7)
    a, b = single_map(pred, folder, image, seed=0), single_map(pred, folder, image, seed=1)
    assert np.abs(a - b).max() > 1e-3  # the noise is an input, not folded in
    import onnxruntime as ort

    f = pred.latent_factor
    rgb = np.stack([image, image[::-1].copy()]).astype(np.float32).transpose(0, 3, 1, 2) / 255
    noise = pred.noise([0, 0], (RES // f, RES // f)).numpy()
    (batch,) = ort.InferenceSession(str(folder / "lotus.onnx")).run(None, {"rgb": rgb, "noise": noise})
    assert batch.shape == (2, 1, RES, RES)
    assert np.abs(batch[:1] - a).max() < 1e-4


def test_single_graph_gives_unit_normals(single):
    pred, folder, manifest = single["normal"]
    image = make_image(RES, RES, seed=8)
    out = single_map(pred, folder, image)
    assert out.shape == (1, 3, RES, RES)
    assert np.abs(np.linalg.norm(out, axis=1) - 1).max() < 1e-4
    assert np.abs(onnx_single.as_map(out) - torch_map(pred, image)).max() < 1e-4
    assert [i["name"] for i in manifest["graphs"]["lotus"]["inputs"]] == ["rgb"]  # D: no noise
    assert manifest["graphs"]["lotus"]["outputs"][0]["shape"] == [1, 3, RES, RES]


def test_single_manifest_describes_the_graph(single):
    pred, folder, manifest = single["g"]
    back = onnx_export.read_manifest(folder)
    assert back == json.loads(json.dumps(manifest))
    assert back["pipeline"] == ["lotus"] and list(back["graphs"]) == ["lotus"]
    g = back["graphs"]["lotus"]
    f = pred.latent_factor
    assert g["inputs"][0] == {"name": "rgb", "shape": ["B", 3, "H", "W"], "dtype": "float32",
                              "meaning": "RGB in [0, 1] (x / 255)"}  # fmt: skip
    assert g["inputs"][1]["name"] == "noise" and g["inputs"][1]["shape"] == ["B", 4, f"H/{f}", f"W/{f}"]
    assert g["outputs"][0]["name"] == "map" and g["outputs"][0]["shape"] == ["B", 1, "H", "W"]
    assert g["bytes"] == (folder / "lotus.onnx").stat().st_size and g["files"] == ["lotus.onnx"]
    assert "x / 255" in back["input"]["image"] and back["model"]["kind"] == "disparity"
    assert back["dynamic"] is True and back["size_multiple"] == 8


def test_cli_exports_fp16_and_single(depth_d, tmp_path):
    args = ["export", "onnx", "-m", str(depth_d), "--res", "16"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "h"), "--fp16"])
    assert result.exit_code == 0, result.output
    assert "unet" in result.output and "(fp16)" in result.output and "torch fp32" in result.output
    assert "no tolerance" in result.output
    assert onnx_export.read_manifest(tmp_path / "h")["graphs"]["unet"]["weights"] == "fp16"
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "s"), "--single", "--dynamic"])
    assert result.exit_code == 0, result.output
    assert "lotus" in result.output and "tolerance 1e-04" in result.output
    assert onnx_export.read_manifest(tmp_path / "s")["pipeline"] == ["lotus"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "sh"), "--single", "--fp16", "--fp16-vae"])
    assert result.exit_code == 0, result.output
    assert onnx_export.read_manifest(tmp_path / "sh")["graphs"]["lotus"]["weights"] == "fp16"
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--fp16-vae"])
    assert bad.exit_code == 2 and "--fp16-vae needs --fp16" in bad.output
    assert not (tmp_path / "x").exists()


def test_cli_any_size_graphs_take_sizes_off_the_grid_and_match_torch(depth_d, tmp_path):
    """--any-size (with --dynamic implied): the sizes lotus's own runs make, such as 432 px at 768, which plain
    --dynamic graphs refuse, run and give torch's map; refused with --single."""
    args = ["export", "onnx", "-m", str(depth_d), "--res", "16"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a"), "--any-size"])
    assert result.exit_code == 0, result.output
    manifest = onnx_export.read_manifest(tmp_path / "a")
    assert manifest["dynamic"] is True and manifest["size_multiple"] == 1
    pred = onnx_export.load(depth_d, 16)
    f = pred.latent_factor
    hw = (onnx_export.size_multiple(pred) * 2 + f, onnx_export.size_multiple(pred) + 3 * f)  # off the 2^k grid
    image = make_image(*hw, seed=9)
    got, want = onnx_map(pred, tmp_path / "a", image), torch_map(pred, image)
    assert got.shape == want.shape == hw and np.abs(got - want).max() < 1e-4
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--any-size", "--single"])
    assert bad.exit_code == 2 and "drop --single" in bad.output and not (tmp_path / "x").exists()
