"""What a run reports: one ``ItemResult`` per input, whose ``record`` is THE ``--json`` record of every command
(docs/records.md), and the run's ``Summary``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..io.sources import Item

STATUSES = ("done", "skipped", "failed")
RECORD_FIELDS = ("input", "key", "status", "kind", "outputs", "frames", "seconds", "error", "redone", "backend")


@dataclass
class ItemResult:
    """One input's fate. ``outputs``: {name: path} of what it wrote; ``frames``: maps written (1 for an image);
    ``redone``: why existing outputs were not kept under --skip-existing (None: they were, or there were none);
    ``kind``: what its maps hold ("disparity", "depth", "normal", "uncertainty", "pointcloud"; None when the
    input could not be used at all); ``input``: the input as given where that is not ``item.path`` (a URL);
    ``backend``: what ran the model on it ("torch" or "onnxruntime"; None when no model ran: skipped, unusable,
    a given depth map, or a scaled-out worker's choice under --backend auto)."""

    item: Item
    status: str  # one of STATUSES
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    frames: int = 1
    redone: str | None = None
    kind: str | None = None
    input: str | None = None
    backend: str | None = None

    @classmethod
    def unusable(cls, problem: InputError) -> ItemResult:
        """The result of an input that cannot be used at all (missing, not an image): failed, nothing written."""
        return cls(Item(Path(problem.subject or ""), None), "failed", error=str(problem), frames=0)

    def record(self) -> dict:
        """THE --json record: one NDJSON line with exactly ``RECORD_FIELDS``."""
        return {
            "input": self.input or str(self.item.path),
            "key": self.item.key,
            "status": self.status,
            "kind": self.kind,
            "outputs": self.outputs,
            "frames": self.frames if self.status != "skipped" else 0,
            "seconds": round(self.seconds, 4),
            "error": self.error,
            "redone": self.redone,
            "backend": self.backend if self.status != "skipped" else None,
        }


@dataclass
class Summary:
    """Counts of a run. ``redone``: of done and failed, the items whose existing outputs were not kept;
    ``out``: where the outputs went (a folder or URL), for the summary line."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    redone: int = 0
    seconds: float = 0.0
    failures: list[ItemResult] = field(default_factory=list)
    out: str | None = None
    keys: set = field(default_factory=set)  # the output keys reported, whatever their status

    def add(self, r: ItemResult) -> None:
        setattr(self, r.status, getattr(self, r.status) + 1)
        self.keys.add(r.item.key)
        self.redone += r.redone is not None
        if r.status == "failed":
            self.failures.append(r)

    @property
    def exit_code(self) -> int:
        """The command line's status for this run: 1 when any input failed, else 0."""
        return 1 if self.failed else 0
