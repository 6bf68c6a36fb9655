"""The `lotus` command: a thin door over the library. Each command module parses its options, builds the
library's arguments, calls one library function and reports through ``report.py``, the only place that
prints or exits (exit codes there).

Heavy modules (torch, diffusers, numpy) are imported inside the commands so that `lotus --help` answers at
once.
"""

from __future__ import annotations

import sys

import typer

# Commands live in submodules, imported for registration (each keeps heavy imports inside functions).
from . import colmap, doctor, evaluate, export, models, pointcloud, predict, train, web  # noqa: F401
from .application import app
from .report import stdout_closed


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - interactive
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except BrokenPipeError:  # pragma: no cover - a write outside write_stdout
        try:
            stdout_closed()
        except typer.Exit as e:
            sys.exit(e.exit_code)
