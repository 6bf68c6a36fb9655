"""Fidelity at the full size, where the fast paths run.

The fidelity tests in test_predictor.py use tiny models at tiny sizes, below the size from which the
VAE runs in strips with sub-pixel upsampling. This one builds the full-size Lotus-G architecture (random
weights, hub layout, ~4 GB on disk) and compares our fast CPU path (channels-last, packed weights where
the CPU can, VAE in strips) with the reference sequence at 512 px. About a minute on 2 CPU cores: LOTUS_TEST_SLOW=1.
Set LOTUS_FULLSIZE_CHECKPOINT to a folder built earlier (synthetic.build_checkpoint(..., size="full"), as
`bench_predictor.py --folder` also takes) to skip building it.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lotus_cli.model.cpu import prepack, strips
from lotus_cli.model.predictor import POSTERIOR_SEED_OFFSET, LotusPredictor, PredictOptions

from .reference import as_depth, load, reference_predict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_g(tmp_path_factory) -> Path:
    given = os.environ.get("LOTUS_FULLSIZE_CHECKPOINT")
    if given:
        return Path(given)
    from lotus_cli.model.synthetic import build_checkpoint

    return build_checkpoint(
        tmp_path_factory.mktemp("full") / "lotus-depth-g-v2-1-disparity", family="g", task="depth", size="full"
    )


@pytest.fixture
def all_threads():
    """The suite runs torch on one thread (tiny models); this model wants them all, and the rest of the
    suite wants one again afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


def test_full_size_default_path_matches_the_reference(full_g, all_threads):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:512, 0:512]
    img = np.clip(np.stack([xx / 2, yy / 2, (xx + yy) / 4], -1) + rng.normal(0, 20, (512, 512, 3)), 0, 255)
    img = img.astype(np.uint8)
    ref = as_depth(
        reference_predict(load(full_g), img, processing_res=512, seed=3, posterior_seed=3 + POSTERIOR_SEED_OFFSET)
    )
    # every fast path this CPU offers, whatever the calibration would choose (it may leave some out)
    can_pack = prepack.available(torch.device("cpu"), torch.float32)
    pred = LotusPredictor.from_pretrained(
        str(full_g), device="cpu", dtype="fp32", channels_last=True, pack_weights=can_pack
    )
    pred.strip_rows = strips.ROWS
    assert pred.packed == can_pack and pred.channels_last and pred.strip_rows > 0
    ours = pred.predict(img, PredictOptions(processing_res=512, resample="nearest", latent="sample", seed=3)).map
    assert ours.shape == ref.shape == (512, 512) and ref.std() > 0.01
    assert ((ref > 0.001) & (ref < 0.999)).mean() > 0.9  # the bound below is not met by clamping alone
    assert np.abs(ours - ref).max() < 1e-5
