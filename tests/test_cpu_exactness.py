"""How far the default CPU path is from the reference sequence where all its fast paths run (docs/exactness.md,
"Exactness"): native resolution above 256 x 256 px, so the VAE's high-resolution stages run in strips,
channels-last with packed weights; both tasks, both families, tiny random checkpoints.

The bounds asserted are docs/exactness.md's: depth 1e-5, normals 3e-5 (in the model's raw units: a random tiny
model emits near-zero normal vectors whose normalisation would amplify any rounding; real models emit
|n| ~ 1, where the two are the same measure). NCHW with diffusers' modules throughout
(``channels_last=False``, ``strip_rows = 0``) gives the reference's numbers (< 1e-6)."""

import numpy as np
import pytest
import torch

from lotus_cli.model.cpu import strips
from lotus_cli.model.predictor import POSTERIOR_SEED_OFFSET, LotusPredictor, PredictOptions

from .conftest import make_image
from .reference import load, reference_predict

BOUND = {"depth": 1e-5, "normal": 3e-5}


def difference(pred, folder, task, img, seed=5) -> float:
    """Max difference of ``pred`` from the reference at native size: depth maps, or normals in raw units."""
    h, w = img.shape[:2]
    opts = PredictOptions(processing_res=max(h, w), resample="nearest", latent="sample", seed=seed)
    y = reference_predict(
        load(folder), img, processing_res=max(h, w), seed=seed, posterior_seed=seed + POSTERIOR_SEED_OFFSET
    )  # [3, H, W] in [0, 1]
    ours = pred.predict(img, opts).map
    if task == "depth":
        return float(np.abs(ours - y.mean(0).numpy()).max())
    raw = (y * 2 - 1).permute(1, 2, 0).numpy()  # [H, W, 3]
    return float(np.abs(ours * np.linalg.norm(raw, axis=-1, keepdims=True) - raw).max())


@pytest.mark.parametrize("task,family", [("depth", "g"), ("depth", "d"), ("normal", "g"), ("normal", "d")])
@pytest.mark.parametrize("hw", [(288, 320), pytest.param((384, 512), marks=pytest.mark.heavy)])
def test_the_default_cpu_path_is_within_the_stated_bound(checkpoints, task, family, hw, monkeypatch):
    folder = checkpoints[(task, family)]
    img = make_image(*hw, seed=3)
    calls = []
    real = strips.resnet
    monkeypatch.setattr(strips, "resnet", lambda *a: calls.append(1) or real(*a))
    pred = LotusPredictor.from_pretrained(str(folder), device="cpu", dtype="fp32")
    d = difference(pred, folder, task, img)
    assert calls and pred.channels_last  # the strips and channels-last ran: the paths the bound is about
    assert d < BOUND[task]
    assert d > 1e-7  # (and they do round differently from the reference: the bound is not vacuous)
    exact = LotusPredictor.from_pretrained(str(folder), device="cpu", dtype="fp32", channels_last=False)
    exact.strip_rows = 0
    assert difference(exact, folder, task, img) < 1e-6


def test_channels_last_group_norm_is_the_modules_and_rounds_less(depth_d):
    """The channels-last GroupNorm the fast path uses equals nn.GroupNorm, and is closer (on average) to a
    float64 GroupNorm than torch's own channels-last kernel."""
    norm = torch.nn.GroupNorm(8, 64).eval()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.normal_()
    x = torch.randn(1, 64, 96, 80, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        truth = torch.nn.functional.group_norm(x.double(), 8, norm.weight.double(), norm.bias.double(), norm.eps)
        theirs = norm(x)
        assert strips.precise_group_norms(norm) == 1 and isinstance(norm, strips.ChannelsLastGroupNorm)
        ours = norm(x)
        assert ours.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        assert (ours.double() - truth).abs().mean() < (theirs.double() - truth).abs().mean()
        flat = x.reshape(1, 64, -1)  # other inputs: nn.GroupNorm's own numbers
        want = torch.nn.functional.group_norm(flat, 8, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(norm(flat), want, atol=0, rtol=0)
    assert set(norm.state_dict()) == {"weight", "bias"}
