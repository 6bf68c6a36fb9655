import numpy as np
import pytest

from lotus_cli.geometry import NORMAL_FRAMES, convert_normals


def test_wall_and_floor_in_every_frame():
    wall, floor = np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0])  # Lotus frame
    assert convert_normals(wall, "opencv").tolist() == [0, 0, -1]  # faces the camera: -z in OpenCV
    assert convert_normals(floor, "opencv").tolist() == [0, -1, 0]  # up is -y in OpenCV
    assert convert_normals(wall, "opengl").tolist() == [0, 0, 1]
    left = np.array([1.0, 0.0, 0.0])  # Lotus x points left
    assert convert_normals(left, "opengl").tolist() == [-1, 0, 0] == convert_normals(left, "opencv")[:1].tolist() + [0, 0]


@pytest.mark.parametrize("a", list(NORMAL_FRAMES))
@pytest.mark.parametrize("b", list(NORMAL_FRAMES))
def test_round_trips(a, b):
    n = np.random.default_rng(0).normal(size=(5, 3))
    np.testing.assert_array_equal(convert_normals(convert_normals(n, b, a), a, b), n)
