"""torch (ours), ONNX Runtime and the authors' reference sequence on the same weights, in one run.

    python benchmarks/bench_onnx.py                 # full-size Lotus-G architecture, 512 px (~10 minutes, ~9 GB)
    python benchmarks/bench_onnx.py --size tiny     # a quick smoke run of this script

Builds the full-size architecture (868M-parameter UNet, 84M VAE, SD2 text encoder) with random weights in the
hub layout, makes the ONNX Runtime backend's cached export of it once (a fresh process: time, peak RSS and file
sizes reported), then times, each in a fresh process so that peak RSS is its own, in alternating rounds:
  (a) ours: LotusPredictor.from_pretrained, fp32, the CPU fast paths chosen for this machine (`--backend torch`);
  (o) ONNX Runtime: the same predictor's steps as ONNX Runtime sessions over the cached export, CPU execution
      provider, fp32 (`--backend onnxruntime`; model/onnx_runtime.py);
  (b) the authors' reference sequence in fp32 without autocast (tests/reference.py).
Each side predicts the same 512 x 512 image (seed 0), after a warm-up; the best time of the rounds is kept and
the worst peak RSS. (a) and (o) write their maps, compared here (fp32: within 1e-4). Prints the CPU's model name
and the flags that pick the kernels, and the ratios (o)/(b), (a)/(b) and (o)/(a). The goal of issue 26:
a prediction in at most 0.6x the reference's fp32 time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_predictor  # noqa: E402
from bench_predictor import cpu_line, current_rss_bytes, image, peak_rss_bytes, random_checkpoint  # noqa: E402

SIDES = ("reference", "ours", "onnxruntime")
NAMES = {"ours": "(a) ours, torch", "onnxruntime": "(o) ONNX Runtime", "reference": "(b) reference fp32"}


def child(args) -> dict:
    """Runs in its own process: make the export (``export``), or load one side and time it after a warm-up."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    import diffusers  # noqa: F401  (the libraries' own memory is the baseline)
    from transformers import CLIPTextModel  # noqa: F401

    from lotus_cli.model import onnx_runtime, registry

    base = current_rss_bytes()
    ref = registry.fetch(registry.resolve(args.folder, "depth"))
    if args.side == "export":
        import onnxruntime  # noqa: F401

        base = current_rss_bytes()
        t0 = time.perf_counter()
        folder = onnx_runtime.cached_export(ref)
        manifest = json.loads((folder / "lotus-onnx.json").read_text())
        files = {f: (folder / f).stat().st_size for g in manifest["graphs"].values() for f in g["files"]}
        return {"seconds": time.perf_counter() - t0, "peak_rss": peak_rss_bytes(), "base_rss": base,
                "files": files, "validation": manifest["validation"]}  # fmt: skip
    img = image(args.res)
    if args.side == "reference":
        from tests.reference import load, reference_predict

        comps = load(args.folder)
        run = lambda: reference_predict(comps, img, processing_res=args.res, seed=0, posterior_seed=1)  # noqa: E731
        extra = {}
    else:
        from lotus_cli.model.predictor import LotusPredictor, PredictOptions

        if args.side == "ours":
            pred = LotusPredictor.from_pretrained(ref, device="cpu", dtype="fp32", processing_res=args.res)
            extra = {"threads": torch.get_num_threads()}
        else:
            import onnxruntime

            pred = onnx_runtime.load(ref, "cpu")
            extra = {"provider": pred.provider, "onnxruntime": onnxruntime.__version__}
        opts = PredictOptions(processing_res=args.res, seed=0)
        run = lambda: pred.predict(img, opts).map  # noqa: E731
    out = run()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    if args.side != "reference":
        np.save(Path(args.folder) / f".map-{args.side}.npy", out)
    return {"side": args.side, "seconds": min(times), "peak_rss": peak_rss_bytes(), "base_rss": base, **extra}


def run_child(side: str, folder: str, res: int, repeats: int) -> dict:
    return bench_predictor.run_child(side, folder, res, repeats, script=__file__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per process, after a warm-up")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the three sides")
    ap.add_argument("--folder", help="reuse a checkpoint folder built by an earlier run (and its cached export)")
    ap.add_argument("--child", choices=(*SIDES, "export"), dest="side")
    args = ap.parse_args()
    if args.side:
        print(json.dumps(child(args)))
        return

    folder, tmp = random_checkpoint(args.folder, args.size, prefix="lotus-bench-onnx-")
    import onnxruntime
    import torch

    print(cpu_line())
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}, "
        f"{args.res} px, best of {args.rounds} alternating rounds x {args.repeats} run(s), each after a warm-up"
    )
    run_child("ours", folder, 64, 1)  # computes and caches the empty-prompt embedding once
    ex = run_child("export", folder, args.res, 1)
    gb = 1e9
    print(
        f"export (once, into the cache; dynamic, any size): {ex['seconds']:.0f} s, "
        f"peak RSS {ex['peak_rss'] / gb:.2f} GB, "
        f"files {sum(ex['files'].values()) / gb:.2f} GB ("
        + ", ".join(f"{f} {b / 1e6:.0f} MB" for f, b in ex["files"].items())
        + f"); its validation: max |map diff| {ex['validation']['max_abs_diff_map']:.1e}"
    )
    runs = {s: [] for s in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:
            runs[side].append(run_child(side, folder, args.res, args.repeats))
    best = {
        s: min(runs[s], key=lambda r: r["seconds"]) | {"peak_rss": max(r["peak_rss"] for r in runs[s])} for s in SIDES
    }
    import numpy as np

    diff = np.abs(np.load(Path(folder) / ".map-onnxruntime.npy") - np.load(Path(folder) / ".map-ours.npy")).max()

    print()
    print(f"{'':24}{'s/image':>10}{'all runs':>18}{'peak RSS GB':>13}")
    for side in ("ours", "onnxruntime", "reference"):
        r = best[side]
        every = ", ".join(f"{x['seconds']:.2f}" for x in runs[side])
        print(f"{NAMES[side]:24}{r['seconds']:>10.2f}{every:>18}{r['peak_rss'] / gb:>13.2f}")
    a, o, b = best["ours"], best["onnxruntime"], best["reference"]
    print(f"\n(o) ran on {o['provider']}; (a) on {a['threads']} torch threads")
    print(f"time ratio (o)/(b): {o['seconds'] / b['seconds']:.3f}   (goal <= 0.6)")
    print(f"time ratio (a)/(b): {a['seconds'] / b['seconds']:.3f}")
    print(f"time ratio (o)/(a): {o['seconds'] / a['seconds']:.3f}   (< 1: ONNX Runtime is faster here)")
    print(
        f"peak RSS ratio (o)/(b): {o['peak_rss'] / b['peak_rss']:.3f}; (a)/(b): {a['peak_rss'] / b['peak_rss']:.3f}; "
        f"(o)/(a): {o['peak_rss'] / a['peak_rss']:.3f}"
    )
    print(f"max |map (o) - map (a)|: {diff:.1e}   (fp32: <= 1e-4)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
