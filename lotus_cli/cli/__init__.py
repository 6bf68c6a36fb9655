"""The `lotus` command: the only place that reads options, prints or exits.

Heavy modules (torch, diffusers, numpy) are imported inside the commands so that `lotus --help`
answers at once. Messages and progress go to stderr, with file names escaped (control characters,
undecodable bytes); stdout is kept for data (`models list`, `models path`, `--json`, `--raw`).
Exit codes: 0 all good, 1 some inputs failed, 2 usage error (bad option, unknown model, unwritable
--out), 130 interrupted, 141 stdout closed by its reader (e.g. `| head`; 128 + SIGPIPE, as the shell
reports a program killed by it).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Annotated, NoReturn

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


# Characters never printed raw: C0/C1 controls (newlines, escape sequences), line/paragraph separators,
# bidirectional overrides, and the lone surrogates Python uses for undecodable bytes in file names.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match) -> str:
    c = m.group()
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte of a file name (surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    return _NAMED.get(c) or (f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")


def printable(text) -> str:
    """``text`` on one line and inert on a terminal: controls, separators, bidi overrides and undecodable
    bytes written as Python-style escapes (a newline in a file name becomes ``\\n``)."""
    return _UNPRINTABLE.sub(_escape_char, str(text))


def say(message: str, style: str = "") -> None:
    from rich.markup import escape

    text = escape(printable(message))
    console().print(f"[{style}]{text}[/]" if style else text)


def fail(err: LotusError) -> NoReturn:
    from .options import cli_error

    say(f"error: {cli_error(err)}", "red")
    raise typer.Exit(err.exit_code)


STDOUT_CLOSED = 141  # 128 + SIGPIPE


def stdout_closed() -> NoReturn:
    """The reader of stdout has gone (`lotus ... --json | head -1`): stop at once, without a traceback or a
    message, with the status a shell reports for a program ended by SIGPIPE. stdout is pointed at
    /dev/null first, so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (e.g. under a test runner)
        pass
    raise typer.Exit(STDOUT_CLOSED)


def write_stdout(text: str) -> None:
    """Data on stdout, flushed at once so pipelines see it; a closed pipe ends the run (``stdout_closed``)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_closed()


def json_safe(value):
    """``value`` with every string valid UTF-8: undecodable bytes of file names (lone surrogates in Python's
    str) become the text ``\\xNN``."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_record(record: dict) -> None:
    """One NDJSON line (``--json``) on stdout, valid UTF-8 whatever the file names, flushed at once."""
    import json

    write_stdout(json.dumps(json_safe(record)) + "\n")


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


def escape(text) -> str:
    """``text`` for rich markup: printable (see ``printable``) and with markup characters escaped."""
    from rich.markup import escape as _escape

    return _escape(printable(text))


def load_predictor(
    model, task: str | None, device: str, dtype: str, kind: str | None = None, processing_res: int = 768
):
    """Resolve (name, hub id, folder or a resolved ModelRef), fetch with progress bars, load with a spinner,
    say what was loaded; a LotusError becomes the usual one-line error and exit code. ``kind`` is the
    stated output kind (--output-kind) of a checkpoint whose metadata says nothing."""
    from ..model import registry
    from ..model.predictor import LotusPredictor

    try:
        ref = model if isinstance(model, registry.ModelRef) else registry.resolve(model, task, kind)
        ref = registry.fetch(ref)  # a first download shows its own progress bars
        registry.check_known(ref, task)
        with console().status(f"loading {ref.label} ...", spinner="dots"):
            predictor = LotusPredictor.from_pretrained(
                ref, device=device, dtype=dtype, processing_res=processing_res
            )  # what cpu/ calibrates for
    except LotusError as e:
        fail(e)
    for w in predictor.warnings:
        say(f"warning: {w}", "yellow")
    say(
        f"model {predictor.source} ({predictor.task}, {predictor.kind} from {predictor.entry.source}, "
        f"Lotus-{predictor.family.upper()}) on {predictor.device} in {str(predictor.dtype).replace('torch.', '')}",
        "dim",
    )
    return predictor


# Commands live in submodules (imported for registration; each keeps heavy imports inside functions).
from . import doctor as _doctor  # noqa: E402,F401
from . import evaluate as _evaluate  # noqa: E402,F401
from . import models as _models  # noqa: E402,F401
from . import pointcloud as _pointcloud  # noqa: E402,F401
from . import predict as _predict  # noqa: E402,F401
from . import train as _train  # noqa: E402,F401


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
