"""Checks on the released checkpoints; skipped unless LOTUS_TEST_WEIGHTS=1 (they download ~4.3 GB each).

Run with network (or a filled cache):
LOTUS_TEST_WEIGHTS=1 HF_HUB_OFFLINE=0 python -m pytest tests/test_released_weights.py
"""

import os
from pathlib import Path

import numpy as np
import pytest

from lotus_cli.io.sources import read_image
from lotus_cli.model.predictor import POSTERIOR_SEED_OFFSET, LotusPredictor, PredictOptions

from .reference import as_depth, as_normal, load, reference_predict

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "samples", "coffee.png")
pytestmark = pytest.mark.weights


@pytest.fixture(autouse=True)
def online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("LOTUS_TEST_HF_OFFLINE", "0"))


@pytest.mark.parametrize("name", ["depth-g", "depth-d", "normal-g", "normal-d"])
def test_released_checkpoint_matches_reference(name):
    img = read_image(Path(SAMPLE))[:256, :256]  # 256 px keeps a CPU run in minutes
    pred = LotusPredictor.from_pretrained(name, device="cpu", dtype="fp32", channels_last=False)
    ours = pred.predict(img, PredictOptions(processing_res=256, resample="nearest", latent="sample", seed=3)).map
    y = reference_predict(
        load(_folder(name)), img, processing_res=256, seed=3, posterior_seed=3 + POSTERIOR_SEED_OFFSET
    )
    ref = as_normal(y) if pred.task == "normal" else as_depth(y)
    assert np.abs(ours - ref).max() < 1e-5


def _folder(name):
    from lotus_cli.model import registry

    return registry.fetch(registry.resolve(name)).folder
