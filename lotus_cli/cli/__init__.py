"""The `lotus` command: a thin door over the library. Each command module parses its options, builds the
library's arguments, calls one library function and reports through ``report.py``, the only place that
prints or exits (exit codes there).

Heavy modules (torch, diffusers, numpy) are imported inside the commands so that `lotus --help` answers at
once.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .. import __version__
from .report import stdout_closed

app = typer.Typer(
    name="lotus",
    help="Depth, surface normals, uncertainty and point clouds from images and videos with Lotus (one-step "
    "diffusion, arXiv 2409.18124), and the paper's training and evaluation protocols.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        print(f"lotus-cli {__version__}")
        raise typer.Exit()


def _plain_help_flags(ctx: typer.Context, command) -> None:
    """Show every command's -h/--help as the plain flag it is (no <bool>, as options.flag does for ours)."""
    for sub in getattr(command, "commands", {}).values():
        opt = sub.get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        _plain_help_flags(ctx, sub)


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit."),
    ] = False,
):
    _plain_help_flags(ctx, ctx.command)  # the group's callback runs before a subcommand parses its --help


# Commands live in submodules, imported for registration (each keeps heavy imports inside functions).
from . import doctor, evaluate, models, pointcloud, predict, train  # noqa: E402,F401


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
