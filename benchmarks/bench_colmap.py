"""`lotus colmap`: what alignment and fusion add per image against the prediction itself, and fusion's memory.

    python benchmarks/bench_colmap.py                        # tiny model (the prediction: a stand-in)
    python benchmarks/bench_colmap.py --size full            # builds the full-size Lotus-D (minutes; 3.5 GB)
    python benchmarks/bench_colmap.py --folder DIR           # a checkpoint built earlier (or real weights)
    python benchmarks/bench_colmap.py --views 1000 --mp 1.0  # the fusion memory part's size

Part 1, per image at ``--width`` x ``--height`` (default 1024 x 768: a 768 px prediction): a room ray-cast
from 8 cameras and written by pycolmap (tests/colmap_scene.py), then (a) one prediction of the depth model
at --processing-res 768 (the second call: warm), (b) the alignment alone (projection of the image's SfM
points with its camera, sampling, robust fit, the aligned map), (c) everything `lotus colmap` does per
image but predict (read the image and the map, align, write depths/ mono_depth/ normals/ and the sidecar),
from a run with --depth maps, and (d) fusion per view (stride 2, 8 neighbours). The goal: (b) + (d), and
(c) + (d), under 5 % of (a).

Part 2, fusion of ``--views`` simulated views of ``--mp`` megapixels (a tilted wall seen by cameras along a
line, each view's depth computed when fusion asks for it): peak Python heap (tracemalloc, which sees numpy's
buffers) and peak RSS after 1/10 and after all of the views. Bounded: the same peak whatever the count.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def part1(args, tmp: Path) -> dict:
    import numpy as np
    from colmap_scene import build_scene, fake_maps

    from lotus_cli.geometry.colmap import COLMAP_PIXEL_OFFSET, align_to_points, sample_bilinear
    from lotus_cli.model.predictor import LotusPredictor, PredictOptions
    from lotus_cli.model.synthetic import build_checkpoint
    from lotus_cli.run.colmap import ColmapRequest, colmap_scene
    from lotus_cli.run.colmap_workspace import pose_of

    t = time.perf_counter()
    scene = build_scene(tmp / "room", views=8, size=(args.width, args.height), points_per_view=400)
    fake_maps(scene, tmp / "room/maps", tmp / "room/nmaps")
    print(f"scene: 8 views of {args.width}x{args.height}, built in {time.perf_counter() - t:.1f} s", flush=True)

    folder = args.folder
    if folder is None:
        t = time.perf_counter()
        folder = build_checkpoint(tmp / "lotus-depth-d-v2-0-disparity", family="d", task="depth", size=args.size)
        print(f"built the {args.size} checkpoint in {time.perf_counter() - t:.1f} s", flush=True)
    pred = LotusPredictor.from_pretrained(str(folder), task="depth", device="cpu", dtype="fp32")
    from PIL import Image

    rgb = np.asarray(Image.open(tmp / "room/images" / scene.names[0]))
    opts = PredictOptions(processing_res=768)
    times = []
    for _ in range(args.rounds + 1):
        t = time.perf_counter()
        pred.predict(rgb, opts)
        times.append(time.perf_counter() - t)
    t_pred = min(times[1:])

    # (b) the alignment alone, on the stand-in map of view 0
    import pycolmap

    rec = pycolmap.Reconstruction(str(tmp / "room/sparse/0"))
    im = next(rec.images[i] for i in rec.reg_image_ids() if rec.images[i].name == scene.names[0])
    cam = rec.cameras[im.camera_id]
    values = np.load(tmp / "room/maps" / f"{Path(scene.names[0]).stem}.npy")
    align = []
    for _ in range(5):
        t = time.perf_counter()
        R, tt = pose_of(im)
        ids = [p.point3D_id for p in im.points2D if p.has_point3D()]
        xyz = np.array([rec.points3D[i].xyz for i in ids]).reshape(-1, 3)
        X = xyz @ R.T + tt
        uv = np.asarray(cam.img_from_cam(np.ascontiguousarray(X))) - COLMAP_PIXEL_OFFSET
        a = align_to_points(sample_bilinear(values, uv), X[:, 2], "disparity")
        a.depth(values)
        align.append(time.perf_counter() - t)
    t_align = min(align)

    # (c) and (d): whole runs without a model, without and with fusion
    def whole(fuse: bool, out: Path) -> tuple[float, list[float]]:
        from lotus_cli.run.events import Reporter

        seconds = []

        class R(Reporter):
            def result(self, r):
                seconds.append(r.seconds)

        req = ColmapRequest(
            tmp / "room",
            out=out,
            depth=tmp / "room/maps",
            depth_kind="disparity",
            normals_from=tmp / "room/nmaps",
            fuse=fuse,
        )
        t = time.perf_counter()
        colmap_scene(req, R())
        return time.perf_counter() - t, seconds

    t_nofuse, per_image = whole(False, tmp / "o1")
    t_fuse, _ = whole(True, tmp / "o2")
    t_image = statistics.median(per_image)
    t_fusion = max(t_fuse - t_nofuse, 0.0) / len(scene.names)
    side = json.loads((tmp / "o2/lotus-colmap/scene.json").read_text())
    return {
        "model": f"{args.size if args.folder is None else args.folder}",
        "image": f"{args.width}x{args.height}",
        "points_used": a.used,
        "prediction_s": round(t_pred, 4),
        "prediction_rounds_s": [round(x, 4) for x in times],
        "alignment_s": round(t_align, 5),
        "per_image_without_model_s": round(t_image, 4),
        "fusion_per_view_s": round(t_fusion, 4),
        "fused_points": side["fusion"]["kept"],
        "share_alignment_and_fusion": round((t_align + t_fusion) / t_pred, 4),
        "share_all_but_the_model": round((t_image + t_fusion) / t_pred, 4),
    }


def part2(args, tmp: Path) -> dict:
    import numpy as np

    from lotus_cli.geometry.camera import Intrinsics
    from lotus_cli.geometry.fusion import DepthCache, PlyStream, fuse_views, pinhole_view

    side = int(round((args.mp * 1e6 * 4 / 3) ** 0.5))
    w, h = side, side * 3 // 4
    K = Intrinsics(0.9 * w, 0.9 * w, (w - 1) / 2, (h - 1) / 2, w, h)
    n_plane, off = np.array([0.2, 0.0, -1.0]) / np.linalg.norm([0.2, 0.0, -1.0]), 5.0  # n . p + off = 0
    views = [pinhole_view(np.eye(3), np.array([-0.01 * i, 0.0, 0.0]), K) for i in range(args.views)]
    uu, vv = np.meshgrid((np.arange(w) - K.cx) / K.fx, (np.arange(h) - K.cy) / K.fy)

    def depth(i):  # the wall's z seen from camera i (centre at x = 0.01 i)
        c = -views[i].t
        den = n_plane[0] * uu + n_plane[1] * vv + n_plane[2]
        return (-(off + n_plane @ c) / den).astype(np.float32)

    nbrs = [[j for j in range(max(0, i - 4), min(args.views, i + 5)) if j != i] for i in range(args.views)]
    marks = {}
    t0 = time.perf_counter()

    def on_view(i, one):
        if i + 1 in (args.views // 10, args.views):
            marks[i + 1] = {
                "heap_peak_mb": round(tracemalloc.get_traced_memory()[1] / 2**20, 1),
                "rss_peak_mb": round(rss_mb(), 1),
                "seconds": round(time.perf_counter() - t0, 1),
            }

    tracemalloc.start()
    sink = PlyStream(tmp / "fused.ply")
    stats = fuse_views(
        views, DepthCache(depth, 16), nbrs, sink, min_views=2, tolerance=0.01, stride=args.stride, on_view=on_view
    )
    sink.close()
    tracemalloc.stop()
    return {
        "views": args.views,
        "view_size": f"{w}x{h}",
        "stride": args.stride,
        "cache": 16,
        "kept_points": stats["kept"],
        "ply_mb": round((tmp / "fused.ply").stat().st_size / 2**20, 1),
        "after": marks,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=("tiny", "full"))
    p.add_argument("--folder", type=Path, default=None)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--views", type=int, default=1000)
    p.add_argument("--mp", type=float, default=1.0)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--skip", choices=("1", "2"), default=None, help="leave out part 1 or part 2")
    args = p.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="lotus-bench-colmap-") as tmp:
        if args.skip != "1":
            print(json.dumps({"part1": part1(args, Path(tmp))}, indent=1), flush=True)
        if args.skip != "2":
            print(json.dumps({"part2": part2(args, Path(tmp))}, indent=1), flush=True)


if __name__ == "__main__":
    main()
