import io

import numpy as np
import pytest
from PIL import Image

from lotus_cli.errors import InputError
from lotus_cli.io.sources import expand, read_image


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _rgb(h=6, w=8, v=100):
    return np.full((h, w, 3), v, np.uint8)


def test_folder_recursive_mirrors_tree_case_insensitive(tmp_path):
    for rel in ("a/x.JPG", "a/b/y.png", "z.TIFF", ".hidden/h.png", "a/.dot.png", "notes.txt"):
        p = tmp_path / "in" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            p.write_text("x")
        else:
            Image.fromarray(_rgb()).save(p, format="TIFF" if "TIFF" in rel else "PNG")
    items, problems = expand([str(tmp_path / "in")])
    assert [i.key for i in items] == ["a/b/y", "a/x", "z"] and not problems


def test_files_colliding_by_name_keep_their_folders(tmp_path):
    a = _png(tmp_path / "a" / "x.jpg", _rgb())
    b = _png(tmp_path / "b" / "x.jpg", _rgb())
    c = _png(tmp_path / "c" / "only.jpeg", _rgb())
    items, _ = expand([str(a), str(b), str(c)])
    assert [i.key for i in items] == ["a/x", "b/x", "only"]
    assert len({i.key for i in items}) == 3


def test_same_stem_different_extension_keeps_extension(tmp_path):
    _png(tmp_path / "d" / "x.jpg", _rgb())
    _png(tmp_path / "d" / "x.png", _rgb())
    items, _ = expand([str(tmp_path / "d")])
    assert sorted(i.key for i in items) == ["x.jpg", "x.png"]


def test_glob_stdin_duplicates_and_problems(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "s" / "one" / "p.png", _rgb())
    _png(tmp_path / "s" / "two" / "q.png", _rgb())
    items, problems = expand(["s/*/*.png"])
    assert [i.key for i in items] == ["one/p", "two/q"] and not problems
    stdin = io.StringIO("s/one/p.png\n\ns/two/q.png\nmissing.png\ns/one/p.png\n")
    items, problems = expand(["-"], stdin=stdin)
    assert [i.key for i in items] == ["p", "q"]  # the duplicate is dropped
    assert len(problems) == 1 and "missing.png" in str(problems[0])
    _, problems = expand(["nothing/*.png", "notes.txt"])
    assert len(problems) == 2


def test_read_image_exif_orientation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    p = tmp_path / "r.jpg"
    img.save(p, exif=exif, quality=95)
    out = read_image(p)
    assert out.shape == (20, 10, 3)
    assert out[:8].mean() > 200 and out[12:].mean() < 50  # left half of the stored image is now on top


def test_read_image_alpha_grey_and_16bit(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent: alpha is dropped, colour kept
    out = read_image(_png(tmp_path / "a.png", rgba))
    assert out.shape == (4, 5, 3) and (out[..., 0] == 200).all()
    grey = read_image(_png(tmp_path / "g.png", np.full((4, 5), 77, np.uint8)))
    assert grey.shape == (4, 5, 3) and (grey == 77).all()
    g16 = np.full((4, 5), 65535 // 2, np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out16 = read_image(tmp_path / "g16.png")
    assert out16.shape == (4, 5, 3) and abs(int(out16[0, 0, 0]) - 127) <= 1  # scaled, not clipped to 255


@pytest.mark.parametrize("content,expect", [(b"", "empty file"), (b"not an image at all", "not a readable image")])
def test_read_image_bad_files(tmp_path, content, expect):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(InputError) as e:
        read_image(p)
    assert str(p) in str(e.value) and expect in str(e.value)


def test_read_image_truncated_and_pixel_limit(tmp_path):
    p = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(p)
    t = tmp_path / "trunc.png"
    t.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(InputError) as e:
        read_image(t)
    assert "truncated or corrupt" in str(e.value)
    with pytest.raises(InputError) as e:
        read_image(p, max_pixels=100_000)
    assert "--max-pixels" in str(e.value)
    assert read_image(p, max_pixels=0).shape == (300, 400, 3)


def test_symlink_loops_walk_each_real_folder_once_under_its_shortest_path(tmp_path):
    """Links back to a parent made the walk go ~40 levels deep (or 160,000 folders with two): each real
    folder is entered once, loops are named in one warning line each, and keys keep the shortest path."""
    import os
    import time

    root = tmp_path / "in"
    _png(root / "a" / "x.png", _rgb())
    _png(root / "deep" / "deeper" / "y.png", _rgb())
    os.symlink(root, root / "a" / "up")  # a loop back to the walked folder
    os.symlink(root / "a", root / "a" / "self")  # a loop to its own folder
    os.symlink(root, root / "a" / "up2")  # a second link to the parent
    os.symlink(root / "a", root / "b")  # the same folder again, no loop
    os.symlink(root / "deep" / "deeper", root / "short")  # a shorter way to a deeper folder
    warnings = []
    t0 = time.monotonic()
    items, problems = expand([str(root)], on_warning=warnings.append)
    assert time.monotonic() - t0 < 5 and not problems
    assert [i.key for i in items] == ["a/x", "short/y"]
    assert len(warnings) == 3 and all("\n" not in w and "symlink loop" in w for w in warnings)
    assert sorted(w.split(":")[0].rsplit("/", 1)[1] for w in warnings) == ["self", "up", "up2"]


def test_output_folder_inside_the_input_is_never_an_input(tmp_path):
    root = tmp_path / "in"
    _png(root / "x.png", _rgb())
    out = root / "lotus-depth"
    _png(out / "x.png", _rgb())
    _png(out / "lotus-depth" / "x.16bit.png", _rgb())
    items, problems = expand([str(root)], exclude=[out])
    assert [i.key for i in items] == ["x"] and not problems
    items, _ = expand([str(root / "*.png"), str(root / "**" / "*.png")], exclude=[out])
    assert [i.path for i in items] == [root / "x.png"]
    items, problems = expand([str(out / "x.png")], exclude=[out])
    assert not items and "inside the output folder" in str(problems[0])


def test_stdin_list_skips_comments_and_blank_lines_and_strips_spaces(tmp_path):
    a = _png(tmp_path / "a.png", _rgb())
    b = _png(tmp_path / "b.png", _rgb())
    listing = io.StringIO(f"# photos to do\n  {a}  \n\n   \n\t{b}\r\n  # {a} done later\n")
    items, problems = expand(["-"], stdin=listing)
    assert [i.path for i in items] == [a, b] and not problems
