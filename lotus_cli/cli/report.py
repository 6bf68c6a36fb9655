"""What the command line shows: one reporter for every command.

Messages and progress go to stderr, with file names escaped (control characters, undecodable bytes);
stdout is kept for data (``models list``, ``models path``, ``--json`` records, ``--raw`` maps). ``Report``
turns a run's events (``run.events.Reporter``) into lines (``failed:``, ``redone:``, ``warning:``), progress
bars when stderr is a terminal, ``--json`` records, the summary line and the exit code: 0 all good, 1 some
inputs failed, 2 usage error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, as Slurm, Kubernetes and
``timeout`` send), 141 stdout closed by its reader (``| head``: 128 + SIGPIPE, as a shell reports it).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn

import typer

from ..errors import LotusError
from ..run.events import Progress, Reporter

if TYPE_CHECKING:  # for annotations only: results imports numpy, and `lotus --help` must not
    from ..run.results import ItemResult, Summary

STDOUT_CLOSED = 141  # 128 + SIGPIPE
INTERRUPTED, TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM
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


def escape(text) -> str:
    """``text`` for rich markup: printable (see ``printable``) and with markup characters escaped."""
    from rich.markup import escape as markup_escape

    return markup_escape(printable(text))


def say(message: str, style: str = "") -> None:
    text = escape(message)
    console().print(f"[{style}]{text}[/]" if style else text)


def fail(err: LotusError) -> NoReturn:
    """``err`` as one red line (library parameter names turned into their flags), then its exit code."""
    from .options import cli_error

    say(f"error: {cli_error(err)}", "red")
    raise typer.Exit(err.exit_code)


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


def progress_bar(title: str | None = None, detail: bool = False):
    """The one rich progress bar of the command line, on stderr, drawn only on a terminal and removed when
    done: ``title`` (bold) or each task's description, the bar, N/M, the time left, and with ``detail`` a
    task's description after them (e.g. the loss)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(f"[bold]{escape(title)}" if title else "{task.description}"), BarColumn()]
    columns += [MofNCompleteColumn(), TimeRemainingColumn()]
    if detail:
        columns.append(TextColumn("{task.description}"))
    return Progress(*columns, console=console(), disable=not console().is_terminal, transient=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that a terminated run finishes as an interrupted one does."""


@contextmanager
def _sigterm_as_interrupt():
    def handler(signum, frame):
        raise Terminated()

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner's worker): leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _Bar(Progress):
    def __init__(self, bars, task):
        self.bars, self.task = bars, task

    def advance(self, n: int = 1) -> None:
        self.bars.advance(self.task, n)

    def update(self, completed: int, total: int | None = None) -> None:
        self.bars.update(self.task, completed=completed, total=total)

    def close(self) -> None:
        self.bars.remove_task(self.task)


class Report(Reporter):
    """The command line's reporter: one line per failed or redone input, warnings and notes, progress bars,
    a ``--json`` record per finished input on stdout, then the summary line and the exit code (``run``)."""

    def __init__(self, json: bool = False):
        self.json = json
        from ..run.results import Summary

        self.bars = progress_bar()
        self.tally = Summary()

    def print(self, message: str, style: str = "") -> None:
        text = escape(message)
        self.bars.console.print(f"[{style}]{text}[/]" if style else text)

    def result(self, r: ItemResult) -> None:
        self.tally.add(r)
        if r.redone:
            self.print(f"redone: {r.input or r.item.path}: {r.redone}", "yellow")
        if r.status == "failed":
            self.print(f"failed: {r.error}", "red")
        if self.json:
            write_record(r.record())

    def warning(self, text: str) -> None:
        self.print(f"warning: {text}", "yellow")

    def note(self, text: str) -> None:
        self.print(text, "dim")

    def busy(self, text: str):
        return console().status(escape(text), spinner="dots")

    def progress(self, label: str, total: int | None) -> Progress:
        return _Bar(self.bars, self.bars.add_task(escape(label), total=total))

    def run(self, work: Callable[[Reporter], Summary], out=None) -> NoReturn:
        """Run ``work(self)`` and exit: with the summary line ("N done, N skipped, N failed in T s -> OUT")
        and its code; a LotusError as one red line and its code; Ctrl-C or SIGTERM after the records of
        every finished input, a line saying how to resume and the summary so far."""
        t0 = time.perf_counter()
        try:
            with _sigterm_as_interrupt(), self.bars:
                summary = work(self)
        except KeyboardInterrupt as e:
            self.print("interrupted: finished outputs are complete; rerun the same command to resume", "yellow")
            self.summary_line(self.tally, time.perf_counter() - t0, out)
            raise typer.Exit(TERMINATED if isinstance(e, Terminated) else INTERRUPTED) from None
        except LotusError as e:
            fail(e)
        except BrokenPipeError:
            stdout_closed()
        self.summary_line(summary, time.perf_counter() - t0, summary.out or out)
        raise typer.Exit(summary.exit_code)

    def summary_line(self, s: Summary, seconds: float, out) -> None:
        where = f" -> {out}" if out is not None else ""
        say(
            f"{s.done} done, {s.skipped} skipped, {s.failed} failed in {seconds:.1f} s{where}",
            "red" if s.failed else "green",
        )
