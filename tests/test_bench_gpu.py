"""benchmarks/bench_gpu.py end to end on a CPU (its JSON and table read back), and its refusal to run without CUDA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lotus_cli.model.predictor import LotusPredictor

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.heavy
def test_runs_end_to_end_on_a_cpu_and_writes_every_row(depth_g, tmp_path):
    out = run(
        "--device",
        "cpu",
        "--checkpoint",
        str(depth_g),
        "--res",
        "32",
        "--batches",
        "1,2",
        "--repeats",
        "1",
        "--vae-sizes",
        "32,48",
        "--budget",
        "100000",
        "--out",
        str(tmp_path / "out"),
    )
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())
    assert record["environment"]["torch"] == torch.__version__ and record["processing_res"] == 32
    rows = {r["name"]: r for r in record["rows"]}
    assert list(rows) == ["ours fp32", "lotus depth", "reference fp16", "ours fp16", "ours bf16"]
    for r in rows.values():
        assert all(r["images_per_second"][b] > 0 for b in ("1", "2")) and r["finite"]
        assert r["peak_gb"] is None  # no GPU memory on a CPU
    # `lotus depth` on a CPU is fp32 (auto), loaded as the command loads it: the baseline's numbers
    assert rows["lotus depth"]["dtype"] == "float32" and rows["lotus depth"]["max_diff_vs_fp32"] == 0.0
    pred = LotusPredictor.from_pretrained(depth_g, device="cpu", dtype="auto", processing_res=32)
    assert rows["lotus depth"]["strip_rows"] == pred.strip_rows
    assert rows["lotus depth"]["vae_layout"] == pred.engine.choices.vae
    # fp16 and bf16 are near the fp32 map but not equal to it: the rows really ran in those dtypes
    assert 0 < rows["ours fp16"]["max_diff_vs_fp32"] < 0.05 and 0 < rows["ours bf16"]["max_diff_vs_fp32"] < 0.1
    # the reference sequence in fp16 lands as near to ours in fp32 as ours in fp16 does
    assert 0 < rows["reference fp16"]["max_diff_vs_fp32"] < 0.05
    assert record["vae_fp16"] == [
        {"size": 32, "fp16_finite": True, "vae_dtype": "float16"},
        {"size": 48, "fp16_finite": True, "vae_dtype": "float16"},
    ]
    assert set(record["fastest_fp16"]) == {"1", "2"}
    table = (tmp_path / "out" / "bench_gpu.md").read_text()
    assert table in out.stdout and "| lotus depth | float32 |" in table and "img/s b=2" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: nothing to refuse")
def test_refuses_to_run_without_cuda_unless_told_cpu(depth_g):
    out = run("--checkpoint", str(depth_g), timeout=120)
    assert out.returncode == 2
    assert "CUDA is not available" in out.stderr and "--device cpu" in out.stderr
    assert "ours" not in out.stdout  # nothing was measured on the CPU instead


def test_vae_dtype_for_leaves_fp16_where_it_overflows(depth_g):
    from diffusers import AutoencoderKL

    from lotus_cli.model.gpu import vae_dtype_for

    vae = AutoencoderKL.from_pretrained(depth_g, subfolder="vae", torch_dtype=torch.float16).eval()
    assert vae_dtype_for(vae, torch.float16, (32, 32)) == (torch.float16, None)  # this one is fine in fp16
    assert vae_dtype_for(vae, torch.float32, (32, 32)) == (torch.float32, None)  # only fp16 is probed
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(1e6)  # decoded values far beyond fp16's 65504, within bf16's range
    dtype, reason = vae_dtype_for(vae, torch.float16, (48, 32))
    assert dtype == torch.bfloat16 and "48x32" not in reason and "32x48 px" in reason and "bfloat16" in reason
    assert next(vae.parameters()).dtype == torch.float16  # the probe casts back
