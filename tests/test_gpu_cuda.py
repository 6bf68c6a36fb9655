"""On a real CUDA device (marker ``gpu``: skipped without one): what the stand-ins of test_gpu_*.py assume,
checked against the card. docs/gpus.md asks whoever lends a GPU to run these and send the output back."""

import numpy as np
import pytest
import torch

from lotus_cli.model import gpu
from lotus_cli.model.predictor import LotusPredictor, PredictOptions, resolve_device

from .conftest import make_image

pytestmark = pytest.mark.gpu
OPTS = PredictOptions(processing_res=64)


def test_bf16_decision_matches_the_card():
    dev = resolve_device("cuda")
    major, _ = torch.cuda.get_device_capability(dev)
    assert gpu.bf16_supported(dev) == (major >= 8 or bool(torch.version.hip))
    if gpu.bf16_supported(dev):  # a bf16 convolution runs there
        x = torch.randn(1, 8, 16, 16, device=dev, dtype=torch.bfloat16)
        w = torch.randn(8, 8, 3, 3, device=dev, dtype=torch.bfloat16)
        assert torch.isfinite(torch.nn.functional.conv2d(x, w, padding=1)).all()


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_cuda_prediction_is_finite_and_near_the_cpu(depth_g, dtype):
    img = make_image(48, 64)
    cpu = LotusPredictor.from_pretrained(depth_g, device="cpu", dtype="fp32", processing_res=64).predict(img, OPTS)
    pred = LotusPredictor.from_pretrained(depth_g, device="cuda", dtype=dtype, processing_res=64)
    assert pred.strip_rows == 0 and not pred.packed  # the CPU speed code stays on the CPU
    out = pred.predict(img, OPTS)
    assert np.isfinite(out.map).all() and out.map.shape == (48, 64)
    assert np.abs(out.map - cpu.map).max() < (0.02 if dtype == "fp16" else 1e-3)


def test_fp16_at_native_size_and_channels_last(depth_g):
    pred = LotusPredictor.from_pretrained(depth_g, device="cuda", dtype="fp16", processing_res=0, channels_last=True)
    out = pred.predict(make_image(40, 56), PredictOptions(processing_res=0))
    assert np.isfinite(out.map).all()


def test_a_real_out_of_memory_is_recognised_and_the_cache_freed():
    dev = resolve_device("cuda")
    free, _ = torch.cuda.mem_get_info(dev)
    with pytest.raises(Exception) as e:
        torch.empty(int(free * 4), dtype=torch.uint8, device=dev)
    assert gpu.is_out_of_memory(e.value)
    gpu.free_cache(dev)
    assert torch.cuda.memory_reserved(dev) == torch.cuda.memory_allocated(dev)


def test_an_index_beyond_the_cards_is_a_usage_error():
    from lotus_cli.errors import UsageError

    with pytest.raises(UsageError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
