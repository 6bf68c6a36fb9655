"""`lotus app`: what the page adds to a prediction, and whether its memory stays flat.

    flock /tmp/fullsize.lock python benchmarks/bench_app.py            # both parts (the first needs ~9 GB)
    python benchmarks/bench_app.py --part memory                       # the memory part alone (tiny model)
    python benchmarks/bench_app.py --part speed --folder DIR           # reuse a full-size checkpoint folder

Speed (issue 25: overhead under 10 %): the full-size Lotus-D architecture (random weights,
``build_checkpoint(size="full")``) at --processing-res 768 on this CPU. The app runs in this process (its
server in threads) and headless Chromium (Debian's, through Playwright) uploads a photo and clicks Predict;
"upload to first pixel" runs from handing the file to the page until the result <img> has loaded. It is
compared, in the same run and alternating, with the prediction alone: ``predictor.predict_batch`` on the
same decoded image with the same options (no files, no page). What the app adds: checking and decoding the
upload, writing png, png16, npy, exr and the sidecar, the mesh (GLB + PLY, as `lotus pointcloud --mesh`),
Gradio's queue and file copies, and the browser's download of the result.

Memory: the RSS of the app's process after each of 50 requests through the page, with a tiny model at
256 px (--memory-res; on machine C a full-size model would take over an hour for 50 requests, and even
the tiny one 16 s a request at 768 px). The model's own memory does not grow with requests; what might
is the app's: request folders, Gradio's cache and queue, the page's state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_predictor import cpu_line, current_rss_bytes, random_checkpoint  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
PHOTO = ROOT / "samples" / "rocket.jpg"  # 640 x 427: processed at 768 x 512
UPLOADED = (  # the file has reached the server: the page links to it (Predict before that is refused)
    "(name) => Array.from(document.querySelectorAll('#upload a[href]'))"
    ".some(a => a.getAttribute('download') === name && a.href.includes('file='))"
)
NEW_RESULT = (  # the new result has loaded, or the page shows an error
    "(old) => { const i = document.querySelector('#result img'); "
    "return (!!i && i.src !== old && i.complete && i.naturalWidth > 0) || "
    "!!document.querySelector('[data-testid=toast-text].error'); }"
)


def photos(tmp: Path) -> list[Path]:
    """The photo and its mirror image, taken in turn: Gradio serves a file by its content's hash, so the same
    result twice would keep the same <img> source, and nothing would say that the second one has arrived."""
    from PIL import Image, ImageOps

    mirrored = tmp / f"mirrored-{PHOTO.name}"
    ImageOps.mirror(Image.open(PHOTO)).save(mirrored, quality=95)
    return [PHOTO, mirrored]


def start(folder: str, res: int, tmp: Path):
    """The app on a free port in this process: (service, page server, url)."""
    from lotus_cli.app.serve import free_port
    from lotus_cli.app.service import AppOptions, Service
    from lotus_cli.app.ui import launch

    service = Service(AppOptions(models=(folder,), device="cpu", processing_res=res), root=tmp / "requests")
    demo, url = launch(service, port=free_port(), block=False)
    return service, demo, url


def through_page(page, photo: Path) -> float:
    """Seconds from giving ``photo`` to the page until the result image has loaded."""
    old = page.get_attribute("#result img", "src") if page.locator("#result img").count() else None
    clear = page.locator("#upload").get_by_label("Clear")
    if clear.count():
        clear.first.click()
    t0 = time.perf_counter()
    page.locator("#upload input[type=file]").set_input_files(str(photo))
    page.wait_for_function(UPLOADED, arg=photo.name)
    page.locator("#run").click()
    page.wait_for_function(NEW_RESULT, arg=old)
    seconds = time.perf_counter() - t0
    error = page.locator("[data-testid=toast-text].error")
    if error.count():
        raise SystemExit(f"the page says: {error.first.inner_text()}")
    return seconds


def browser():
    from playwright.sync_api import sync_playwright

    p = sync_playwright().start()
    b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    page = b.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(int(os.environ.get("BENCH_APP_TIMEOUT_MS", "900000")))
    return p, b, page


def speed(args) -> dict:
    from lotus_cli.io.sources import read_image
    from lotus_cli.model.predictor import PredictOptions

    with tempfile.TemporaryDirectory(prefix="lotus-bench-app-") as tmp:
        service, demo, url = start(args.folder, args.res, Path(tmp))
        p, b, page = browser()
        page.goto(url)
        page.wait_for_selector("#upload")
        turns = photos(Path(tmp))
        rgb = read_image(PHOTO)
        opts = PredictOptions(processing_res=args.res)
        t0 = time.perf_counter()
        through_page(page, turns[1])  # warm-up: the first call calibrates the CPU paths (cached) and warms up
        warm = time.perf_counter() - t0
        alone, page_s, server_s, rss = [], [], [], []
        for _ in range(args.rounds):  # alternate the two sides: this machine's noise is a few percent
            t0 = time.perf_counter()
            service.predictor.predict_batch([rgb], opts)
            alone.append(time.perf_counter() - t0)
            page_s.append(through_page(page, turns[len(page_s) % 2]))  # the photo, then its mirror, ...
            rss.append(current_rss_bytes() / 2**30)
        b.close()
        p.stop()
        demo.close()
    return {"warm_up_s": warm, "alone_s": alone, "page_s": page_s, "rss_gb": rss, "server_s": server_s}


def memory(args) -> dict:
    from lotus_cli.model.synthetic import build_checkpoint

    with tempfile.TemporaryDirectory(prefix="lotus-bench-app-") as tmp:
        folder = build_checkpoint(Path(tmp) / "lotus-depth-d-v2-0-disparity", family="d", size="tiny")
        service, demo, url = start(str(folder), args.memory_res, Path(tmp))
        p, b, page = browser()
        page.goto(url)
        page.wait_for_selector("#upload")
        rss, seconds, turns = [], [], photos(Path(tmp))
        for i in range(args.requests):
            seconds.append(through_page(page, turns[i % 2]))
            rss.append(current_rss_bytes() / 2**20)
        b.close()
        p.stop()
        demo.close()
    return {"rss_mb": rss, "seconds": seconds}


def child(part: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", part, "--res", str(args.res), "--rounds", str(args.rounds)]
    cmd += ["--requests", str(args.requests), "--memory-res", str(args.memory_res)]
    cmd += ["--folder", args.folder] if args.folder else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.folder:
        env["LOTUS_CACHE"] = str(Path(args.folder) / ".lotus-cache")  # the CPU calibration, kept with the folder
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{part} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "speed", "memory"), default="all")
    ap.add_argument("--res", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=3, help="speed: alternating rounds of the two sides")
    ap.add_argument("--requests", type=int, default=50, help="memory: requests through the page")
    ap.add_argument("--memory-res", type=int, default=256, help="memory: processing size of the tiny model")
    ap.add_argument("--folder", help="speed: a full-size checkpoint folder built by an earlier run")
    ap.add_argument("--child", choices=("speed", "memory"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(speed(args) if args.child == "speed" else memory(args)))
        return

    import torch

    print(
        f"{cpu_line()}; torch {torch.__version__} ({torch.get_num_threads()} threads); photo {PHOTO.name} "
        f"at {args.res} px"
    )
    if args.part in ("all", "speed"):
        args.folder, tmp = random_checkpoint(args.folder, "full", family="d", prefix="lotus-bench-app-full-")
        r = child("speed", args)
        alone, page = min(r["alone_s"]), min(r["page_s"])
        print(f"speed, full-size Lotus-D, {args.res} px, best of {args.rounds} alternating rounds "
              f"(first request {r['warm_up_s']:.1f} s, with the CPU calibration):")  # fmt: skip
        print(f"  prediction alone          {alone:8.2f} s   (all: {', '.join(f'{x:.2f}' for x in r['alone_s'])})")
        print(f"  upload to first pixel     {page:8.2f} s   (all: {', '.join(f'{x:.2f}' for x in r['page_s'])})")
        print(f"  overhead                  {100 * (page / alone - 1):7.1f} %   (target < 10 %)")
        print(f"  app RSS after each round  {', '.join(f'{x:.2f}' for x in r['rss_gb'])} GB")
        if tmp is not None:
            tmp.cleanup()
    if args.part in ("all", "memory"):
        args.folder = None
        r = child("memory", args)
        rss = r["rss_mb"]
        n = len(rss)
        print(f"memory, tiny Lotus-D at {args.memory_res} px, {n} requests through the page:")
        at = sorted({i for i in (1, 10, 25, n) if i <= n})
        print(f"  RSS after request {', '.join(map(str, at))}: " + ", ".join(f"{rss[i - 1]:.0f}" for i in at) + " MB")
        second = rss[n // 2 :]
        print(f"  second half: min {min(second):.0f}, max {max(second):.0f} MB; growth from request 10 to {n}: "
              f"{rss[-1] - rss[min(9, n - 1)]:+.0f} MB; seconds per request {sum(r['seconds']) / n:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
