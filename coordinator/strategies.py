"""When to aggregate, which updates to admit, and how much each one weighs.

A strategy is a small protocol (after Flower's `Strategy`, without its class tree): it never
touches tensors. The LoRA math lives in `coordinator.lora_math` / `coordinator.next_version`.

- `FedAvg`: synchronous rounds. Round v is open while global version v is current; it accepts
  one update per client trained from version v, and closes when `clients_per_round` updates
  are in, or at the deadline if at least `min_clients` are in (otherwise it waits on: the
  deadline is soft, a round never closes empty). Weights: number of examples.
- `FedBuff`: asynchronous, buffered (Nguyen et al., AISTATS 2022). Any update whose staleness
  s = current version - base version is at most `max_staleness` is buffered, at most one per
  client; the buffer is aggregated when it holds `buffer_size` updates, or `max_wait_s` after
  its first update arrived once it holds `min_updates` (so a federation of fewer devices than
  `buffer_size` still advances). Weights: num_examples · (1 + s)^-exponent.

Both strategies admit at most one update per client per round or buffer, and weigh an update
by at most `max_examples` examples (`capped_examples`): no device outweighs the others by
claiming more examples, nor fills a buffer alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from coordinator.errors import ConflictError, StaleUpdateError, UpdateRejectedError
from coordinator.lora_math import staleness_weight
from coordinator.storage import UpdateRecord
from edge_sdk.choices import StrategyName


class Strategy(Protocol):
    """The contract between the service and a strategy."""

    name: StrategyName

    def admit(self, update: UpdateRecord, version: int, pending: Sequence[UpdateRecord]) -> None:
        """Raise `ConflictError`/`UpdateRejectedError` if `update` may not join the buffer now.

        `pending` holds the buffer's updates and those admitted but not yet stored; one update
        per client per round or buffer is always enforced. The coordinator calls this once per
        update, under its state lock, right before the update takes its place."""

    def due(
        self, pending: Sequence[UpdateRecord], version: int, round_started_at: float, now: float
    ) -> bool:
        """Whether the pending updates should be aggregated now."""

    def waiting(
        self,
        pending: Sequence[UpdateRecord],
        version: int,
        round_started_at: float,
        now: float,
        clients: int,
    ) -> dict[str, Any]:
        """What the next aggregation waits for: `more` updates and/or `deadline_in_s`, and a
        one-line `message` for the operator's log and /v1/status (`clients` enrolled)."""

    def weight(self, update: UpdateRecord, version: int, max_examples: int | None = None) -> float:
        """The update's aggregation weight at `version` (examples capped at `max_examples`);
        0.0 drops it."""

    def keep_versions(self) -> int:
        """How many recent global versions an update may be based on (bodies kept for deltas)."""

    def describe(self) -> dict[str, Any]:
        """JSON-able settings, for /v1/status and the task."""


def _check_base(update: UpdateRecord, version: int) -> None:
    if update.base_version > version:
        raise UpdateRejectedError(
            f"update {update.update_id!r} claims base version {update.base_version}, "
            f"but the newest version is {version}",
            code="unknown_base_version",
        )


def capped_examples(num_examples: int, max_examples: int | None) -> float:
    """num_examples as a weight, at most `max_examples` (None = uncapped)."""
    n = max(0, num_examples)
    return float(n if max_examples is None else min(n, max_examples))


def _updates(count: int) -> str:
    return f"{count} more update" if count == 1 else f"{count} more updates"


def _check_one_per_client(update: UpdateRecord, pending: Sequence[UpdateRecord], what: str) -> None:
    if any(p.client_id == update.client_id for p in pending):
        raise ConflictError(
            f"client {update.client_id!r} already has an update in {what}", code="already_submitted"
        )


@dataclass(frozen=True)
class FedAvg:
    """Synchronous rounds with a minimum number of clients and a (soft) deadline."""

    clients_per_round: int = 2
    """Close the round as soon as this many updates are in."""
    min_clients: int = 1
    """At the deadline, close the round if at least this many updates are in."""
    deadline_s: float = 600.0
    """Seconds after a round opens when it may close with fewer than `clients_per_round`."""
    name: StrategyName = "fedavg"

    def __post_init__(self) -> None:
        if self.clients_per_round < 1:
            raise ValueError(f"`clients_per_round` should be >= 1, got {self.clients_per_round}")
        if not 1 <= self.min_clients <= self.clients_per_round:
            raise ValueError(
                f"`min_clients` should be in [1, clients_per_round={self.clients_per_round}], "
                f"got {self.min_clients}"
            )
        if not self.deadline_s > 0:
            raise ValueError(f"`deadline_s` should be > 0, got {self.deadline_s}")

    def admit(self, update: UpdateRecord, version: int, pending: Sequence[UpdateRecord]) -> None:
        _check_base(update, version)
        if update.base_version != version:
            raise StaleUpdateError(
                f"round {version} is open; update {update.update_id!r} was trained from "
                f"version {update.base_version} (fetch /v1/adapter and train again)"
            )
        _check_one_per_client(update, pending, f"round {version}")

    def due(
        self, pending: Sequence[UpdateRecord], version: int, round_started_at: float, now: float
    ) -> bool:
        current = [p for p in pending if p.base_version == version]
        if len(current) >= self.clients_per_round:
            return True
        return now - round_started_at >= self.deadline_s and len(current) >= self.min_clients

    def waiting(
        self,
        pending: Sequence[UpdateRecord],
        version: int,
        round_started_at: float,
        now: float,
        clients: int,
    ) -> dict[str, Any]:
        current = [p for p in pending if p.base_version == version]
        more = max(0, self.clients_per_round - len(current))
        deadline = round(max(0.0, round_started_at + self.deadline_s - now), 1)
        message = (
            f"round {version + 1} waits for {_updates(more)} "
            f"(clients-per-round {self.clients_per_round}, {clients} clients enrolled)"
        )
        if len(current) >= self.min_clients:
            message += f", or closes at the deadline in {deadline:g} s"
        else:
            message += (
                f"; at the deadline (in {deadline:g} s) it closes once {self.min_clients} are in"
            )
        return {
            "pending": len(current),
            "more": more,
            "min_more": max(0, self.min_clients - len(current)),
            "deadline_in_s": deadline,
            "message": message,
        }

    def weight(self, update: UpdateRecord, version: int, max_examples: int | None = None) -> float:
        if update.base_version != version:
            return 0.0
        return capped_examples(update.num_examples, max_examples)

    def keep_versions(self) -> int:
        return 1

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "clients_per_round": self.clients_per_round,
            "min_clients": self.min_clients,
            "deadline_s": self.deadline_s,
        }


@dataclass(frozen=True)
class FedBuff:
    """Buffered asynchronous aggregation with polynomial staleness weights."""

    buffer_size: int = 4
    """K: aggregate as soon as this many updates are buffered."""
    max_staleness: int = 8
    """Updates based on a version more than this many versions old are refused."""
    staleness_exponent: float = 0.5
    """a in the weight (1 + s)^-a; 0.5 gives 1/√(1+s)."""
    min_updates: int = 2
    """With fewer than `buffer_size` updates, aggregate once this many are in and the first
    has waited `max_wait_s` (capped at `buffer_size`). 2: every version mixes at least two
    devices (one update per client per buffer), and two devices are enough to advance."""
    max_wait_s: float = 30.0
    """Longest wait after a buffer's first update before aggregating a partial buffer: absorbs
    the spread in arrival of similar devices that trained from the same version; a slower one
    lands in the next buffer with staleness 1. A full buffer is aggregated at once."""
    name: StrategyName = "fedbuff"

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ValueError(f"`buffer_size` should be >= 1, got {self.buffer_size}")
        if self.min_updates < 1:
            raise ValueError(f"`min_updates` should be >= 1, got {self.min_updates}")
        # A buffer smaller than min_updates fills first: min_updates never exceeds it.
        object.__setattr__(self, "min_updates", min(self.min_updates, self.buffer_size))
        if not (self.max_wait_s > 0 and math.isfinite(self.max_wait_s)):
            raise ValueError(f"`max_wait_s` should be > 0 seconds, got {self.max_wait_s}")
        if self.max_staleness < 0:
            raise ValueError(f"`max_staleness` should be >= 0, got {self.max_staleness}")
        if self.staleness_exponent < 0:
            raise ValueError(f"`staleness_exponent` should be >= 0, got {self.staleness_exponent}")

    def staleness(self, update: UpdateRecord, version: int) -> int:
        return version - update.base_version

    def admit(self, update: UpdateRecord, version: int, pending: Sequence[UpdateRecord]) -> None:
        _check_base(update, version)
        staleness = self.staleness(update, version)
        if staleness > self.max_staleness:
            raise StaleUpdateError(
                f"update {update.update_id!r} is {staleness} versions old "
                f"(max_staleness={self.max_staleness}); fetch /v1/adapter and train again"
            )
        _check_one_per_client(update, pending, "the current buffer")

    def due(
        self, pending: Sequence[UpdateRecord], version: int, round_started_at: float, now: float
    ) -> bool:
        if len(pending) >= self.buffer_size:
            return True
        if len(pending) < self.min_updates:
            return False
        return now - min(p.received_at for p in pending) >= self.max_wait_s

    def waiting(
        self,
        pending: Sequence[UpdateRecord],
        version: int,
        round_started_at: float,
        now: float,
        clients: int,
    ) -> dict[str, Any]:
        first = min((p.received_at for p in pending), default=None)
        deadline = None if first is None else round(max(0.0, first + self.max_wait_s - now), 1)
        more = max(0, self.buffer_size - len(pending))
        message = (
            f"version {version + 1} waits for {_updates(more)} "
            f"(buffer-size {self.buffer_size}, {clients} clients enrolled)"
        )
        if len(pending) < self.min_updates:
            message += (
                f"; with {self.min_updates} it publishes {self.max_wait_s:g} s after the first"
            )
            if clients < self.min_updates:
                message += (
                    f"; only {clients} enrolled: enroll another device or lower --min-updates"
                )
        elif deadline is not None:
            message += f", or publishes the {len(pending)} it has in {deadline:g} s"
        return {
            "pending": len(pending),
            "more": more,
            "min_more": max(0, self.min_updates - len(pending)),
            "deadline_in_s": deadline,
            "message": message,
        }

    def weight(self, update: UpdateRecord, version: int, max_examples: int | None = None) -> float:
        staleness = self.staleness(update, version)
        if staleness < 0 or staleness > self.max_staleness:
            return 0.0
        examples = capped_examples(update.num_examples, max_examples)
        return examples * staleness_weight(staleness, self.staleness_exponent)

    def keep_versions(self) -> int:
        return self.max_staleness + 1

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "buffer_size": self.buffer_size,
            "min_updates": self.min_updates,
            "max_wait_s": self.max_wait_s,
            "max_staleness": self.max_staleness,
            "staleness_exponent": self.staleness_exponent,
        }
