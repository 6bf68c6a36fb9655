import subprocess

import numpy as np
import pytest

from lotus_cli.model.predictor import LotusPredictor, PredictOptions

from .conftest import make_image


@pytest.mark.heavy
def test_raw_pipe_f32_equals_library(depth_d):
    frames = [make_image(24, 32, seed=s) for s in range(3)]
    data = b"".join(f.tobytes() for f in frames)
    p = subprocess.run(
        [
            "lotus",
            "depth",
            "--raw",
            "32x24",
            "--raw-out",
            "f32",
            "--no-stabilize",
            "-m",
            str(depth_d),
            "--processing-res",
            "32",
        ],
        input=data,
        capture_output=True,
    )
    assert p.returncode == 0, p.stderr.decode()
    out = np.frombuffer(p.stdout, "<f4").reshape(3, 24, 32)
    pred = LotusPredictor.from_pretrained(depth_d, device="cpu")
    for f, o in zip(frames, out):
        np.testing.assert_allclose(o, pred.predict(f, PredictOptions(processing_res=32)).map, atol=1e-6)


@pytest.mark.heavy
def test_raw_pipe_rgb_and_short_frame(checkpoints):
    frame = make_image(24, 32).tobytes()
    p = subprocess.run(
        [
            "lotus",
            "normal",
            "--raw",
            "32x24",
            "--raw-out",
            "rgb",
            "-m",
            str(checkpoints[("normal", "d")]),
            "--processing-res",
            "32",
        ],
        input=frame * 2 + frame[:100],
        capture_output=True,
    )
    assert p.returncode == 1 and b"frame 2 has 100 of 2304 bytes" in p.stderr
    assert len(p.stdout) == 2 * 24 * 32 * 3  # the whole frames before the short one came through
    bad = subprocess.run(["lotus", "depth", "--raw", "32by24"], input=b"", capture_output=True)
    assert bad.returncode == 2 and b"WIDTHxHEIGHT" in bad.stderr
