"""The `lotus` Typer application and its top-level options; every command module registers on ``app``."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperGroup

from .. import __version__


class _Group(TyperGroup):
    """The top-level group, whose own -h/--help is shown as the plain flag it is (no <bool>)."""

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt


app = typer.Typer(
    cls=_Group,
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
