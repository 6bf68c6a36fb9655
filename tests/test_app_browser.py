"""`lotus app` in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by Playwright's sync
API; no browser download) against the app served on a free local port with a tiny checkpoint, and the same
app through gradio_client. The app starts once for the module. Screenshots go to $LOTUS_TEST_ARTIFACTS
(default: a temporary folder); docs/app.md shows one."""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lotus_cli.app.security import Limits
from lotus_cli.app.serve import ServeOptions, free_port, serve
from lotus_cli.app.service import AppOptions
from lotus_cli.cli import app as cli

from .conftest import make_image

pytestmark = pytest.mark.heavy  # ~45 s for the module on machine C (the app's start, a browser, 6 predictions)

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHOTO = Path(__file__).resolve().parents[1] / "samples" / "chelsea.png"  # 451 x 300
RES = 64
WAIT_MS = 60_000
UPLOADED = (  # the file has reached the server: the page links to it (Predict before that is refused)
    "(name) => Array.from(document.querySelectorAll('#upload a[href]'))"
    ".some(a => a.getAttribute('download') === name && a.href.includes('file='))"
)
LOADED = "(sel) => { const i = document.querySelector(sel); return !!i && i.complete && i.naturalWidth > 0; }"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    where = os.environ.get("LOTUS_TEST_ARTIFACTS")
    path = Path(where) if where else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browsed(depth_d, tmp_path_factory) -> Path:
    """An output folder made by `lotus depth` over two photos and a broken file, with its --json records."""
    root = tmp_path_factory.mktemp("browsed")
    src = root / "photos"
    src.mkdir()
    Image.fromarray(make_image(60, 90, 1)).save(src / "street.png")
    Image.fromarray(make_image(80, 60, 2)).save(src / "portrait.png")
    (src / "broken.png").write_bytes(b"not a png")
    out = root / "out"
    r = CliRunner().invoke(
        cli, ["depth", str(src), "-m", str(depth_d), "--processing-res", str(RES), "--json", "-o", str(out)]
    )
    assert r.exit_code == 1, r.output  # the broken file failed
    (out / "records.jsonl").write_text("".join(line + "\n" for line in r.stdout.splitlines() if line.startswith("{")))
    (root / "secret.txt").write_text("outside the folder")
    return out


@pytest.fixture(scope="module")
def served(depth_g, browsed):
    """The app on a free local port: (url, the browsed folder)."""
    options = AppOptions(models=(str(depth_g),), processing_res=RES, limits=Limits(max_upload_mb=5))
    demo, url = serve(options, ServeOptions(browse=browsed, port=free_port()), block=False)
    yield url.rstrip("/"), browsed
    demo.close()


@pytest.fixture(scope="module")
def page(served, tmp_path_factory):
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            args=ARGS,
            headless=True,
            viewport={"width": 1280, "height": 1000},
        )
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(served[0] + "/")
        page.wait_for_selector("#upload")
        yield page
        context.close()


def upload_and_run(page, path: Path) -> None:
    clear = page.locator("#upload").get_by_label("Clear")
    if clear.count():  # an earlier upload is shown in place of the file picker
        clear.first.click()
    page.locator("#upload input[type=file]").set_input_files(str(path))
    page.wait_for_function(UPLOADED, arg=path.name)
    page.locator("#run").click()


def pixels_of(page, selector: str) -> np.ndarray:
    """The shown image's pixels, as the browser decoded them (drawn into a canvas)."""
    data = page.evaluate(
        """(sel) => { const i = document.querySelector(sel); const c = document.createElement('canvas');
        c.width = i.naturalWidth; c.height = i.naturalHeight; const g = c.getContext('2d'); g.drawImage(i, 0, 0);
        return {w: c.width, h: c.height, d: Array.from(g.getImageData(0, 0, c.width, c.height).data)}; }""",
        selector,
    )
    return np.array(data["d"], dtype=np.uint8).reshape(data["h"], data["w"], 4)


def test_upload_a_photo_see_the_result_and_download_every_file(page, served, artifacts):
    upload_and_run(page, PHOTO)
    page.wait_for_function(LOADED, arg="#result img")
    shown = pixels_of(page, "#result img")
    assert shown.shape[:2] == (300, 451)  # the input's size, so its aspect
    assert shown[..., :3].std() > 5 and len(np.unique(shown[..., 0])) > 20  # a colour map, not a blank
    page.wait_for_function("() => document.querySelectorAll('#downloads a[href]').length >= 7")
    page.screenshot(path=str(artifacts / "app-try.png"), full_page=True)
    links = page.eval_on_selector_all("#downloads a[href]", "els => els.map(e => e.href)")
    by_name = {link.rsplit("/", 1)[-1].split("?")[0]: link for link in links}
    assert {"chelsea.png", "chelsea.16bit.png", "chelsea.npy", "chelsea.exr", "chelsea.json", "chelsea.glb",
            "chelsea.ply"} <= set(by_name)  # fmt: skip
    body = {name: page.request.get(link).body() for name, link in by_name.items()}
    png16 = np.asarray(Image.open(io.BytesIO(body["chelsea.16bit.png"])))
    assert png16.shape == (300, 451) and png16.dtype == np.uint16 and png16.max() == 65535
    depth = np.load(io.BytesIO(body["chelsea.npy"]))
    assert depth.shape == (300, 451) and 0 <= depth.min() < depth.max() <= 1
    assert np.asarray(Image.open(io.BytesIO(body["chelsea.png"]))).shape == (300, 451, 3)
    assert json.loads(body["chelsea.json"])["options"]["processing_res"] == RES
    assert body["chelsea.glb"][:4] == b"glTF" and body["chelsea.exr"][:4] == b"\x76\x2f\x31\x01"
    assert body["chelsea.ply"].startswith(b"ply\n")


def test_a_broken_upload_shows_a_message_and_the_next_upload_works(page, tmp_path, artifacts):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    before = page.get_attribute("#result img", "src")
    upload_and_run(page, broken)
    toast = page.locator("[data-testid=toast-text]", has_text="broken.png: not a readable image")
    toast.first.wait_for()  # the message in the page (a toast), not a traceback
    page.wait_for_timeout(500)  # the toast slides in
    page.screenshot(path=str(artifacts / "app-broken-upload.png"))
    small = tmp_path / "small.png"
    Image.fromarray(make_image(90, 60, 7)).save(small)  # portrait: the new result has another aspect
    upload_and_run(page, small)
    page.wait_for_function(
        "([sel, old]) => { const i = document.querySelector(sel); return !!i && i.src !== old && i.complete && "
        "i.naturalWidth === 60 && i.naturalHeight === 90; }",
        arg=["#result img", before],
    )


def test_browse_lists_the_folder_and_marks_the_failed_item(page, artifacts):
    page.get_by_role("tab", name="Browse").click()
    page.wait_for_function("() => (document.querySelector('#items') || {innerText: ''}).innerText.includes('portrait')")
    text = page.inner_text("#items")  # the table reads key, status, kind, seconds, note per row
    assert "broken\nfailed\ndisparity\n" in text and "not a readable image" in text
    assert "portrait\ndone\n" in text and "street\ndone\n" in text
    page.wait_for_function("() => document.querySelectorAll('#gallery img').length >= 2")
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#gallery img')).every(i => i.complete && i.naturalWidth > 0)"
    )
    page.get_by_text('"failed": 1').first.wait_for()  # the run's summary
    page.screenshot(path=str(artifacts / "app-browse.png"), full_page=True)


def test_a_path_escape_is_refused(page, served):
    page.get_by_role("tab", name="Browse").click()
    page.locator("#open-path textarea, #open-path input").first.fill("../secret.txt")
    page.locator("#open").click()
    page.get_by_text("refused, '..' leads outside the browsed folder").first.wait_for()
    url, folder = served
    direct = page.request.get(f"{url}/gradio_api/file={folder.parent / 'secret.txt'}")
    assert direct.status != 200 and b"outside the folder" not in direct.body()


def test_the_api_answers_gradio_client(served, depth_g, tmp_path):
    client_mod = pytest.importorskip("gradio_client")
    url, _ = served
    photo = tmp_path / "api.png"
    Image.fromarray(make_image(48, 80, 5)).save(photo)
    client = client_mod.Client(url + "/", verbose=False)
    image, pair, clip, mesh, files, sidecar = client.predict(
        client_mod.handle_file(str(photo)), "depth", RES, "off", "Spectral", "lotus", 4, False, str(depth_g),
        api_name="/predict",
    )  # fmt: skip
    assert np.asarray(Image.open(image)).shape == (48, 80, 3)
    assert mesh is None and clip is None and sidecar["complete"] is True and sidecar["key"] == "api"
    names = sorted(Path(f).name for f in files)
    assert names == ["api.16bit.png", "api.exr", "api.json", "api.npy", "api.png"]
    summary, table, gallery, item = client.predict("failed", api_name="/browse")
    assert summary["failed"] == 1 and [row[:2] for row in table["data"]] == [["broken", "failed"]]
