"""benchmarks/bench_gpu.py end to end on a CPU (its table's rows), and its refusal to run without CUDA."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
def test_runs_end_to_end_on_a_cpu_and_prints_every_row(depth_g, tmp_path):
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
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "s/image 32px" in line)
    assert "img/s b=1" in lines[header] and "img/s b=2" in lines[header] and "peak GPU GB" in lines[header]
    rows = {line[:22].strip(): line[22:].split() for line in lines[header + 1 :] if line[:22].strip()}
    for name in ("ours fp32", "ours fp16", "ours bf16", "reference fp16"):
        cells = rows[name]
        assert float(cells[0]) > 0 and float(cells[1]) > 0 and float(cells[2]) > 0  # s/image, img/s at b=1, 2
        assert cells[3] == "-"  # no GPU memory on a CPU
    assert float(rows["ours fp32"][4]) == 0.0  # the baseline against itself
    # fp16 and bf16 are near the fp32 map but not equal to it: the rows really ran in those dtypes
    assert 0 < float(rows["ours fp16"][4]) < 0.05 and 0 < float(rows["ours bf16"][4]) < 0.1
    # the reference sequence in fp16 lands as near to ours in fp32 as ours in fp16 does
    assert 0 < float(rows["reference fp16"][4]) < 0.05
    assert rows["VAE fp16 32px"][0] == "finite" and rows["VAE fp16 48px"][-1] == "float16"


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
