"""What a run reports: one ``ItemResult`` per input (its ``record`` is THE ``--json`` record) and the ``Summary``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..io.sources import Item


@dataclass
class ItemResult:
    item: Item
    status: str  # "done" | "skipped" | "failed"
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    frames: int = 1
    redone: str | None = None  # why existing outputs were made again under skip_existing (None: they were not)

    def record(self, kind: str | None = None) -> dict:
        """A JSON-able summary (one NDJSON line in --json mode)."""
        return {
            "input": str(self.item.path),
            "key": self.item.key,
            "status": self.status,
            "kind": kind,
            "outputs": self.outputs,
            "frames": self.frames if self.status != "skipped" else 0,
            "seconds": round(self.seconds, 4),
            "error": self.error,
            "redone": self.redone,
        }


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    redone: int = 0  # of done and failed: items whose existing outputs were not kept (ItemResult.redone)
    seconds: float = 0.0
    failures: list[ItemResult] = field(default_factory=list)

    def add(self, r: ItemResult) -> None:
        setattr(self, r.status, getattr(self, r.status) + 1)
        self.redone += r.redone is not None
        if r.status == "failed":
            self.failures.append(r)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0
