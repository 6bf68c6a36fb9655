"""`lotus models list|pull|path`: the registry and the local cache."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..errors import LotusError, UsageError
from .application import app
from .report import escape, fail, say, write_stdout

models_app = typer.Typer(help="List, download and locate Lotus checkpoints.", no_args_is_help=True)
app.add_typer(models_app, name="models")


COLUMNS = ("name", "aliases", "hub id", "task", "family", "output", "size", "licence", "cached")


@models_app.command("list")
def models_list():
    """Show the registry on stdout: task, family, output kind, size, licence and whether it is cached. On a
    terminal, a table; piped, tab-separated lines with a header and full names (`lotus models list | grep
    depth`)."""
    from ..model import registry

    rows = [
        (
            e.name,
            ", ".join(e.aliases),
            e.repo_id,
            e.task,
            (e.family or "?").upper(),
            e.kind,
            f"{e.size_gb:.1f} GB" if e.size_gb else "?",
            e.licence,
            "yes" if registry.cached_folder(e.repo_id) else "no",
        )
        for e in registry.REGISTRY
    ]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title="Lotus checkpoints", title_justify="left")
        for col in COLUMNS:
            table.add_column(col, no_wrap=col in ("name", "hub id"))
        for row in rows:
            table.add_row(*(escape(c) for c in row))
        Console(highlight=False).print(table)
    else:
        write_stdout("".join("\t".join(r) + "\n" for r in (COLUMNS, *rows)))
    say("defaults: depth -> depth-d, normal -> normal-d; uncertainty needs a G model (depth-g, normal-g)", "dim")
    say(registry.LICENCE_NOTE, "dim")


@models_app.command("pull")
def models_pull(names: Annotated[list[str], typer.Argument(help="Registry names or hub ids.")]):
    """Download checkpoints into the Hugging Face cache (needs network)."""
    from ..model import registry

    code = 0
    for name in names:
        try:
            ref = registry.fetch(registry.resolve(name))
            say(f"{ref.label}: {ref.folder}", "green")
        except LotusError as e:
            say(f"error: {e}", "red")
            code = max(code, e.exit_code)
    raise typer.Exit(code)


@models_app.command("path")
def models_path(name: Annotated[str, typer.Argument(help="Registry name or hub id.")]):
    """Print the local folder of a cached checkpoint (stdout), for scripts and `--model PATH`."""
    from ..model import registry

    try:
        ref = registry.resolve(name)
    except LotusError as e:
        fail(e)
    folder = ref.folder or registry.cached_folder(ref.repo_id)
    if folder is None:
        fail(UsageError(f"model {ref.label} is not in the local cache", f"run `lotus models pull {name}`"))
    write_stdout(f"{folder}\n")
