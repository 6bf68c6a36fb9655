"""What does --engine ray cost on one machine? Items per second of the engine against the plain command, in one run.

    python benchmarks/bench_scaleout.py                 # 48 images of 192x256 at --processing-res 128
    python benchmarks/bench_scaleout.py --images 96 --res 256

All three runs go through ``dispatch`` (what the CLI calls) in this process, on the same inputs,
each into a fresh output folder, with the tiny random checkpoint of lotus_cli/model/synthetic.py:

* plain: the local engine on one torch thread;
* ray x1: one actor with --cpus-per-worker 1 (Ray gives it OMP_NUM_THREADS=1: the same work as plain);
* ray x2: two actors with one CPU each.

One thread per worker, because two OpenMP threads on two busy shared cores measured up to 20x slower
than one (their barriers spin while other processes hold the cores), which swamps what is measured here.
Rate: each run over the first third of the images and over all of them, from the call to the last result
(actors start and load the model on every call); items/s = extra items / extra seconds, so start-up
cancels (status rows reach the driver a unit at a time, so timing between results would flatter the
engine). Start-up = the small run's time minus its items at that rate; ray.init is timed on its own.
Rounds alternate the runs; the best of each is quoted. Goal (issue 16): ray x1 >= 0.9 x plain.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu() -> str:
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = subprocess.run(
        "grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u",
        shell=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return f"{name} ({os.cpu_count()} cores; {' '.join(flags)})"


def make_inputs(folder: Path, n: int, size: tuple[int, int]) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for i in range(n):
        base = np.stack([xx, yy, 1 - xx * yy], -1) * 200 + rng.normal(0, 20, (h, w, 3))
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(folder / f"im{i:04d}.png")


def timed(job, inputs: Path, out: Path, scale) -> float:
    """Seconds from the call to the last result of ``job`` over ``inputs``, written into ``out``."""
    from lotus_cli.run.events import Reporter
    from lotus_cli.scale.dispatch import dispatch

    t0 = time.perf_counter()
    last = [0.0]

    class LastResult(Reporter):
        def result(self, r):
            assert r.status == "done", r.error
            last[0] = time.perf_counter() - t0

    dispatch(job, [str(inputs)], out, scale, LastResult())
    return last[0]


def per_item_io(tmp: Path, size=(3000, 4000)) -> dict:
    """One core's decode of a 12 MP JPEG and write of its maps (png + png16 + sidecar at input size): the
    CPU and storage cost per item that the model time per GPU has to cover."""
    import numpy as np
    from PIL import Image

    from lotus_cli.io.outputs import output_paths, write_outputs
    from lotus_cli.io.sources import read_image

    h, w = size
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)  # smooth-ish content, photo-like size
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(tmp / "big.jpg", quality=90)
    depth = np.asarray(Image.fromarray(img[..., 0]).convert("F")) / 255.0
    best = {"decode": 1e9, "write": 1e9}
    for i in range(3):
        t0 = time.perf_counter()
        read_image(tmp / "big.jpg")
        best["decode"] = min(best["decode"], time.perf_counter() - t0)
        paths = output_paths(tmp / f"io{i}", "big", ("png", "png16"))
        t0 = time.perf_counter()
        write_outputs(paths, depth.astype(np.float32), "disparity", {})
        best["write"] = min(best["write"], time.perf_counter() - t0)
    best["in_mb"] = (tmp / "big.jpg").stat().st_size / 1e6
    best["out_mb"] = sum(p.stat().st_size for p in paths.values()) / 1e6
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--res", type=int, default=128, help="--processing-res")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import ray

    from lotus_cli.model.predictor import PredictOptions
    from lotus_cli.model.synthetic import build_checkpoint
    from lotus_cli.run.made import OutputSpec, VideoSpec
    from lotus_cli.scale.options import Scale
    from lotus_cli.scale.worker import Job

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = build_checkpoint(tmp / "lotus-depth-d-v2-0-disparity", family="d", task="depth", seed=2)
        make_inputs(tmp / "in", args.images, (192, 256))
        job = Job(
            str(ckpt),
            "depth",
            OutputSpec(tmp / "unused"),
            PredictOptions(processing_res=args.res),
            VideoSpec(),
            device="cpu",
        )
        print(f"CPU: {cpu()}")
        print(
            f"{args.images} images 256x192, --processing-res {args.res}, tiny synthetic Lotus-D, ray {ray.__version__}"
        )
        import torch

        torch.set_num_threads(1)
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        init_s = time.perf_counter() - t0
        runs = {"plain": Scale(), "ray x1": Scale(engine="ray", workers=1)}
        if cores >= 2:
            runs["ray x2"] = Scale(engine="ray", workers=2)
        small = tmp / "small"
        small.mkdir()
        n_small = args.images // 3
        for f in sorted((tmp / "in").iterdir())[:n_small]:
            (small / f.name).symlink_to(f)
        results: dict = {}
        for rnd in range(args.rounds):
            for name, scale in runs.items():
                t_small = timed(job, small, tmp / f"s-{name}-{rnd}".replace(" ", ""), scale)
                t_all = timed(job, tmp / "in", tmp / f"o-{name}-{rnd}".replace(" ", ""), scale)
                rate = (args.images - n_small) / (t_all - t_small)
                r = {"rate": rate, "startup": t_small - n_small / rate, "total": t_all}
                print(
                    f"  round {rnd}: {name:7} {rate:6.2f} items/s, start-up {r['startup']:5.1f} s "
                    f"({n_small} items {t_small:.1f} s, {args.images} items {t_all:.1f} s)"
                )
                if name not in results or rate > results[name]["rate"]:
                    results[name] = r
        ray.shutdown()
        plain = results["plain"]["rate"]
        print(f"ray.init (local cluster start): {init_s:.1f} s")
        print(f"{'run':8} {'items/s':>8} {'vs plain':>9} {'start-up s':>11} {'all items s':>12}")
        for name, r in results.items():
            print(f"{name:8} {r['rate']:8.2f} {r['rate'] / plain:9.2f} {r['startup']:11.1f} {r['total']:12.1f}")
        if "ray x2" in results:
            print(f"ray x2 / ray x1: {results['ray x2']['rate'] / results['ray x1']['rate']:.2f}")
        print(
            f"engine start-up cost (ray x1 - plain): {results['ray x1']['startup'] - results['plain']['startup']:.1f}"
            f" s per run, plus ray.init {init_s:.1f} s once per driver"
        )
        io = per_item_io(tmp)
        print(
            f"per item at 4000x3000 on one core: JPEG decode {io['decode'] * 1000:.0f} ms, png+png16+json write "
            f"{io['write'] * 1000:.0f} ms; {io['in_mb']:.1f} MB in, {io['out_mb']:.1f} MB out"
        )


if __name__ == "__main__":
    main()
