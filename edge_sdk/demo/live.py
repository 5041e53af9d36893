"""The demo's live view: one table that `run_demo`'s progress events keep current.

`DemoView` is the `progress` callback and, through `__rich__`, what `rich.live.Live` draws:
the running phase and its clock, the global version against the rounds, and per client the
local-only score, updates sent, latest training loss and bytes sent. It holds no references
to the run, so a test can feed it events and read the table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.table import Table

PHASES = ("data", "load", "local_only", "centralized", "federated", "evaluate_export")
"""`run_demo`'s phases in order; each ends with a "phase" event."""

Progress = Callable[[str, dict[str, Any]], None]
"""`(event, fields)`, in run order: "phase" {name, seconds} after each of `PHASES`; "score"
{arm, eval_loss, exact_match} for base and centralized; "local" {client, exact_match};
"federation" {version, rounds, updates, latest_loss, bytes_sent} (lists, one item per client)
as client updates are sent; "version" {version, eval_loss, exact_match}."""

_PHASE_TITLES = {
    "data": "preparing data",
    "load": "loading the model",
    "local_only": "training local-only baselines",
    "centralized": "training the centralized reference",
    "federated": "federating",
    "evaluate_export": "evaluating and exporting",
}


@dataclass
class _ClientRow:
    local_exact_match: float | None = None
    updates: int = 0
    loss: float | None = None
    bytes_sent: int = 0


class DemoView:
    """Progress callback (`view(event, fields)`) and rich renderable of a demo run."""

    def __init__(
        self, clients: int, rounds: int, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.rounds = rounds
        self.rows = [_ClientRow() for _ in range(clients)]
        self.done: list[str] = []
        self.version = 0
        self.scores: dict[str, tuple[float, float]] = {}
        """Arm -> (eval loss, exact match): base, centralized, federated (latest version)."""
        self._clock = clock
        self._start = clock()

    @property
    def phase(self) -> str:
        """The running phase, or "done"."""
        return next((p for p in PHASES if p not in self.done), "done")

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if event == "phase":
            self.done.append(str(fields["name"]))
        elif event == "score":
            self.scores[str(fields["arm"])] = (
                float(fields["eval_loss"]),
                float(fields["exact_match"]),
            )
        elif event == "local":
            self._row(int(fields["client"])).local_exact_match = float(fields["exact_match"])
        elif event == "version":
            self.version = max(self.version, int(fields["version"]))
            self.scores["federated"] = (float(fields["eval_loss"]), float(fields["exact_match"]))
        elif event == "federation":
            for c, (updates, loss, sent) in enumerate(
                zip(fields["updates"], fields["latest_loss"], fields["bytes_sent"], strict=True)
            ):
                row = self._row(c)
                row.updates, row.loss, row.bytes_sent = int(updates), loss, int(sent)

    def _row(self, client: int) -> _ClientRow:
        while len(self.rows) <= client:  # --data DIR decides the client count after start
            self.rows.append(_ClientRow())
        return self.rows[client]

    def __rich__(self) -> Table:
        elapsed = self._clock() - self._start
        phase = self.phase
        title = (
            f"fedlm demo · {_PHASE_TITLES.get(phase, phase)} · {elapsed:.0f} s · "
            f"global version {self.version}/{self.rounds}"
        )
        table = Table(
            title=title,
            title_justify="left",
            expand=False,
            caption="a client's exact match is its local-only baseline's",
            caption_justify="left",
        )
        table.add_column("client / arm")
        table.add_column("exact match", justify="right")
        table.add_column("updates sent", justify="right")
        table.add_column("latest train loss", justify="right")
        table.add_column("KiB sent", justify="right")
        for c, row in enumerate(self.rows):
            table.add_row(
                str(c),
                "-" if row.local_exact_match is None else f"{row.local_exact_match:.1%}",
                f"{row.updates}/{self.rounds}",
                "-" if row.loss is None else f"{row.loss:.3f}",
                f"{row.bytes_sent / 1024:,.0f}",
            )
        if self.scores:
            table.add_section()
            for arm in ("base", "centralized", "federated"):
                if arm in self.scores:
                    loss, em = self.scores[arm]
                    table.add_row(arm, f"{em:.1%}", "", f"eval loss {loss:.3f}", "")
        return table


__all__ = ["PHASES", "DemoView", "Progress"]
