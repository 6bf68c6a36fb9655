"""The page: Try, Browse and API tabs over a ``Service`` and a browsed ``Folder`` (Gradio, imported here only).

Every event runs through Gradio's queue: one at a time (``concurrency_limit=1``: one predictor, and on a CPU
its cores are the model's), at most ``queue_size`` waiting; Gradio tells a request that finds the queue
full. Each event has an ``api_name``, so a script calls the same functions through ``gradio_client`` or the
HTTP API (docs/app.md). A ``LotusError`` (a refused upload, a bad option) becomes ``gr.Error`` with its
one-line message, shown in the page; any other failure the same way, in one line: never a traceback, and
the app keeps serving.

Uploads come in as files (``gr.File``), not images, so nothing decodes them before ``security.check_upload``
has read their size and header. Browse serves only files ``Folder.resolve_inside`` accepts; an input photo
named by a sidecar (outside the folder) is shown decoded into a thumbnail, never served as the file.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr
import numpy as np

from ..errors import LotusError, brief
from ..io.sources import IMAGE_EXTS, VIDEO_EXTS, read_image
from .browse import FILTERS, Folder
from .security import Limits
from .service import Service, TryOptions

CMAPS = ("Spectral", "inferno", "viridis", "magma", "turbo", "gray")
FRAMES = ("lotus", "opencv", "opengl")
GALLERY_MAX = 60  # gallery tiles and table rows per view: a folder of 5,000 items is filtered, not scrolled
THUMB = 512  # long side of an input thumbnail in Browse
SAMPLES = Path(__file__).resolve().parents[2] / "samples"  # the repository's photos, when they are there
# No web fonts: the page must render without the internet (and the tests' browser has none).
THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def page_error(e: BaseException) -> gr.Error:
    """The one line a failed event shows in the page."""
    return gr.Error(str(e) if isinstance(e, LotusError) else f"failed: {brief(e)}", print_exception=False)


def guarded(fn):
    """An event handler whose failures become a message in the page (never a traceback)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            raise page_error(e) from None

    return run


# ----------------------------------------------------------------------------------------------- Try


def try_tab(service: Service) -> None:
    model = service.describe()
    gr.Markdown(
        f"Loaded: **{model['model_name']}** ({model['task']}, {model['kind']}, Lotus-{model['family'].upper()}) on "
        f"{model['device']} in {model['dtype']}; another model loads in its place when a request asks for it. "
        "Upload an image or a video; the maps are the files `lotus depth` / `lotus normal` write for the same "
        "options."
    )
    exts = list(IMAGE_EXTS + VIDEO_EXTS)
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Image or video", file_types=exts, type="filepath", elem_id="upload")
            choices = [(Path(m).name if Path(m).is_dir() else m, m) for m in service.models]
            model_pick = gr.Dropdown(choices, value=service.spec, label="Model", elem_id="model")
            task = gr.Radio(service.tasks, value=service.tasks[0], label="Task", elem_id="task")
            res = gr.Slider(64, 2048, value=service.options.processing_res or 768, step=8,
                            label="Processing resolution (long side, px)")  # fmt: skip
            with gr.Accordion("More options", open=False):
                tile = gr.Dropdown(["off", "auto", "512", "768"], value="off", label="Tiling (--tile)")
                cmap = gr.Dropdown(list(CMAPS), value="Spectral", label="Colour map (depth)")
                frame = gr.Dropdown(list(FRAMES), value="lotus", label="Normal frame (--frame)")
                samples = gr.Slider(2, 16, value=4, step=1, label="Samples (uncertainty)")
                mesh = gr.Checkbox(value=True, label="3-D mesh of a depth map (as lotus pointcloud --mesh)")
            run = gr.Button("Predict", variant="primary", elem_id="run")
            if SAMPLES.is_dir():
                photos = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in IMAGE_EXTS)
                if photos:
                    gr.Examples([[str(p)] for p in photos], inputs=[upload], label="Samples")
        with gr.Column(scale=2):
            with gr.Row():
                result = gr.Image(label="Result", type="filepath", format="png", interactive=False, elem_id="result")
                view3d = gr.Model3D(label="3-D mesh (GLB)", elem_id="mesh")
            slider = gr.ImageSlider(label="Before / after", type="filepath", format="png", interactive=False)
            video = gr.Video(label="Clip", interactive=False, elem_id="clip")
            files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
            facts = gr.JSON(label="Sidecar")

    @guarded
    def predict(path, task, res, tile, cmap, frame, samples, mesh, model=None, progress=gr.Progress()):
        if not path:
            raise LotusError("no file uploaded", "choose an image or a video first")
        tiles = None if tile == "off" else str(tile)
        o = TryOptions(task, int(res), tiles, cmap, frame, int(samples), bool(mesh), model or None)
        progress(0, desc="waiting for the model")
        r = service.predict(Path(path), o, lambda f, text: progress(f, desc=text))
        image = str(r.image) if r.image else None
        pair = (str(path), image) if image else None
        return (image, pair, str(r.video) if r.video else None, str(r.mesh) if r.mesh else None,
                [str(f) for f in r.files], r.record)  # fmt: skip

    def tasks_for(spec):
        offered = service.tasks_of(spec)
        return gr.Radio(choices=offered, value=offered[0])

    model_pick.change(tasks_for, [model_pick], [task], api_name=False, queue=False)
    run.click(
        predict,
        [upload, task, res, tile, cmap, frame, samples, mesh, model_pick],
        [result, slider, video, view3d, files, facts],
        api_name="predict",
        concurrency_limit=1,
        concurrency_id="model",
    )


# -------------------------------------------------------------------------------------------- Browse


def thumbnail(path: Path | None, limits: Limits) -> np.ndarray | None:
    """An input photo decoded and reduced to ``THUMB`` px (its bytes are never served as they are)."""
    if path is None:
        return None
    from PIL import Image

    try:
        rgb = read_image(path, limits.max_pixels)
    except LotusError:
        return None
    img = Image.fromarray(rgb)
    img.thumbnail((THUMB, THUMB))
    return np.asarray(img)


def browse_tab(folder: Folder | None, limits: Limits) -> None:
    if folder is None:
        gr.Markdown("Start the app with `lotus app --browse OUT_DIR` to look through a finished output folder.")
        return
    gr.Markdown(f"Browsing `{folder.root}` (read-only).")
    with gr.Row():
        which = gr.Radio(list(FILTERS), value="all", label="Show", elem_id="filter")
        refresh = gr.Button("Rescan", elem_id="rescan")
    summary = gr.JSON(label="Run summary", elem_id="summary")
    table = gr.Dataframe(headers=["key", "status", "kind", "seconds", "note"], interactive=False, elem_id="items")
    gallery = gr.Gallery(label="Maps", columns=6, height=360, elem_id="gallery", format="png", object_fit="contain")
    item = gr.Dropdown([], label="Item", elem_id="item", allow_custom_value=False)
    with gr.Row():
        shown_input = gr.Image(label="Input", interactive=False)
        shown_map = gr.Image(label="Map", interactive=False, type="filepath", format="png")
        view3d = gr.Model3D(label="Point cloud / mesh")
    facts = gr.JSON(label="Sidecar facts", elem_id="facts")
    item_files = gr.File(label="Files", file_count="multiple", interactive=False)
    with gr.Row():
        path = gr.Textbox(label="Open a file of the folder (path relative to it)", elem_id="open-path")
        open_btn = gr.Button("Open", elem_id="open")
    opened = gr.File(label="Opened", interactive=False, elem_id="opened")

    @guarded
    def listing(which):
        folder.scan()
        entries = folder.filtered(which)[:GALLERY_MAX]
        rows = [[e.key, e.status, e.record.get("kind") or "", e.record.get("seconds") or "",
                 e.error or e.redone or ""] for e in entries]  # fmt: skip
        tiles = [(str(folder.resolve_inside(e.shown)), f"{e.key} · {e.status}") for e in entries if e.shown]
        keys = [e.key for e in entries]
        first = next((e.key for e in entries if e.shown), keys[0] if keys else None)  # one with a picture
        choice = gr.update(choices=keys, value=first)
        return folder.summary(), rows or [["", "", "", "", "no items"]], tiles, choice

    @guarded
    def details(key):
        if not key:
            return None, None, None, {}, []
        e = folder.entry(key)
        shown = e.shown
        picture = str(folder.resolve_inside(shown)) if shown and shown.endswith(".png") else None
        model = e.model_3d
        files = [str(folder.resolve_inside(f)) for f in e.files]
        three_d = str(folder.resolve_inside(model)) if model else None
        return thumbnail(folder.input_path(e), limits), picture, three_d, e.facts(), files

    @guarded
    def open_file(name):
        return str(folder.resolve_inside(name))

    def pick(evt: gr.SelectData, which):
        tiles = [e for e in folder.filtered(which)[:GALLERY_MAX] if e.shown]
        return tiles[evt.index].key if 0 <= evt.index < len(tiles) else None

    outputs = [summary, table, gallery, item]
    which.change(listing, [which], outputs, api_name="browse")
    refresh.click(listing, [which], outputs, api_name=False)
    item.change(details, [item], [shown_input, shown_map, view3d, facts, item_files], api_name="item")
    gallery.select(pick, [which], [item], api_name=False)
    open_btn.click(open_file, [path], [opened], api_name="open")
    return listing, which, outputs


# ----------------------------------------------------------------------------------------------- API


def api_tab(browse: bool) -> None:
    more = (
        '\nclient.predict("all", api_name="/browse")          # summary, table, gallery, items\n'
        'client.predict("a/x.png", api_name="/open")           # a file of the browsed folder\n'
        if browse
        else ""
    )
    gr.Markdown(
        "Every action of this page is an API endpoint (see also *Use via API* at the foot of the page):\n\n"
        "```python\n"
        "from gradio_client import Client, handle_file\n\n"
        'client = Client("http://127.0.0.1:7860/")\n'
        "image, pair, clip, mesh, files, sidecar = client.predict(\n"
        '    handle_file("photo.jpg"), "depth", 768, "off", "Spectral", "lotus", 4, True, api_name="/predict")\n'
        f"{more}```\n\n"
        "Parameters of `/predict`, in order: file, task, processing resolution, tiling (off, auto or a size), "
        "colour map, normal frame, samples (uncertainty), mesh. The files are the ones `lotus depth` writes."
    )


def build(service: Service, folder: Folder | None = None, limits: Limits = Limits()) -> gr.Blocks:
    """The app's page (not yet launched)."""
    with gr.Blocks(title="lotus app", analytics_enabled=False, delete_cache=(900, 900)) as demo:
        gr.Markdown("# lotus app\nDepth and surface normals with Lotus (arXiv 2409.18124), one step of diffusion.")
        with gr.Tabs():
            with gr.Tab("Try", id="try"):
                try_tab(service)
            with gr.Tab("Browse", id="browse"):
                made = browse_tab(folder, limits)
            with gr.Tab("API", id="api"):
                api_tab(folder is not None)
        if made:
            listing, which, outputs = made
            demo.load(listing, [which], outputs, api_name=False)
    return demo


def launch(
    service: Service,
    folder: Folder | None = None,
    *,
    limits: Limits = Limits(),
    host: str = "127.0.0.1",
    port: int | None = 7860,
    auth: tuple[str, str] | None = None,
    queue_size: int = 8,
    block: bool = True,
) -> tuple[gr.Blocks, str]:
    """Build the page and serve it on ``host``:``port`` (None: a free port): (the page, its local URL).
    ``block``: serve until interrupted; False returns at once with the server running in a thread
    (``demo.close()`` stops it)."""
    demo = build(service, folder, limits)
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    allowed = [str(service.root)] + ([str(folder.root)] if folder is not None else [])
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        prevent_thread_lock=True,
        allowed_paths=allowed,
        max_file_size=limits.max_bytes or None,
        show_error=True,
        quiet=True,
        ssr_mode=False,
        mcp_server=False,
        theme=gr.themes.Default(**THEME_FONTS),
    )
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo, url
