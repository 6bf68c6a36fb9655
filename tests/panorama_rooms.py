"""Ray-cast rooms of known geometry seen from inside as equirectangular panoramas, and a stand-in for the
network that returns each perspective view's true disparity (or depth) under its own unknown scale and shift,
and its true normals in the view's frame.

Frames are geometry/panorama.py's: the panorama frame has OpenCV axes (x right, y down, z forward); the
camera is at the origin. Distances are metres along the ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lotus_cli.geometry.panorama import View, equirect_to_view, pixel_directions
from lotus_cli.model.predictor import Prediction


@dataclass
class Room:
    """Planes (unit normal n facing the camera, n . p = -dist), axis-aligned boxes (lo, hi corners) and
    spheres (centre, radius), each with an albedo."""

    planes: list = field(default_factory=list)
    boxes: list = field(default_factory=list)
    spheres: list = field(default_factory=list)


def box_room() -> Room:
    """A 6 x 4.4 x 2.7 m box room, the camera 1.5 m above the floor and off the room's centre."""
    walls = [
        ((1.0, 0.0, 0.0), 2.1, (0.8, 0.4, 0.3)),  # the left wall at x = -2.1 faces +x
        ((-1.0, 0.0, 0.0), 3.9, (0.3, 0.7, 0.4)),  # right wall at x = 3.9
        ((0.0, 0.0, -1.0), 2.6, (0.4, 0.4, 0.8)),  # front wall at z = 2.6
        ((0.0, 0.0, 1.0), 1.8, (0.7, 0.7, 0.3)),  # back wall at z = -1.8
        ((0.0, -1.0, 0.0), 1.5, (0.6, 0.5, 0.5)),  # floor at y = +1.5 (down)
        ((0.0, 1.0, 0.0), 1.2, (0.9, 0.9, 0.9)),  # ceiling at y = -1.2
    ]
    return Room(planes=[(np.asarray(n), d, np.asarray(c)) for n, d, c in walls])


def furnished_room() -> Room:
    """The box room under a ceiling sloping down towards the right (30 degrees), with a table-like box and
    a ball: depth edges, surfaces at many angles, and the sloped ceiling over the up view's border."""
    room = box_room()
    room.planes = [p for p in room.planes if p[0][1] != 1.0]  # no flat ceiling
    tilt = np.radians(30.0)
    n = np.array([-np.sin(tilt), np.cos(tilt), 0.0])  # faces down and left, towards the camera
    room.planes.append((n, 1.3, np.array([0.9, 0.85, 0.8])))
    room.boxes.append((np.array([0.4, 0.7, 0.6]), np.array([1.6, 1.5, 1.7]), np.array([0.5, 0.3, 0.2])))
    room.spheres.append((np.array([-1.0, 1.0, -0.9]), 0.45, np.array([0.2, 0.5, 0.8])))
    return room


def cast(d: np.ndarray, room: Room) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit ray directions [..., 3] -> (distance [...], normal [..., 3] facing the camera, OpenCV axes,
    albedo [..., 3]) of the nearest surface."""
    d = d.astype(np.float64)
    best = np.full(d.shape[:-1], np.inf)
    normal = np.zeros(d.shape)
    albedo = np.zeros(d.shape)

    def hit(t, n, c):
        closer = np.isfinite(t) & (t > 1e-6) & (t < best)
        best[closer] = t[closer]
        normal[closer] = np.broadcast_to(n, d.shape)[closer]
        albedo[closer] = c

    for n, dist, c in room.planes:
        dn = d @ n
        hit(-dist / np.where(np.abs(dn) > 1e-12, dn, np.nan), n, c)
    for lo, hi, c in room.boxes:
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = lo / d, hi / d
        near = np.nanmax(np.minimum(t1, t2), axis=-1)
        far = np.nanmin(np.maximum(t1, t2), axis=-1)
        t = np.where(near <= far, near, np.nan)
        axis = np.nanargmax(np.minimum(t1, t2), axis=-1)
        n = np.zeros(d.shape)
        np.put_along_axis(n, axis[..., None], -np.sign(np.take_along_axis(d, axis[..., None], -1)), -1)
        hit(t, n, c)
    for centre, r, c in room.spheres:
        b = d @ centre
        disc = b**2 - (centre @ centre - r**2)
        t = b - np.sqrt(np.where(disc >= 0, disc, np.nan))
        hit(t, (t[..., None] * d - centre) / r, c)
    return best, normal, albedo


def shade(d: np.ndarray, t: np.ndarray, n: np.ndarray, albedo: np.ndarray) -> np.ndarray:
    """uint8 RGB of the surfaces: Lambert-shaded albedo with a 0.5 m checker."""
    p = t[..., None] * d
    checker = (np.floor(p * 2).sum(-1) % 2) * 0.3 + 0.7
    light = np.array([0.3, -0.8, 0.5]) / np.linalg.norm([0.3, -0.8, 0.5])
    s = 0.35 + 0.65 * np.abs(n @ light)
    return np.clip(albedo * (s * checker)[..., None] * 255, 0, 255).astype(np.uint8)


def render_panorama(height: int, width: int, room: Room) -> dict:
    """rgb uint8 [H, W, 3], distance float64 [H, W] (metres along the ray), normal float64 [H, W, 3] in the
    panorama's Lotus axes (x left, y up, z backward: the OpenCV axes negated)."""
    d = pixel_directions(height, width, dtype=np.float64)
    t, n, c = cast(d, room)
    return dict(rgb=shade(d, t, n, c), distance=t, normal=-n)


def render_view(view: View, room: Room) -> tuple[np.ndarray, np.ndarray]:
    """A view's exact z-depth [S, S] (metres along its axis) and normals [S, S, 3] in its Lotus frame."""
    r = view.rays()  # z = 1 in the view frame
    unit = r / np.linalg.norm(r, axis=-1, keepdims=True)
    t, n, _ = cast(unit @ view.rotation.T, room)
    z = t * unit[..., 2]
    return z, -(n @ view.rotation)  # R^T n for row vectors, then Lotus axes


class StandIn:
    """Acts as the predictor for ``predict_panorama``: each view image it is given is recognised among the
    views of ``pano`` (the one it equals) and answered with that view's exact disparity (``kind``
    "disparity") or depth under a scale and shift of its own, or its exact normals (``task`` "normal").
    ``spoil`` (view index -> fraction) overwrites that fraction of a view's pixels with nonsense."""

    family = "d"
    latent_factor = 8

    def __init__(
        self, pano: np.ndarray, views: list[View], room: Room, task="depth", kind="disparity", seed=0, spoil=None
    ):
        self.task, self.kind = task, ("normal" if task == "normal" else kind)
        self.views, self.room = views, room
        self.images = [equirect_to_view(pano, v).astype(np.int16) for v in views]
        rng = np.random.default_rng(seed)
        self.affine = [(rng.uniform(0.3, 3.0), rng.uniform(-0.4, 0.4)) for _ in views]
        self.spoil = spoil or {}
        self.calls: list[int] = []  # images per call

    def which(self, image: np.ndarray) -> int:
        errors = [np.abs(image.astype(np.int16) - ref).mean() for ref in self.images]
        k = int(np.argmin(errors))
        assert errors[k] == 0, f"a view image matches none of the expected views (closest {errors[k]})"
        return k

    def predict_batch(self, images, opts) -> list[Prediction]:
        self.calls.append(len(images))
        out = []
        for im in images:
            k = self.which(im)
            z, n = render_view(self.views[k], self.room)
            if self.task == "normal":
                m = n.astype(np.float32)
            else:
                a, b = self.affine[k]
                m = (a * (1 / z if self.kind == "disparity" else z) + b).astype(np.float32)
                if k in self.spoil:
                    bad = np.random.default_rng(k).random(m.shape) < self.spoil[k]
                    m[bad] = np.random.default_rng(k + 1).uniform(m.min(), m.max(), bad.sum())
            out.append(Prediction(m, im.shape[:2], 0.0, {}))
        return out
