"""Point clouds and meshes of equirectangular maps (geometry/panorama.py): points on the ray-cast room's
surfaces, a mesh closed at the longitude wrap and the poles, and no triangle across a depth edge."""

import numpy as np
import pytest

from lotus_cli.errors import UsageError
from lotus_cli.geometry.cloud import CameraOptions, CloudOptions, ScaleOptions
from lotus_cli.geometry.panorama import make_sphere_cloud, sphere_mesh, sphere_normals, sphere_points

from .panorama_rooms import box_room, furnished_room, render_panorama

H, W = 48, 96


def cloud_of(room, stride=1, normals="depth", threshold=0.0, **scale):
    """The cloud of ``room``'s exact inverse distance; ``threshold`` 0 keeps every pixel (a box room has no depth
    edge, but at 3.75 degrees a pixel, grazing walls change by more than 5 % between neighbours)."""
    scene = render_panorama(H, W, room)
    q = 1 / scene["distance"]
    values = (q / q.max()).astype(np.float32)  # what predict_panorama returns: inverse distance / its maximum
    nearest = float(scene["distance"].min())
    scale = scale or dict(near=nearest, far=float(scene["distance"].max()))
    cloud = make_sphere_cloud(
        scene["rgb"],
        values,
        "disparity",
        CameraOptions(),
        ScaleOptions(**scale),
        CloudOptions(stride=stride, edge_threshold=threshold),
        normals=normals,
        normals_lotus=scene["normal"].astype(np.float32),
    )
    return scene, cloud


def test_points_lie_on_the_rooms_walls_at_their_distance():
    scene, cloud = cloud_of(box_room())
    assert cloud.record["cloud"]["points"] == H * W
    d = np.linalg.norm(cloud.points, axis=-1)
    np.testing.assert_allclose(d, scene["distance"].ravel(), rtol=1e-4)  # near/far are the true extremes
    p = cloud.points.astype(np.float64)
    on_wall = np.isclose(p[:, 0], -2.1, atol=1e-3) | np.isclose(p[:, 0], 3.9, atol=1e-3)
    on_wall |= np.isclose(p[:, 2], 2.6, atol=1e-3) | np.isclose(p[:, 2], -1.8, atol=1e-3)
    on_wall |= np.isclose(p[:, 1], 1.5, atol=1e-3) | np.isclose(p[:, 1], -1.2, atol=1e-3)
    assert on_wall.all()
    assert cloud.record["camera"]["projection"] == "equirect" and "panorama frame" in cloud.record["cloud"]["frame"]


def test_normals_from_the_distances_match_the_walls():
    scene = render_panorama(H, W, box_room())
    n = sphere_normals(sphere_points(scene["distance"]))
    cos = (n * -scene["normal"]).sum(-1)  # the truth in OpenCV axes is the Lotus one negated
    # exact inside each wall; the pixels whose differences straddle a corner of the room are off
    assert np.median(cos) > 0.9999 and (cos > 0.99).mean() > 0.9


def test_predicted_normals_are_the_panoramas_in_opencv_axes():
    scene, cloud = cloud_of(box_room(), normals="predict")
    np.testing.assert_allclose(cloud.normals, -scene["normal"].reshape(-1, 3), atol=1e-5)


def edges(faces):
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    return counts


@pytest.mark.parametrize("stride", [1, 2, 5])
def test_the_mesh_of_a_box_room_is_a_closed_sphere(stride):
    _, cloud = cloud_of(box_room(), stride=stride)
    m = sphere_mesh(cloud, stride)
    faces = np.asarray(m.points)[m.faces]  # by cloud point: the wrap's duplicated vertices are one point
    counts = edges(faces)
    assert (counts == 2).all()  # every edge between exactly two triangles: no hole at the wrap or the poles
    assert len(np.unique(faces)) - len(counts) + len(faces) == 2  # Euler: a sphere
    assert m.record["wrap_triangles"] > 0 and m.record["pole_triangles"] > 0
    # seen from the centre every triangle winds counter-clockwise: its normal faces the centre
    p = m.vertices[m.faces].astype(np.float64)
    normal = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    assert ((normal * p.mean(1)).sum(-1) < 0).all()
    # texture coordinates never run back across the image within a block's triangle (the caps' fans span
    # the pole's whole row by nature)
    blocks = m.faces[: m.record["triangles"] - m.record["pole_triangles"]]
    assert np.ptp(m.uvs[blocks][..., 0], axis=1).max() < 0.5


def test_the_mesh_does_not_bridge_depth_edges():
    _, cloud = cloud_of(furnished_room(), threshold=0.05)
    m = sphere_mesh(cloud)
    d = np.linalg.norm(m.vertices[m.faces], axis=-1)  # [F, 3] distances of each triangle's corners
    jump = (d.max(1) - d.min(1)) / d.min(1)
    blocks = jump[: m.record["triangles"] - m.record["pole_triangles"]]
    assert blocks.max() < 0.15  # two neighbours differ by at most 5 %; a block's diagonal by about twice that
    assert cloud.record["cloud"]["removed_at_edges"] > 0  # the ball's and the table's outlines


def test_shape_from_normals_is_refused():
    with pytest.raises(UsageError, match="pinhole"):
        cloud_of(box_room(), shape_from_normals=True)
