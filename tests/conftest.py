"""Shared fixtures: tiny random Lotus checkpoints saved in the real hub layout, and test images.

The environment is made hermetic before anything imports huggingface_hub: no network
(HF_HUB_OFFLINE=1), an empty hub cache and an empty lotus-cli cache per test session.
"""

import os
import signal
import tempfile
from pathlib import Path

_HERMETIC = Path(tempfile.mkdtemp(prefix="lotus-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_HERMETIC / "hf")
os.environ["LOTUS_CACHE"] = str(_HERMETIC / "lotus-cache")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Folder names are those of the released repos, so registry metadata (task, output kind) applies as it
# would to a downloaded checkpoint.
CHECKPOINTS = {
    ("depth", "g"): "lotus-depth-g-v2-1-disparity",
    ("depth", "d"): "lotus-depth-d-v2-0-disparity",
    ("normal", "g"): "lotus-normal-g-v1-1",
    ("normal", "d"): "lotus-normal-d-v1-1",
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict:
    """{(task, family): folder} of tiny random checkpoints in the hub layout."""
    from lotus_cli.model.synthetic import build_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for (task, family), name in CHECKPOINTS.items():
        seed = {"g": 1, "d": 2}[family] + (10 if task == "normal" else 0)
        out[(task, family)] = build_checkpoint(root / name, family=family, task=task, seed=seed)
    return out


@pytest.fixture(scope="session")
def depth_g(checkpoints):
    return checkpoints[("depth", "g")]


@pytest.fixture(scope="session")
def depth_d(checkpoints):
    return checkpoints[("depth", "d")]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread: a second one only adds synchronisation, and on a busy
    machine it made tiny training steps ~80x slower. Benchmarks keep torch's default."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-plus-texture uint8 RGB test image [h, w, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 200
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def image():
    return make_image(40, 56)


def pytest_collection_modifyitems(config, items):
    """`weights` tests need the released checkpoints (set LOTUS_TEST_WEIGHTS=1 where the network or a
    filled Hugging Face cache has them); `gpu` tests need CUDA; `slow` tests run with LOTUS_TEST_SLOW=1."""
    import torch

    reasons = {
        "weights": None
        if os.environ.get("LOTUS_TEST_WEIGHTS") == "1"
        else "needs released weights: LOTUS_TEST_WEIGHTS=1",
        "gpu": None if torch.cuda.is_available() else "needs a CUDA device",
        "slow": None if os.environ.get("LOTUS_TEST_SLOW") == "1" else "slow: LOTUS_TEST_SLOW=1",
    }
    for item in items:
        for mark, reason in reasons.items():
            if reason and item.get_closest_marker(mark):  # not `in item.keywords`: that holds folder names
                item.add_marker(pytest.mark.skip(reason=reason))


def default_signals() -> None:
    """In the child before exec: Ctrl-C and SIGTERM as a terminal delivers them, whatever the test runner
    inherited (a shell's background job starts with SIGINT ignored, and Python then keeps ignoring it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
