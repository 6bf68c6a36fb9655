"""How a run tells its caller what happens: events, never prints.

The pipelines (``run.predict``, ``run.pointcloud``, ``scale.dispatch``) report through a ``Reporter``. This
base ignores every event, so a library caller passes nothing and gets the ``Summary`` back; the command
line's reporter (``cli/report.py``) prints the lines, draws the progress bars and writes the ``--json``
records; tests record the events.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only: the command line imports this module before numpy
    from .results import ItemResult


class Progress:
    """A progress bar's handle; this one draws nothing."""

    def advance(self, n: int = 1) -> None:
        pass

    def update(self, completed: int, total: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class Reporter:
    """The events of a run (every method here does nothing)."""

    def result(self, r: ItemResult) -> None:
        """An input is finished: done, skipped or failed (``r.redone`` says why its old outputs were redone)."""

    def warning(self, text: str) -> None:
        """Something the user should know that does not fail an input."""

    def note(self, text: str) -> None:
        """What was loaded or decided (the model and where it runs, what --compile did)."""

    def busy(self, text: str) -> AbstractContextManager:
        """A wait with nothing to count (loading a model, listing inputs)."""
        return nullcontext()

    def progress(self, label: str, total: int | None) -> Progress:
        """Progress over ``total`` steps (None: not known in advance)."""
        return Progress()
