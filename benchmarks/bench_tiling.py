"""Memory and time of tiled prediction as the input grows, in one run.

    python benchmarks/bench_tiling.py --part small   # tiny random model: 1, 4, 16, 64 MP (a few minutes)
    python benchmarks/bench_tiling.py --part full    # full-size SD2 architecture: 1 and 4 MP (~20 minutes)

Every configuration runs in a fresh process, so its peak RSS is its own. A tiled run: the global pass at
--processing-res and tiles of --tile input pixels at --tile-res (1 input pixel = 1 model pixel by default),
one tile per model call. The single native-resolution pass (processing_res 0) runs where its estimated
peak fits in half the free memory. Printed per run: megapixels, tiles, seconds and seconds per megapixel,
peak RSS, and peak RSS less the input image and the output map (buffers that grow with the input
whatever the method: the rest is what tiling keeps bounded). Targets (issue 7): memory flat within 10%
from 4 MP up, time linear in pixels (steady seconds per megapixel).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GB = 1e9


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def size_for(mp: float) -> tuple[int, int]:
    """(h, w) of a 4:3 image of ``mp`` megapixels."""
    w = round(math.sqrt(mp * 1e6 * 4 / 3))
    return round(w * 3 / 4), w


def make_image(h: int, w: int):
    """uint8 [h, w, 3]: smooth ramps plus noise, built in row blocks so no float copy of the whole image."""
    import numpy as np

    img = np.empty((h, w, 3), np.uint8)
    rng = np.random.default_rng(0)
    xx = np.arange(w, dtype=np.float32) / w
    for y in range(0, h, 256):
        yy = (np.arange(y, min(h, y + 256), dtype=np.float32) / h)[:, None]
        base = np.stack([xx + 0 * yy, yy + 0 * xx, 1 - xx * yy], -1) * 200
        img[y : y + 256] = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return img


def child(a) -> dict:
    import torch

    from lotus_cli.model.predictor import LotusPredictor, PredictOptions
    from lotus_cli.model.tiling import TileOptions, memory_cost, predict_tiled

    torch.manual_seed(0)
    pred = LotusPredictor.from_pretrained(a.folder, device="cpu", dtype="fp32")
    h, w = size_for(a.mp)
    img = make_image(h, w)
    base = current_rss()
    t0 = time.perf_counter()
    if a.mode == "single":
        out = pred.predict(img, PredictOptions(processing_res=0))
        tiles, est = 0, memory_cost(pred).peak(h * w)
    else:
        opts, topts = PredictOptions(processing_res=a.processing_res), TileOptions(tile=a.tile, tile_res=a.tile)
        out = predict_tiled(pred, [img], opts, topts)[0]
        tiles, est = out.extra["tiling"]["tiles"], out.extra["tiling"]["estimated_peak_bytes"]
    seconds = time.perf_counter() - t0
    return {
        "mode": a.mode,
        "mp": h * w / 1e6,
        "size": [w, h],
        "tiles": tiles,
        "seconds": seconds,
        "peak_rss": peak_rss(),
        "base_rss": base,
        "buffers": img.nbytes + out.map.nbytes,
        "estimated": est,
    }


def run(folder: str, mode: str, mp: float, tile: int, processing_res: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--folder",
        folder,
        "--mp",
        str(mp),
        "--tile",
        str(tile),
        "--processing-res",
        str(processing_res),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOTUS_CACHE": str(Path(folder).parent / ".lotus-cache")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{mode} {mp} MP failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fits_natively(folder: str, mp: float) -> tuple[bool, float]:
    """Whether a native pass's estimated peak fits in half the free memory (the machine is shared)."""
    from lotus_cli.model.predictor import LotusPredictor
    from lotus_cli.model.tiling import memory_cost

    cost = memory_cost(LotusPredictor.from_pretrained(folder, device="cpu", dtype="fp32"))
    h, w = size_for(mp)
    free = int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) * 1024
    return cost.peak(h * w) < free / 2, cost.peak(h * w)


def table(rows: list[dict]) -> None:
    print(
        f"{'run':>8}{'MP':>7}{'tiles':>7}{'seconds':>10}{'s/MP':>8}{'peak RSS GB':>13}{'less image+map GB':>19}"
        f"{'estimate GB':>13}"
    )
    for r in rows:
        print(
            f"{r['mode']:>8}{r['mp']:>7.1f}{r['tiles']:>7}{r['seconds']:>10.1f}{r['seconds'] / r['mp']:>8.2f}"
            f"{r['peak_rss'] / GB:>13.2f}{(r['peak_rss'] - r['buffers']) / GB:>19.2f}{r['estimated'] / GB:>13.2f}"
        )


def summary(tiled: list[dict]) -> None:
    from4 = [r for r in tiled if r["mp"] >= 3.5]
    if len(from4) < 2:
        return
    for key, name in (("peak_rss", "peak RSS"), (None, "peak RSS less image+map")):
        vals = [r[key] if key else r["peak_rss"] - r["buffers"] for r in from4]
        print(f"{name} from {from4[0]['mp']:.0f} MP up: max/min {max(vals) / min(vals):.3f} (target <= 1.10)")
    spm = [r["seconds"] / r["mp"] for r in tiled]
    print(f"seconds per megapixel: {', '.join(f'{v:.2f}' for v in spm)} (linear time = constant)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("small", "full"), default="small")
    ap.add_argument("--tile", type=int, default=256, help="tile size in input pixels, and its tile_res")
    ap.add_argument("--processing-res", type=int, default=256, help="the global pass's long side")
    ap.add_argument("--sizes", help="comma list of megapixels (default: 1,4,16,64 small; 1,4 full)")
    ap.add_argument(
        "--single",
        default="1",
        help="comma list of megapixels for the single native pass (its "
        "attention grows with the square of the pixels: keep it small)",
    )
    ap.add_argument("--folder", help="reuse a checkpoint folder")
    ap.add_argument("--child", choices=("tiled", "single"), dest="mode")
    ap.add_argument("--mp", type=float)
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(child(a)))
        return

    import torch

    from lotus_cli.model.synthetic import build_checkpoint

    tmp = tempfile.TemporaryDirectory(prefix="lotus-bench-tiling-")
    size = "tiny" if a.part == "small" else "full"
    folder = a.folder or str(Path(tmp.name) / "lotus-depth-d-v2-0-disparity")
    if not a.folder:
        t0 = time.perf_counter()
        build_checkpoint(folder, family="d", task="depth", size=size)
        print(f"built a random {size} Lotus-D checkpoint in {time.perf_counter() - t0:.0f} s")
    sizes = [float(s) for s in (a.sizes or ("1,4,16,64" if a.part == "small" else "1,4")).split(",")]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; tiles {a.tile} px at tile_res {a.tile}, "
        f"overlap 0.25, global pass at {a.processing_res} px, fp32, one tile per call"
    )
    run(folder, "tiled", 0.05, a.tile, a.processing_res)  # caches the empty-prompt embedding
    rows, tiled = [], []
    for mp in sizes:
        tiled.append(run(folder, "tiled", mp, a.tile, a.processing_res))
        rows.append(tiled[-1])
        table(rows[-1:]) if len(rows) == 1 else print(f"  ... {mp:g} MP done in {tiled[-1]['seconds']:.0f} s")
    for mp in [float(s) for s in a.single.split(",") if s]:
        ok, est = fits_natively(folder, mp)
        if ok:
            rows.append(run(folder, "single", mp, a.tile, 0))
        else:
            print(
                f"single native pass at {mp:g} MP skipped: "
                f"estimated peak {est / GB:.1f} GB exceeds half the free memory"
            )
    print()
    table(rows)
    summary(tiled)
    for s in (r for r in rows if r["mode"] == "single"):
        t = min(tiled, key=lambda r: abs(r["mp"] - s["mp"]))
        print(
            f"{s['mp']:.1f} MP tiled / single native pass: time {t['seconds'] / s['seconds']:.2f}x, "
            f"peak RSS {t['peak_rss'] / s['peak_rss']:.2f}x"
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()
