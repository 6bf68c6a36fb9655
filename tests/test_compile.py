"""The compiled path (lotus_cli/model/compile.py): same numbers as eager, eager when the compiler is missing or
fails, artifacts cached where the cache settings say, and the --compile auto rule."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from lotus_cli.model import compile as lc
from lotus_cli.model.cpu import prepack
from lotus_cli.model.predictor import LotusPredictor, PredictOptions

from .conftest import make_image

ROOT = Path(__file__).resolve().parents[1]
OPTS = PredictOptions(processing_res=64)


@pytest.fixture
def inductor_env(monkeypatch, tmp_path):
    """compile_predictor sets TORCHINDUCTOR_CACHE_DIR for the process: restore it after each test."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "x")))
    return tmp_path


@contextmanager
def no_cxx():
    """Inductor's C++ compiler set to one that does not exist, through torch's own config patch. Not
    ``monkeypatch.setattr(config.cpp, "cxx", ...)``: ``config.cpp`` is a proxy with no instance ``__dict__``
    entry for ``cxx``, so pytest >= 9.1 records the old value as absent and its undo *deletes* ``cpp.cxx``
    from inductor's config; the next test that reads it then fails (a fresh venv gets the newest pytest)."""
    with torch._inductor.config.patch({"cpp.cxx": (None, "no-such-cxx-for-lotus")}):
        yield


def test_the_missing_compiler_patch_is_seen_and_undone():
    before = torch._inductor.config.cpp.cxx
    with no_cxx():
        assert lc.compiler_missing("cpu") == "no C++ compiler found (install g++ or set CXX)"
    assert torch._inductor.config.cpp.cxx == before


def test_without_a_cpp_compiler_it_runs_eagerly_with_one_reason(depth_g, inductor_env):
    pred = LotusPredictor.from_pretrained(str(depth_g), device="cpu", dtype="fp32")
    img = make_image(48, 64)
    eager = pred.predict(img, OPTS).map
    with no_cxx():
        compiled, reason = lc.compile_predictor(pred, "on", inductor_env / "cache")
    assert not compiled
    assert reason.count("\n") == 0 and "no C++ compiler" in reason and "eager" in reason
    assert pred.unet._compiled_call_impl is None and not (inductor_env / "cache").exists()
    np.testing.assert_array_equal(pred.predict(img, OPTS).map, eager)


@pytest.mark.heavy
def test_a_failing_compiler_falls_back_to_eager_at_the_first_call(depth_g, inductor_env):
    pred = LotusPredictor.from_pretrained(str(depth_g), device="cpu", dtype="fp32")
    img = make_image(48, 64)
    eager = pred.predict(img, OPTS).map

    def broken_backend(gm, example_inputs):
        raise RuntimeError("simulated compiler crash\nwith a long traceback")

    assert lc.compile_predictor(pred, "on", backend=broken_backend)[0]
    np.testing.assert_allclose(pred.predict(img, OPTS).map, eager, atol=1e-5)  # unpacked: ~1e-6 apart
    status = lc.compile_status(pred)
    assert status.startswith("torch.compile failed") and "simulated compiler crash" in status and "\n" not in status
    np.testing.assert_allclose(pred.predict(img, OPTS).map, eager, atol=1e-5)  # and stays eager


def test_off_and_auto_below_the_threshold_leave_the_model_alone(depth_g):
    pred = LotusPredictor.from_pretrained(str(depth_g), device="cpu", dtype="fp32")
    assert lc.compile_predictor(pred, "off") == (False, "--compile off")
    compiled, reason = lc.compile_predictor(pred, "auto", n_items=2)
    assert not compiled and "auto" in reason and pred.unet._compiled_call_impl is None
    with pytest.raises(ValueError):
        lc.compile_predictor(pred, "yes")


def test_should_compile_pays_only_for_long_runs(tmp_path):
    assert not lc.should_compile(1, warm=False) and not lc.should_compile(lc.MIN_ITEMS_COLD - 1, True, warm=False)
    assert lc.should_compile(lc.MIN_ITEMS_COLD, is_video=True, warm=False)
    assert lc.should_compile(lc.MIN_ITEMS_WARM, warm=True) and not lc.should_compile(lc.MIN_ITEMS_WARM - 1, warm=True)
    assert not lc.should_compile(1000, device_type="cuda")  # not measured there: only --compile on
    assert lc.should_compile(None, is_video=True) and not lc.should_compile(None)  # a stream of unknown length
    big = lc.MAX_AUTO_BYTES + 1  # the full-size model ran slower compiled: auto leaves it eager however long
    assert not lc.should_compile(None, is_video=True, weight_bytes=big)
    assert not lc.should_compile(10**6, weight_bytes=big)
    assert not lc.has_cached_artifacts(tmp_path)
    (tmp_path / "fxgraph" / "ab").mkdir(parents=True)
    assert lc.has_cached_artifacts(tmp_path)


def test_cache_dir_follows_lotus_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("LOTUS_CACHE", str(tmp_path / "lc"))
    assert lc.inductor_cache_dir() == tmp_path / "lc" / "inductor"
    monkeypatch.delenv("LOTUS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lc.inductor_cache_dir() == tmp_path / "xdg" / "lotus" / "inductor"


def test_packed_convolutions_are_unpacked_to_the_same_numbers(depth_g):
    pred = LotusPredictor.from_pretrained(str(depth_g), device="cpu", dtype="fp32")
    if not pred.packed:
        pytest.skip("this torch build cannot pack convolutions")
    img = make_image(48, 64)
    before = pred.predict(img, OPTS).map
    n = prepack.unpack_convolutions(pred.unet)
    assert n > 0 and all(type(m).__name__ != "PackedConv2d" for m in pred.unet.modules())
    np.testing.assert_allclose(pred.predict(img, OPTS).map, before, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("vae", [False, True])
def test_compiled_gives_eager_numbers_and_caches_its_artifacts(depth_g, inductor_env, vae):
    if lc.compiler_missing("cpu"):
        pytest.skip(lc.compiler_missing("cpu"))
    pred = LotusPredictor.from_pretrained(str(depth_g), device="cpu", dtype="fp32")
    img = make_image(48, 64)
    eager = pred.predict(img, OPTS).map
    cache = inductor_env / "cache"
    compiled, reason = lc.compile_predictor(pred, "on", cache, vae=vae)
    assert compiled and ("VAE" in reason) == vae
    got = pred.predict(img, OPTS).map
    assert lc.compile_status(pred) is None  # really compiled, no fallback
    assert np.abs(got - eager).max() < 1e-4  # float reordering in fused kernels only
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache) and lc.has_cached_artifacts(cache)


@pytest.mark.slow
def test_compile_and_vae_strips_coexist(depth_g, inductor_env):
    """At 256 px and above the VAE runs in row strips; compiling the UNet leaves them on and exact."""
    if lc.compiler_missing("cpu"):
        pytest.skip(lc.compiler_missing("cpu"))
    pred = LotusPredictor.from_pretrained(str(depth_g), device="cpu", dtype="fp32")
    assert pred.strip_rows > 0
    img, opts = make_image(256, 256), PredictOptions(processing_res=256)
    eager = pred.predict(img, opts).map
    assert lc.compile_predictor(pred, "on", inductor_env / "cache", vae=False)[0] and pred.strip_rows > 0
    assert np.abs(pred.predict(img, opts).map - eager).max() < 1e-4 and lc.compile_status(pred) is None


WARM = """
import json, sys
from torch._dynamo.utils import counters
from lotus_cli.model import compile as lc
from lotus_cli.model.predictor import LotusPredictor, PredictOptions
from tests.conftest import make_image
pred = LotusPredictor.from_pretrained(sys.argv[1], device="cpu", dtype="fp32")
lc.compile_predictor(pred, "on", sys.argv[2], vae=False)
pred.predict(make_image(48, 64), PredictOptions(processing_res=64))
print(json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"], "miss": counters["inductor"]["fxgraph_cache_miss"],
                  "status": lc.compile_status(pred)}))
"""


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_graph_from_the_cache(depth_g, tmp_path):
    if lc.compiler_missing("cpu"):
        pytest.skip(lc.compiler_missing("cpu"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)

    def run():
        out = subprocess.run(
            [sys.executable, "-c", WARM, str(depth_g), str(tmp_path / "cache")],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=1800,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold, warm = run(), run()
    assert cold["status"] is None and cold["miss"] >= 1 and cold["hit"] == 0
    assert warm["status"] is None and warm["hit"] >= 1 and warm["miss"] == 0


def test_cli_compile_on_without_a_compiler_says_so_once_and_writes_eager_maps(tmp_path, depth_d, inductor_env):
    from PIL import Image
    from typer.testing import CliRunner

    from lotus_cli.cli import app

    Image.fromarray(make_image(48, 64)).save(tmp_path / "x.png")
    args = ["depth", str(tmp_path / "x.png"), "-m", str(depth_d), "--processing-res", "64", "-f", "npy"]
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "eager")])
    assert r.exit_code == 0, r.output
    with no_cxx():
        r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "c"), "--compile", "on"])
    assert r.exit_code == 0, r.output
    assert r.stderr.count("no C++ compiler") == 1
    np.testing.assert_array_equal(np.load(tmp_path / "c" / "x.npy"), np.load(tmp_path / "eager" / "x.npy"))
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "d"), "--compile", "sometimes"])
    assert r.exit_code == 2 and "--compile must be auto, on or off" in r.stderr
