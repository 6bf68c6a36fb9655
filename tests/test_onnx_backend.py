"""--backend onnxruntime|auto: the exported graphs run inside the same batch engine as torch and give its maps
(fp32, within 1e-4) through the command line, with sidecars and --json records saying which backend ran."""

import json
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from .conftest import make_image
from .test_video import make_clip

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lotus_cli.cli import app  # noqa: E402
from lotus_cli.errors import UsageError  # noqa: E402
from lotus_cli.model import backends, onnx_export, onnx_runtime, registry  # noqa: E402
from lotus_cli.run.predict import PredictRequest, predict  # noqa: E402
from lotus_cli.run.results import RECORD_FIELDS  # noqa: E402

runner = CliRunner()
RES = "48"  # a processing size the tiny models' UNet does not halve evenly: 37 x 53 -> 33 x 48


def lotus(*args):
    return runner.invoke(app, [str(a) for a in args])


def records(result) -> list[dict]:
    out = [json.loads(line) for line in result.stdout.splitlines() if line.strip().startswith("{")]
    assert out and all(tuple(r) == RECORD_FIELDS for r in out), result.output
    return out


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "photo.png"
    Image.fromarray(make_image(37, 53, seed=7)).save(path)
    return path


def run_both(command, ckpt, inputs, tmp_path, *extra):
    """{backend: (output folder, --json records)} of one command run with torch and with ONNX Runtime."""
    out = {}
    for backend in ("torch", "onnxruntime"):
        folder = tmp_path / backend
        r = lotus(command, *inputs, "-m", ckpt, "-o", folder, "-f", "npy", "--processing-res", RES, "--json",
                  "--backend", backend, *extra)  # fmt: skip
        assert r.exit_code == 0, r.output
        out[backend] = (folder, records(r))
    return out


@pytest.mark.parametrize("task", ["depth", "normal"])
@pytest.mark.parametrize("family", ["d", "g"])
def test_onnxruntime_gives_torchs_maps_through_the_cli(checkpoints, photo, tmp_path, task, family):
    runs = run_both(task, checkpoints[(task, family)], [photo], tmp_path)
    got, want = (np.load(runs[b][0] / "photo.npy") for b in ("onnxruntime", "torch"))
    assert got.shape == want.shape == ((37, 53) if task == "depth" else (37, 53, 3))
    assert want.std() > 1e-3  # a map that says something
    assert np.abs(got - want).max() < 1e-4
    for backend, (folder, recs) in runs.items():
        side = json.loads((folder / "photo.json").read_text())
        assert side["backend"] == recs[0]["backend"] == backend
    side = json.loads((runs["onnxruntime"][0] / "photo.json").read_text())
    assert side["onnx_provider"] == "CPUExecutionProvider"
    assert (onnx_runtime.Path(side["onnx_graphs"]) / onnx_export.MANIFEST).is_file()


def test_tiles_and_uncertainty_match_torch(depth_g, photo, tmp_path):
    tiled = run_both("depth", depth_g, [photo], tmp_path / "t", "--tile", "32", "--tile-res", "32")
    got, want = (np.load(tiled[b][0] / "photo.npy") for b in ("onnxruntime", "torch"))
    assert json.loads((tiled["onnxruntime"][0] / "photo.json").read_text())["tiling"]
    assert np.abs(got - want).max() < 1e-4
    spread = run_both("uncertainty", depth_g, [photo], tmp_path / "u", "--samples", "3")
    got, want = (np.load(spread[b][0] / "photo.npy") for b in ("onnxruntime", "torch"))
    assert want.max() > 1e-4  # three noise draws that disagree somewhere
    assert np.abs(got - want).max() < 1e-4


def test_a_short_video(depth_d, tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", 3, 5.0, size=(40, 32))
    runs = run_both("depth", depth_d, [clip], tmp_path)
    for backend, (folder, recs) in runs.items():
        assert recs[0]["frames"] == 3 and recs[0]["backend"] == backend
        assert json.loads((folder / "clip.json").read_text())["backend"] == backend
    frames = {k: sorted((runs[k][0] / "clip").glob("*.npy")) for k in runs}
    assert len(frames["torch"]) == len(frames["onnxruntime"]) == 3
    for a, b in zip(frames["onnxruntime"], frames["torch"]):
        assert np.abs(np.load(a) - np.load(b)).max() < 1e-4


def test_skip_existing_keeps_torchs_outputs_and_says_no_backend_ran(depth_d, photo, tmp_path):
    """The backend does not change a map beyond float rounding, so it is not an option a rerun compares."""
    args = [photo, "-m", depth_d, "-o", tmp_path, "-f", "npy", "--processing-res", RES, "--json"]
    assert lotus("depth", *args).exit_code == 0
    again = lotus("depth", *args, "--skip-existing", "--backend", "onnxruntime")
    assert again.exit_code == 0, again.output
    (rec,) = records(again)
    assert rec["status"] == "skipped" and rec["backend"] is None
    assert json.loads((tmp_path / "photo.json").read_text())["backend"] == "torch"


def write_choice(ckpt, winner: str, res: int) -> None:
    ref = registry.fetch(registry.resolve(str(ckpt), "depth"))
    key = backends.calibration_key(ref, "auto", res)
    backends.record(key, {"backend": winner, "seconds": {"torch": 2.0, "onnxruntime": 1.0}, "size": res,
                          "model": ref.label, "machine": {}, "when": "test"})  # fmt: skip


@pytest.mark.parametrize("winner", ["onnxruntime", "torch"])
def test_auto_takes_the_recorded_winner(depth_d, photo, tmp_path, winner, forget_choices):
    write_choice(depth_d, winner, int(RES))
    r = lotus("depth", photo, "-m", depth_d, "-o", tmp_path, "-f", "npy", "--processing-res", RES, "--json",
              "--backend", "auto")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert records(r)[0]["backend"] == winner
    assert f"--backend auto: {winner} (torch 2.00 s, onnxruntime 1.00 s" in r.stderr
    sampled = lotus("depth", photo, "-m", depth_d, "-o", tmp_path / "s", "--processing-res", RES, "--json",
                    "--backend", "auto", "--latent", "sample")  # fmt: skip
    assert sampled.exit_code == 0, sampled.output
    assert records(sampled)[0]["backend"] == "torch"  # only torch draws a posterior sample


@pytest.fixture
def forget_choices():
    """Leaves backends.json as the test found it: a recorded choice changes every later run without --backend."""
    path = backends.cache_file()
    before = path.read_bytes() if path.is_file() else None
    yield
    if before is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(before)


def test_without_backend_a_run_takes_what_auto_recorded_and_never_measures(depth_d, photo, tmp_path, forget_choices):
    """ONNX Runtime becomes the default only where auto measured it faster for this machine, model and size;
    with nothing recorded the default is torch, and nothing is timed or exported."""
    args = ("depth", photo, "-m", depth_d, "-f", "npy", "--json")
    fresh = lotus(*args, "-o", tmp_path / "a", "--processing-res", "40")  # no choice recorded at 40 px
    assert fresh.exit_code == 0, fresh.output
    assert records(fresh)[0]["backend"] == "torch" and "--backend auto" not in fresh.stderr
    assert all(e["size"] != 40 for e in backends.recorded().values())  # it measured nothing
    write_choice(depth_d, "onnxruntime", int(RES))
    faster = lotus(*args, "-o", tmp_path / "b", "--processing-res", RES)
    assert faster.exit_code == 0, faster.output
    assert records(faster)[0]["backend"] == "onnxruntime"
    assert "backend: onnxruntime, which --backend auto measured faster here (torch 2.00 s" in faster.stderr
    forced = lotus(*args, "-o", tmp_path / "c", "--processing-res", RES, "--backend", "torch")
    assert records(forced)[0]["backend"] == "torch"
    bf16 = lotus(*args, "-o", tmp_path / "d", "--processing-res", RES, "--dtype", "bf16")  # graphs are fp32
    assert bf16.exit_code == 0, bf16.output
    assert records(bf16)[0]["backend"] == "torch"
    write_choice(depth_d, "torch", int(RES))
    slower = lotus(*args, "-o", tmp_path / "e", "--processing-res", RES)
    assert records(slower)[0]["backend"] == "torch"


def test_an_export_folder_as_the_model(depth_d, tmp_path):
    """A fixed-size export runs its own size, refuses another one item at a time, and names the model it came
    from in the sidecar (so --skip-existing compares it with torch's outputs)."""
    folder = tmp_path / "graphs"
    onnx_export.export(onnx_export.load(depth_d, 32), folder, res=32)
    for name, hw in (("fits", (32, 32)), ("other", (32, 48))):
        Image.fromarray(make_image(*hw, seed=1)).save(tmp_path / f"{name}.png")
    args = ["-m", folder, "-o", tmp_path / "o", "-f", "npy", "--processing-res", "0", "--json"]
    r = lotus("depth", tmp_path / "fits.png", tmp_path / "other.png", *args, "--backend", "onnxruntime")
    assert r.exit_code == 1, r.output
    by = {rec["key"]: rec for rec in records(r)}
    assert by["fits"]["status"] == "done" and by["fits"]["backend"] == "onnxruntime"
    assert by["other"]["status"] == "failed" and "take only 32x32 px" in by["other"]["error"]
    assert "--backend torch" in by["other"]["error"]
    side = json.loads((tmp_path / "o" / "fits.json").read_text())
    assert side["model"] == str(depth_d) and side["onnx_graphs"] == str(folder.resolve())
    plain = lotus("depth", tmp_path / "fits.png", *args[:3], tmp_path / "p", *args[4:])  # no --backend: its graphs
    assert plain.exit_code == 0 and records(plain)[0]["backend"] == "onnxruntime", plain.output
    refused = lotus("depth", tmp_path / "fits.png", *args, "--backend", "torch")
    assert (
        refused.exit_code == 2 and "is an ONNX export" in refused.output and "--backend onnxruntime" in refused.output
    )


def test_options_the_graphs_cannot_run_are_refused_up_front(depth_d, photo, tmp_path):
    for extra, said in ((["--latent", "sample"], "--latent mean only"), (["--dtype", "bf16"], "fp32 graphs"),
                        (["--compile", "on"], "runs none"), (["--device", "mps"], "not mps")):  # fmt: skip
        r = lotus("depth", photo, "-m", depth_d, "-o", tmp_path, "--backend", "onnxruntime", *extra)
        assert r.exit_code == 2 and said in r.output, (extra, r.output)
    assert lotus("depth", photo, "-m", depth_d, "--backend", "tensorrt").exit_code == 2
    assert not (tmp_path / "photo.png").exists()


def test_without_onnxruntime(depth_d, photo, tmp_path, monkeypatch):
    """onnxruntime asked for: a usage error naming the extra; auto: torch, with a note saying why."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if it were not installed
    with pytest.raises(UsageError, match=r"lotus-cli\[onnx\]"):
        predict(PredictRequest("depth", (str(photo),), tmp_path / "a", str(depth_d), backend="onnxruntime"))
    assert not (tmp_path / "a" / "photo.png").exists()
    r = lotus(
        "depth", photo, "-m", depth_d, "-o", tmp_path / "b", "--processing-res", RES, "--backend", "auto", "--json"
    )
    assert r.exit_code == 0, r.output
    assert records(r)[0]["backend"] == "torch"
    assert "--backend auto: torch (onnx and onnxruntime are not installed" in r.stderr


def test_pointcloud_says_its_backend(depth_d, photo, tmp_path):
    r = lotus("pointcloud", photo, "-m", depth_d, "-o", tmp_path, "--normals", "depth", "--processing-res", RES,
              "--backend", "onnxruntime", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert records(r)[0]["backend"] == "onnxruntime"
    side = json.loads((tmp_path / "photo.json").read_text())
    assert side["backend"] == "onnxruntime" and side["model"] == str(depth_d)


def test_doctor_lists_the_recorded_choices(depth_d):
    write_choice(depth_d, "onnxruntime", 96)
    r = lotus("doctor", "--json")
    assert r.exit_code == 0, r.output
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("{")]
    chosen = [e for e in json.loads(line)["backends"] if e["size"] == 96]
    assert chosen and chosen[0]["backend"] == "onnxruntime" and chosen[0]["model"] == str(depth_d)


@pytest.mark.slow
def test_the_benchmark_smoke_mode_runs_the_three_sides():
    """benchmarks/bench_onnx.py --size tiny: every side in its own process, the ratios and the map check printed."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_onnx.py"), "--size", "tiny", "--res", "64", "--rounds", "1"],
        capture_output=True, text=True, timeout=900, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for said in ("time ratio (o)/(b):", "time ratio (a)/(b):", "peak RSS ratio (o)/(b):", "CPU: ", "flags: "):
        assert said in out.stdout
    diff = float(out.stdout.split("max |map (o) - map (a)|: ")[1].split()[0])
    assert diff <= 1e-4


def test_a_single_graph_export_is_refused_with_the_fix(depth_d, photo, tmp_path):
    """lotus.onnx has no steps to run in tiles or ensembles: the backend names the export to make instead."""
    folder = tmp_path / "one"
    onnx_export.export(onnx_export.load(depth_d, 32), folder, res=32, single=True)
    r = lotus("depth", photo, "-m", folder, "-o", tmp_path / "o", "--processing-res", "32")
    assert r.exit_code == 2 and "single-graph export" in r.output and "--any-size" in r.output
    assert not list(tmp_path.glob("o/*"))  # refused before anything was written
