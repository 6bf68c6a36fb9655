"""`lotus app`: parse, check, serve the web app over one shared predictor (the work is ``app.serve``).

Named web.py, not app.py: ``lotus_cli.cli.app`` is the Typer application, which a submodule of that name
would shadow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from ..errors import LotusError
from .application import app
from .options import Device, Dtype, MaxPixels, ProcRes, option
from .report import Report, fail

Models = Annotated[
    list[str] | None,
    option(
        "--model",
        "-m",
        help="A model the page offers (registry name, hub id or folder); repeat for more. The first loads at the "
        "start, another in its place when a request picks it. Default: depth-d and normal-d.",
        show_default=False,
        metavar="MODEL",
    ),
]
Browse = Annotated[
    Path | None,
    option(
        "--browse",
        help="An output folder of a finished run to look through in the Browse tab (read-only; nothing outside "
        "it is served).",
        show_default=False,
    ),
]
Host = Annotated[
    str,
    option("--host", help="Address to bind; anything but 127.0.0.1 / localhost is reachable from other machines."),
]
Port = Annotated[int, option("--port", help="Port to serve on (0: any free port).")]
Auth = Annotated[
    str | None,
    option("--auth", help="user:pass that the page asks for (without it, no login).", show_default=False),
]
MaxUploadMb = Annotated[float, option("--max-upload-mb", help="Refuse uploads above this many MB (0 = no limit).")]
QueueSize = Annotated[
    int,
    option("--queue-size", help="Requests that may wait for the model; beyond, a request is told the queue is full."),
]


@app.command(name="app")
def app_command(
    model: Models = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    processing_res: ProcRes = 768,
    browse: Browse = None,
    host: Host = "127.0.0.1",
    port: Port = 7860,
    auth: Auth = None,
    max_pixels: MaxPixels = 100_000_000,
    max_upload_mb: MaxUploadMb = 50.0,
    queue_size: QueueSize = 8,
):
    r"""A local web app (Gradio) over one predictor loaded once: Try, Browse and API tabs.

    Try: upload an image or a video and see, then download, the maps `lotus depth` would write, with a 3-D
    mesh of a depth map. Browse (--browse OUT): a finished output folder, with its sidecars' facts, failed
    items and the run's summary. API: the same functions from a script (docs/app.md). One prediction runs
    at a time, others wait in a bounded queue. Needs the app extra: pip install
    'lotus-cli\[app]'."""
    from ..app.security import Limits
    from ..app.serve import ServeOptions, serve
    from ..app.service import AppOptions

    report = Report()
    try:
        options = AppOptions(tuple(model or ()), device, dtype, processing_res, Limits(max_pixels, max_upload_mb))
        serve(options, ServeOptions(browse, host, port, auth, queue_size), report)
    except LotusError as e:
        fail(e)
