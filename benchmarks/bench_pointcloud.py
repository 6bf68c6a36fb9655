"""How much the unknown shift matters, and how much --shape-from-normals recovers, on real RGB-D frames.

    python benchmarks/bench_pointcloud.py          # ../shared/data/rgbd: 3 NYUv2 frames + 1 TUM frame, seconds
    python benchmarks/bench_pointcloud.py --mesh   # points kept, mesh edges, flatness and timings (below)

No Lotus weights here, so the "prediction" is the ground truth made affine-invariant exactly as a Lotus
depth model's output is (min-max normalised disparity, or depth for the v1-0 depth models), and the
"predicted normals" are DERIVED from the ground truth (normals of the 4x-averaged depth), once exact and
once degraded to Lotus's published normal error on NYUv2 (16.9 degrees mean) by smooth and per-pixel noise. What this
measures is the geometry: given a perfect affine-invariant map and good normals, how wrong is the cloud
under the default --near 1 --far 10 guess, and how close does shape from normals get (scale is still
guessed: --near is set to the true nearest depth so that errors below are errors of SHAPE).

Per frame and kind: median angle between the cloud's normals and the true ones, relative depth error
(AbsRel after the best single scale, so only shape counts), the largest true plane's planarity in the cloud
(RMS off-plane / RMS spread; a disparity shift keeps planes planar but tilts them, a depth shift bends
them) and the angle between the two largest true planes (true value beside it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RGBD = next(
    (p / "shared" / "data" / "rgbd" for p in ROOT.parents[:2] if (p / "shared" / "data" / "rgbd").is_dir()),
    ROOT.parent / "shared" / "data" / "rgbd",
)  # beside the clone (a git worktree sits one level deeper)

from lotus_cli.geometry import camera as g  # noqa: E402
from lotus_cli.geometry.cloud import ScaleOptions, metric_depth  # noqa: E402


def frames():
    nyu = g.Intrinsics(518.8579, 519.46961, 325.58245, 253.73617, 640, 480)
    for i in ("00000", "00050", "00100"):
        yield f"nyu {i}", np.asarray(Image.open(RGBD / "nyu" / f"depth_{i}.png")) / 1000.0, nyu
    yield (
        "tum",
        np.asarray(Image.open(RGBD / "tum" / "depth.png")) / 5000.0,
        g.Intrinsics(525, 525, 319.5, 239.5, 640, 480),
    )


def quarter(z, K):
    """4x block mean ignoring holes (NaN where a block has no measurement) and the matching camera."""
    h, w = z.shape
    with np.errstate(invalid="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", RuntimeWarning)  # all-hole blocks: NaN, as intended
        zq = np.nanmean(np.where(z > 0, z, np.nan).reshape(h // 4, 4, w // 4, 4), axis=(1, 3))
    return zq, K.resized(w // 4, h // 4)


def planes(z, K, n=2):
    """Pixel masks of the n largest planes (Open3D RANSAC, 2 cm) of the true cloud."""
    import open3d as o3d

    o3d.utility.random.seed(0)
    ok = g.edge_mask(z, 0.05)
    idx = np.flatnonzero(ok)
    pts = g.backproject(np.nan_to_num(z), K).reshape(-1, 3)[idx].astype(np.float64)
    masks = []
    for _ in range(n):
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
        _, inl = pc.segment_plane(distance_threshold=0.02, ransac_n=3, num_iterations=1000)
        m = np.zeros(z.size, bool)
        m[idx[inl]] = True
        masks.append(m.reshape(z.shape))
        keep = np.ones(len(idx), bool)
        keep[inl] = False
        idx, pts = idx[keep], pts[keep]
    return masks


def degraded(n, target_deg=16.9, seed=0):
    """Normals as wrong as Lotus's on NYUv2 (mean angle 16.9 degrees, paper Table 2): the true normals plus a
    smooth random field (errors that persist over a surface, sigma 6 px) and per-pixel noise, scaled together
    until the mean angle error is the target."""
    import cv2

    rng = np.random.default_rng(seed)
    smooth = np.stack(
        [cv2.GaussianBlur(rng.normal(size=n.shape[:2]).astype(np.float32), (0, 0), 6.0) for _ in range(3)], -1
    )
    noise = smooth / smooth.std() + rng.normal(size=n.shape)
    lo, hi = 0.0, 2.0
    for _ in range(30):  # bisection on the noise level
        sigma = (lo + hi) / 2
        m = n + sigma * noise
        m /= np.linalg.norm(m, axis=-1, keepdims=True)
        err = np.nanmean(g.angular_error(m, n))
        lo, hi = (sigma, hi) if err < target_deg else (lo, sigma)
    return m.astype(np.float32), float(err)


def scores(z_est, z_true, K, n_true, masks):
    ok = np.isfinite(z_est) & np.isfinite(z_true)
    s = np.median(z_true[ok] / z_est[ok])  # best single scale: only the shape is judged
    absrel = float(np.mean(np.abs(s * z_est[ok] - z_true[ok]) / z_true[ok]))
    n_est = g.normals_from_depth(np.where(ok, z_est, np.nan), K)
    both = ok & np.isfinite(n_est).all(-1) & np.isfinite(n_true).all(-1)
    angle = float(np.median(g.angular_error(n_est[both], n_true[both])))
    p = g.backproject(np.nan_to_num(z_est), K)
    fits = [g.plane_fit(p[m & ok]) for m in masks]
    between = np.degrees(np.arccos(min(1.0, abs(float(fits[0][0] @ fits[1][0])))))
    return angle, absrel, fits[0][2], between


def main() -> None:
    if not RGBD.is_dir():
        raise SystemExit(f"{RGBD} is absent")
    print(
        f"{'frame':<10}{'kind':<10}{'method':<22}{'normal err':>11}{'AbsRel':>9}{'planarity':>11}"
        f"{'plane angle':>13}{'seconds':>9}"
    )
    rows = []
    for name, z_full, K_full in frames():
        z, K = quarter(z_full, K_full)
        n_true = g.normals_from_depth(z, K)  # "derived" normals, the stand-in for the normal model
        masks = planes(z, K)
        n_noisy, noisy_err = degraded(n_true)
        truth = scores(z, z, K, n_true, masks)
        print(
            f"{name:<10}{'':<10}{'ground truth':<22}{truth[0]:>10.2f}°{truth[1]:>9.4f}{truth[2]:>11.4f}"
            f"{truth[3]:>12.1f}°"
        )
        for kind in ("disparity", "depth"):
            t = 1 / z if kind == "disparity" else z
            values = (t - np.nanmin(t)) / (np.nanmax(t) - np.nanmin(t))  # a model's affine-invariant output
            near = float(np.nanmin(z))
            sfn = ScaleOptions(near=near, shape_from_normals=True)
            for method, opts, normals in (
                ("--near 1 --far 10", ScaleOptions(), None),
                ("--shape-from-normals", sfn, n_true),
                (f"  normals {noisy_err:.1f}° off", sfn, n_noisy),
            ):
                t0 = time.perf_counter()
                z_est, rec = metric_depth(values, kind, opts, K=K, normals=normals)
                sec = time.perf_counter() - t0
                sc = scores(z_est, z, K, n_true, masks)
                rows.append((name, kind, method, *sc))
                print(
                    f"{'':<10}{kind:<10}{method:<22}{sc[0]:>10.2f}°{sc[1]:>9.4f}{sc[2]:>11.4f}{sc[3]:>12.1f}°"
                    f"{sec:>9.2f}"
                )
    print()
    for kind in ("disparity", "depth"):
        for method in ("--near 1 --far 10", "--shape-from-normals", "  normals"):
            r = [x for x in rows if x[1] == kind and x[2].startswith(method)]
            print(
                f"mean over frames, {kind:<9} {method:<21}: normal error {np.mean([x[3] for x in r]):6.2f}°, "
                f"AbsRel {np.mean([x[4] for x in r]):.4f}, planarity {np.mean([x[5] for x in r]):.4f}"
            )


def kinect_sigma(z):
    """Kinect v1 axial depth noise in metres at depth z (Nguyen, Izadi, Lovell 2012)."""
    return 0.0012 + 0.0019 * (z - 0.4) ** 2


def meshes() -> None:
    """The ground truth at full resolution as a cloud and a mesh: points written of the valid pixels
    (--normals depth --edge-threshold 0), each triangle's longest edge (mm) and its stretch (longest edge
    over the pixel footprint z / f at its nearest vertex: ~1.4 facing the camera) without and with the
    discontinuity test, the largest plane's RMS against the sensor's noise, and the seconds each step takes."""
    import open3d as o3d

    from lotus_cli.geometry import mesh as M
    from lotus_cli.geometry import preview
    from lotus_cli.geometry.cloud import CameraOptions, CloudOptions, make_cloud

    print(
        f"{'frame':<10}{'valid':>8}{'written':>9}{'no normal':>10}  {'threshold':<10}{'triangles':>10}"
        f"{'median':>8}{'p99':>8}{'p99.9':>8}{'max':>7} mm{'stretch>10':>12}{'>50':>6}"
    )
    for name, z, K in frames():
        z = np.where(z > 0, z, np.nan)
        rgb = np.zeros(z.shape + (3,), np.uint8)
        cams = CameraOptions(intrinsics=(K.fx, K.fy, K.cx, K.cy))
        t0 = time.perf_counter()
        cloud0 = make_cloud(rgb, z, "depth", cams, ScaleOptions(), CloudOptions(edge_threshold=0), per_metre=1.0)
        t_cloud = time.perf_counter() - t0
        c = cloud0.record["cloud"]
        head = f"{name:<10}{c['with_depth']:>8}{c['points']:>9}{c['without_normal']:>10}  "
        for t in (0.0, 0.05):
            cloud = (
                cloud0 if t == 0 else make_cloud(rgb, z, "depth", cams, ScaleOptions(), CloudOptions(), per_metre=1.0)
            )
            t0 = time.perf_counter()
            mesh = M.from_cloud(cloud)
            t_mesh = time.perf_counter() - t0
            longest = g.edge_lengths(mesh.vertices, mesh.faces).max(-1)
            stretch = longest / (mesh.vertices[mesh.faces][..., 2].min(-1) / K.fx)
            q = 1000 * np.percentile(longest, [50, 99, 99.9, 100])
            print(
                f"{head if t == 0 else ' ' * len(head)}{t:<10g}{len(mesh.faces):>10}{q[0]:>8.1f}{q[1]:>8.1f}"
                f"{q[2]:>8.1f}{q[3]:>7.0f}   {(stretch > 10).sum():>10}{(stretch > 50).sum():>6}"
            )
        o3d.utility.random.seed(0)
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(mesh.vertices[::4].astype(np.float64)))
        _, inl = pc.segment_plane(distance_threshold=0.03, ransac_n=3, num_iterations=500)
        plane = mesh.vertices[::4][inl]
        _, rms, _ = g.plane_fit(plane)
        noise = float(np.sqrt(np.mean(kinect_sigma(plane[:, 2]) ** 2)))
        t0 = time.perf_counter()
        M.encode(mesh, "glb", "x", rgb)
        t_glb = time.perf_counter() - t0
        t0 = time.perf_counter()
        preview.render_cloud(mesh, K)
        t_prev = time.perf_counter() - t0
        print(
            f"{'':<10}largest plane: {len(plane) / len(mesh.vertices[::4]):.0%} of the vertices, RMS {1000 * rms:.1f}"
            f" mm, sensor noise there {1000 * noise:.1f} mm; seconds: cloud {t_cloud:.2f}, mesh {t_mesh:.2f}, "
            f"glb {t_glb:.2f}, preview {t_prev:.2f}"
        )


if __name__ == "__main__":
    meshes() if "--mesh" in sys.argv[1:] else main()
