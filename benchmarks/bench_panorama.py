"""Time and memory of a 360-degree panorama (model/panorama.py) against its views' predictions, and the
choice of the views' field of view.

    python benchmarks/bench_panorama.py                 # 4096 x 2048 on the CPU, tiny random model, 768 px views
    python benchmarks/bench_panorama.py --part fov      # layouts and fovs, ray-cast stand-in (tests/panorama_rooms.py)

``time``: one plain prediction of a 768 x 768 view (median of --repeats) and the whole panorama; the overhead is
the panorama's time less (views x one prediction): resampling the views, the joint fit and the blend at full
size. The tiny random model makes the predictions themselves nearly free, so the overhead is measured in
seconds and compared with a full-size prediction's time at that size (--full-seconds: an estimate, 50 s for
SD2 at 768 px on this machine class, from the 512 px measurements in docs/performance.md; not measured here).
Peak memory: the process's peak RSS, and the peak of the numpy buffers allocated during the panorama
(tracemalloc), against the panorama and its map, which any method holds.

``fov``: the stand-in network returns each view's true disparity under its own scale and shift, made non-affine
in each view's own way (a power 0.95 .. 1.05 and a 2 % tilt across the view), like a real network's views
that disagree beyond an affine map; per fov: median relative error of the panorama's map after one global
scale and shift, the seam ratio (gradient in the blend bands vs elsewhere, relative to the truth's), and the
degrees per model pixel.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MB = 1024**2


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def part_time(args) -> None:
    import numpy as np
    import torch

    from lotus_cli.model.panorama import PanoramaOptions, plan_views, predict_panorama
    from lotus_cli.model.predictor import LotusPredictor, PredictOptions
    from lotus_cli.model.synthetic import build_checkpoint

    h, w = args.height, 2 * args.height
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp) / "lotus-depth-d-v2-0-disparity", family="d", task="depth")
        predictor = LotusPredictor.from_pretrained(ckpt, device="cpu")
    opts = PredictOptions(processing_res=args.res, batch_size=args.batch)
    rng = np.random.default_rng(0)
    pano = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    views = plan_views(h, w, opts, PanoramaOptions(fov=args.fov))
    view_img = rng.integers(0, 256, (args.res, args.res, 3), dtype=np.uint8)
    with torch.inference_mode():
        predictor.predict_batch([view_img], opts)  # warm-up
        one = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            predictor.predict_batch([view_img] * args.batch, opts)
            one.append((time.perf_counter() - t0) / args.batch)
    rss_before = peak_rss()
    tracemalloc.start()
    totals, merges, resamples = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        pred = predict_panorama(predictor, [pano], opts, PanoramaOptions(fov=args.fov))[0]
        totals.append(time.perf_counter() - t0)
        merges.append(pred.extra["panorama"]["seconds"]["merge"])
        resamples.append(pred.extra["panorama"]["seconds"]["resample"])
    _, numpy_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t_one, t_all = statistics.median(one), statistics.median(totals)
    t_merge, t_resample = statistics.median(merges), statistics.median(resamples)
    overhead = t_merge + t_resample  # measured directly: the difference of two long, noisy times is not
    held = pano.nbytes + pred.map.nbytes
    n = len(views)
    print(f"panorama {w}x{h}, {n} views of {args.res} px at fov {args.fov:g}, torch threads {torch.get_num_threads()}")
    print(f"one view prediction (tiny model): {t_one:.3f} s (runs: {', '.join(f'{t:.3f}' for t in one)})")
    print(f"panorama: {t_all:.2f} s (runs: {', '.join(f'{t:.2f}' for t in totals)})")
    print(f"overhead: resampling the views {t_resample:.2f} s + fit and blend {t_merge:.2f} s = {overhead:.2f} s")
    print(f"panorama / ({n} x one prediction) with the tiny model: {t_all / (n * t_one):.3f}")
    print(
        f"overhead / ({n} x one prediction): tiny model {overhead / (n * t_one):.1%}; "
        f"a full-size prediction of {args.full_seconds:g} s: {overhead / (n * args.full_seconds):.1%}"
    )
    print(
        f"peak RSS {peak_rss() / MB:.0f} MB (before the panorama: {rss_before / MB:.0f} MB); numpy peak during "
        f"the panorama {numpy_peak / MB:.0f} MB, of which the input and its map {held / MB:.0f} MB"
    )


def part_fov(args) -> None:
    import numpy as np

    from lotus_cli.geometry.camera import fit_scale_shift
    from lotus_cli.model.panorama import PanoramaOptions, plan_views, predict_panorama
    from lotus_cli.model.predictor import PredictOptions
    from tests.panorama_rooms import StandIn, furnished_room, render_panorama
    from tests.test_panorama import blend_bands, seam_ratio

    h, w = 256, 512
    room = furnished_room()
    scene = render_panorama(h, w, room)
    truth = 1 / scene["distance"]

    class Distorted(StandIn):
        """Each view's map made non-affine in its own way: a power gamma_k of its values (0.95 .. 1.05) and a
        tilt across the view of 2 % of its range, as a real network's views disagree."""

        def predict_batch(self, images, opts):
            out = super().predict_batch(images, opts)
            for im, p in zip(images, out):
                k = self.which(im)
                gamma = 0.95 + 0.1 * k / (len(self.views) - 1)
                m = np.abs(p.map) ** gamma
                tilt = 0.02 * np.ptp(m) * (np.arange(m.shape[1]) / m.shape[1] - 0.5)
                p.map = (m + tilt[None, :]).astype(np.float32)
            return out

    opts = PredictOptions(processing_res=args.res, batch_size=6)
    print(f"fov sweep: {w}x{h} furnished room, {args.res} px views, stand-in: (a D + b)^gamma_k + a 2 % tilt per view")
    print("layout | views | fov | median rel. error | seam ratio | degrees per model pixel")
    runs = [("cube", f) for f in (100.0, 110.0, 120.0, 135.0)] + [("ring8", f) for f in (100.0, 110.0, 120.0)]
    for layout, fov in runs:
        popts = PanoramaOptions(fov=fov, layout=layout)
        views = plan_views(h, w, opts, popts)
        standin = Distorted(scene["rgb"], views, room)
        pred = predict_panorama(standin, [scene["rgb"]], opts, popts)[0]
        s, b = fit_scale_shift(pred.map, truth)
        rel = float(np.median(np.abs(s * pred.map + b - truth) / truth))
        seam = seam_ratio(s * pred.map + b, truth, blend_bands(views, h, w))
        print(f"{layout} | {len(views)} | {fov:g} | {rel:.4f} | {seam:.3f} | {fov / args.res:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("time", "fov"), default="time")
    ap.add_argument("--height", type=int, default=2048, help="panorama rows (columns: twice as many)")
    ap.add_argument("--res", type=int, default=768, help="processing resolution = each view's side")
    ap.add_argument("--fov", type=float, default=110.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full-seconds", type=float, default=50.0, help="one full-size prediction at --res")
    args = ap.parse_args()
    (part_time if args.part == "time" else part_fov)(args)


if __name__ == "__main__":
    main()
