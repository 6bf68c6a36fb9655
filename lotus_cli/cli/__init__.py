"""The `lotus` command: the only place that reads options, prints or exits.

Heavy modules (torch, diffusers, numpy) are imported inside the commands so that `lotus --help`
answers at once. Messages and progress go to stderr; stdout is kept for data (`models path`).
Exit codes: 0 all good, 1 some inputs failed, 2 usage error (bad option, unknown model, unwritable
--out), 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .. import __version__
from ..errors import LotusError

app = typer.Typer(
    name="lotus",
    help="Depth, surface normals, uncertainty and point clouds from images and videos with Lotus (one-step "
         "diffusion, arXiv 2409.18124), and the paper's training and evaluation protocols.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
_console = None


def console():
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True, highlight=False, soft_wrap=True)
    return _console


def say(message: str, style: str = "") -> None:
    from rich.markup import escape

    console().print(f"[{style}]{escape(message)}[/]" if style else escape(message))


def fail(err: LotusError) -> None:
    say(f"error: {err}", "red")
    raise typer.Exit(err.exit_code)


def _version(value: bool):
    if value:
        print(f"lotus-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False):
    pass


def escape(text) -> str:
    from rich.markup import escape as _escape

    return _escape(str(text))


def load_predictor(model, task: str | None, device: str, dtype: str):
    """Resolve (name, hub id, folder or a resolved ModelRef), fetch with progress bars, load with a spinner,
    say what was loaded; a LotusError becomes the usual one-line error and exit code."""
    from .. import models
    from ..predictor import LotusPredictor

    try:
        ref = model if isinstance(model, models.ModelRef) else models.resolve(model, task)
        ref = models.fetch(ref)  # a first download shows its own progress bars
        with console().status(f"loading {ref.label} ...", spinner="dots"):
            predictor = LotusPredictor.from_pretrained(ref, device=device, dtype=dtype)
    except LotusError as e:
        fail(e)
    for w in predictor.warnings:
        say(f"warning: {w}", "yellow")
    say(f"model {predictor.source} ({predictor.task}, {predictor.kind}, Lotus-{predictor.family.upper()}) "
        f"on {predictor.device} in {str(predictor.dtype).replace('torch.', '')}", "dim")
    return predictor


# Commands live in submodules (imported for registration; each keeps heavy imports inside functions).
from . import models as _models  # noqa: E402,F401
from . import pointcloud as _pointcloud  # noqa: E402,F401
from . import predict as _predict  # noqa: E402,F401
from . import train as _train  # noqa: E402,F401
from . import evaluate as _evaluate  # noqa: E402,F401
from . import doctor as _doctor  # noqa: E402,F401


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - interactive
        sys.stderr.write("interrupted\n")
        sys.exit(130)
