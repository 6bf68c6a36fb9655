"""What N uncertainty samples cost against one prediction, measured in one run.

    python benchmarks/bench_uncertainty.py            # tiny model at 256 px and full-size G at 128 px
    python benchmarks/bench_uncertainty.py --skip-full

The image latent is encoded once and shared by the N noise samples, so N samples cost less than N
predictions: the ratio printed is time(N samples) / time(1 prediction), against N.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best(fn, repeats=2):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()

    import numpy as np

    from lotus_cli.model.predictor import EnsembleOptions, LotusPredictor, PredictOptions
    from lotus_cli.model.synthetic import build_checkpoint

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (192, 256, 3), dtype=np.uint8)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lotus-bench-unc-") as tmp:
        cases = [("tiny", 256)] + ([] if args.skip_full else [("full", 128)])
        for size, res in cases:
            ck = build_checkpoint(Path(tmp) / f"{size}-g", family="g", size=size)
            pred = LotusPredictor.from_pretrained(ck, device="cpu", kind="disparity")  # its folder says nothing
            opts = PredictOptions(processing_res=res, batch_size=args.samples)
            one = best(lambda pred=pred, opts=opts: pred.predict(img, opts))
            ens = best(
                lambda pred=pred, opts=opts: pred.predict_ensemble(img, opts, EnsembleOptions(samples=args.samples))
            )
            rows.append((f"{size} G at {res} px", one, ens))

    n = args.samples
    print(f"\n{'':22}{'1 prediction s':>16}{f'{n} samples s':>14}{'ratio':>8}{'N':>4}")
    for name, one, ens in rows:
        print(f"{name:22}{one:>16.3f}{ens:>14.3f}{ens / one:>8.2f}{n:>4}")
    print("target: ratio clearly below N (the encode is shared)")


if __name__ == "__main__":
    main()
