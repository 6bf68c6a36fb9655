"""The compiled path (lotus_cli/model/compile.py) against eager on a video-like run, in one run.

    python benchmarks/bench_compile.py                       # full-size Lotus-G, 30 frames of 512 px (long)
    python benchmarks/bench_compile.py --frames 8 --folder DIR   # fewer frames, a checkpoint built earlier
    python benchmarks/bench_compile.py --size tiny --frames 4    # a quick smoke run of this script

Builds the full-size Lotus-G architecture with random weights in the hub layout (or takes --folder), then
runs, each in a fresh process: (1) eager, the predictor's default CPU path; (2) compiled with an EMPTY
inductor cache (cold start: the first frame pays for compilation); (3) compiled again in a new process
with the cache (2) filled (warm start). Each process predicts ``--frames`` synthetic 512 px frames of one
size, one per call as the video runner does. Reported per process: start (process start to the first
map: imports, loading, compilation), steady s/frame (median after the first frame), end-to-end frames/s
over the whole process, peak RSS, and inductor's FX-graph cache hits. ``--what unet`` compiles the UNet
only (the VAE keeps its row strips); ``--what all`` also compiles the VAE's encoder and decoder whole.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_PROCESS = time.perf_counter()  # as early as possible: "start" counts the imports too

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def frame(i: int, res: int):
    """A synthetic video frame [res, res, 3] uint8: a gradient drifting right with fixed texture."""
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:res, 0:res] / res
    base = np.stack([(xx + i / 60) % 1, yy, 1 - xx * yy], -1) * 200 + rng.normal(0, 20, (res, res, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def child(args) -> dict:
    import numpy as np
    import torch

    from lotus_cli.model import compile as lc
    from lotus_cli.model.predictor import LotusPredictor, PredictOptions

    pred = LotusPredictor.from_pretrained(args.folder, task="depth", device="cpu", dtype="fp32")
    reason = "eager"
    if args.variant != "eager":
        ok, reason = lc.compile_predictor(pred, "on", args.cache, vae=args.variant == "all")
        if not ok:
            raise SystemExit(reason)
    opts = PredictOptions(processing_res=args.res)
    t_ready = time.perf_counter()
    times, maps = [], []
    for i in range(args.frames):
        t0 = time.perf_counter()
        m = pred.predict(frame(i, args.res), opts).map
        times.append(time.perf_counter() - t0)
        if i in (0, args.frames - 1):
            maps.append(m)
        if i == 0:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    failed = lc.compile_status(pred)
    if failed:
        raise SystemExit(failed)
    from torch._dynamo.utils import counters

    np.save(Path(args.out) / f"{args.variant}-{args.tag}.npy", np.stack(maps))
    return {
        "variant": args.variant,
        "tag": args.tag,
        "reason": reason,
        "load": t_ready - T_PROCESS,
        "start": t_first - T_PROCESS,
        "first": times[0],
        "steady": statistics.median(times[1:] or times),
        "all": times,
        "fps_e2e": args.frames / (t_end - T_PROCESS),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "fx_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
        "threads": torch.get_num_threads(),
    }


def run_child(variant: str, tag: str, args, cache: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--tag",
        tag,
        "--folder",
        args.folder,
        "--res",
        str(args.res),
        "--frames",
        str(args.frames),
        "--cache",
        cache,
        "--out",
        args.out,
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "LOTUS_CACHE": str(Path(args.folder) / ".lotus-cache"),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{variant} ({tag}) failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"  {variant:6} {tag:5} start {r['start']:7.1f} s, steady {r['steady']:6.2f} s/frame, "
        f"fx cache hit/miss {r['fx_hit']}/{r['fx_miss']}",
        flush=True,
    )
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--what", choices=("unet", "all"), default="all", help="what to compile")
    ap.add_argument("--folder", help="reuse a checkpoint folder built by an earlier run")
    ap.add_argument("--child", choices=("eager", "unet", "all"), dest="variant")
    ap.add_argument("--tag", default="")
    ap.add_argument("--cache")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    import numpy as np

    from lotus_cli.model.synthetic import build_checkpoint

    work = tempfile.TemporaryDirectory(prefix="lotus-bench-compile-")
    args.out = work.name
    if args.folder is None:
        args.folder = str(Path(work.name) / "lotus-depth-g-v2-1-disparity")
        t0 = time.perf_counter()
        build_checkpoint(args.folder, family="g", task="depth", size=args.size)
        print(f"built random {args.size} Lotus-G checkpoint in {time.perf_counter() - t0:.0f} s")
    cache = str(Path(work.name) / "inductor")  # empty: the first compiled run starts cold
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.frames} frames of {args.res} px, "
        f"compiling: {args.what}"
    )
    saved, args.frames = args.frames, 1
    run_child("eager", "prompt", args, cache)  # computes and caches the empty-prompt embedding once
    args.frames = saved
    runs = [
        run_child("eager", "", args, cache),
        run_child(args.what, "cold", args, cache),
        run_child(args.what, "warm", args, cache),
    ]
    eager = runs[0]
    print()
    print(
        f"{'':22}{'start s':>9}{'first s':>9}{'steady s/frame':>16}{'frames/s e2e':>14}{'vs eager':>10}"
        f"{'peak RSS GB':>13}"
    )
    for r in runs:
        name = "eager" if r["variant"] == "eager" else f"compiled {r['variant']}, {r['tag']}"
        print(
            f"{name:22}{r['start']:>9.1f}{r['first']:>9.1f}{r['steady']:>16.2f}{r['fps_e2e']:>14.4f}"
            f"{r['fps_e2e'] / eager['fps_e2e']:>10.2f}{r['peak_rss'] / 1e9:>13.2f}"
        )
    ref = np.load(Path(work.name) / "eager-.npy")
    for r in runs[1:]:
        diff = np.abs(np.load(Path(work.name) / f"{r['variant']}-{r['tag']}.npy") - ref).max()
        print(f"max |compiled {r['tag']} - eager| on the depth maps: {diff:.2e}")
    cold, warm = runs[1], runs[2]
    gain = eager["steady"] - warm["steady"]  # seconds saved per frame once compiled
    cost_cold, cost_warm = cold["first"] - cold["steady"], warm["first"] - warm["steady"]
    even = (
        f"break-even after {cost_warm / gain:.1f} (warm) / {cost_cold / gain:.1f} (cold) frames"
        if gain > 0
        else "no break-even: compiled frames are slower than eager ones"
    )
    print(
        f"steady-state speed-up: {eager['steady'] / warm['steady']:.2f}x; compile cost on the first frame: "
        f"cold {cost_cold:.0f} s, warm {cost_warm:.0f} s; {even}"
    )
    work.cleanup()


if __name__ == "__main__":
    main()
