"""`lotus app` as one library call: check everything, load the predictor once, serve the page.

Everything that can be wrong is said before the model loads: Gradio missing (the ``app`` extra), a bad
``--auth``, a browse folder that is not there, limits below zero. Binding beyond this machine without
``--auth`` is allowed, with a warning: the page would run the model for anyone who reaches the port.
"""

from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..run.events import Reporter
from .browse import Folder
from .security import exposure_warning, parse_auth
from .service import AppOptions, Service

INSTALL_HINT = "pip install 'lotus-cli[app]' (or make install)"


@dataclass(frozen=True)
class ServeOptions:
    """Where and how the page is served: ``browse`` (an output folder for the Browse tab), ``host`` /
    ``port``, ``auth`` ("user:pass"), ``queue_size`` (requests waiting for the model, beyond which a request
    is told the queue is full)."""

    browse: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    auth: str | None = None
    queue_size: int = 8


def check(options: AppOptions, serve: ServeOptions) -> tuple[tuple[str, str] | None, Folder | None]:
    """(the parsed --auth, the browsed Folder) once every option is checked; UsageError otherwise."""
    if importlib.util.find_spec("gradio") is None:
        raise UsageError("lotus app needs Gradio, which is not installed", INSTALL_HINT)
    if not 0 <= serve.port <= 65535:
        raise UsageError(f"--port must be 0..65535, not {serve.port}", "e.g. --port 7860 (0: any free port)")
    if serve.queue_size < 1:
        raise UsageError(f"--queue-size must be >= 1, not {serve.queue_size}")
    auth = parse_auth(serve.auth)
    folder = Folder(serve.browse) if serve.browse is not None else None
    return auth, folder


def serve(options: AppOptions, serve: ServeOptions, reporter: Reporter = Reporter(), block: bool = True):
    """Serve the app until interrupted (``block``), or return (page, url) with it running in a thread."""
    auth, folder = check(options, serve)
    warning = exposure_warning(serve.host, auth)
    if warning:
        reporter.warning(warning)
    service = Service(options, reporter)
    from .ui import launch  # Gradio is imported here, once everything is checked and the model is loaded

    if folder is not None:
        folder.scan()
        reporter.note(f"browsing {folder.root}: {len(folder.entries)} items")
    try:
        demo, url = launch(
            service, folder, limits=options.limits, host=serve.host, port=serve.port or free_port(serve.host),
            auth=auth, queue_size=serve.queue_size, block=False,
        )  # fmt: skip
    except OSError as e:
        service.close()
        raise UsageError(f"cannot serve on {serve.host}:{serve.port} ({e})", "choose another --port") from e
    reporter.note(f"lotus app on {url} (Ctrl-C stops it)")
    if not block:
        return demo, url
    try:
        demo.block_thread()
    finally:
        demo.close()
        service.close()
    return demo, url


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` now (--port 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
