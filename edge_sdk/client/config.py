"""`ClientConfig`: everything a device needs to take part in a federation."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from edge_sdk._docfields import document_fields
from edge_sdk.choices import PRECISIONS, Compute, Precision
from edge_sdk.client.controls import LocalDpConfig
from edge_sdk.client.errors import JoinCodeError
from edge_sdk.client.feedback import FeedbackLimits
from edge_sdk.client.joincode import JoinCode, normalize_fingerprint
from edge_sdk.client.task_policy import TaskPolicy
from edge_sdk.client.transport import RetryConfig
from edge_sdk.env import JOIN_CODE_ENV
from edge_sdk.models.licence import LicenceClass
from edge_sdk.validators import require_compute


def _default_name() -> str:
    return (
        "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:64]
        or "device"
    )


@document_fields
@dataclass(frozen=True)
class ClientConfig:
    """Everything a device needs to take part in a federation."""

    model: str
    """Model name (`smollm2-135m`) or path to the local base GGUF."""
    data: tuple[str, ...]
    """Local training data files (JSONL chat / prompt+completion / text, or plain text) for SFT
    tasks; may be empty on a device that learns only from its app's feedback."""
    state_dir: Path
    """Token, codec residual, pending update, checkpoints, adapters and the outbox ledger."""
    coordinator_url: str | None = None
    """Skip discovery and use this base URL (http://host:port or https://...)."""
    coordinator_name: str | None = None
    """With discovery: choose the offer with this mDNS instance name (never matched against the
    advertiser's TXT fields)."""
    join_code: str | None = None
    """The join code `fedlm coordinator` prints (None: `$FEDLM_JOIN_CODE`): the join token
    bound to the coordinator's certificate fingerprint. Needed only until the client is
    enrolled; the fingerprint is then kept in `state_dir` as the pin."""
    tls_fingerprint: str | None = None
    """The coordinator certificate's SHA-256 to pin (hex), for use with a bare `join_token`."""
    join_token: str | None = None
    """Enrollment secret without a join code (None: `$FEDLM_JOIN_TOKEN`). Sent only to a
    coordinator whose certificate matches `tls_fingerprint`, or over plain HTTP with `insecure`."""
    insecure: bool = False
    """Allow a plain-HTTP coordinator (started with `--insecure`): the join and bearer tokens
    then cross the LAN readable by anyone, and any host can pose as the coordinator."""
    name: str = field(default_factory=_default_name)
    """Device name shown to the coordinator's operator."""
    max_rounds: int | None = None
    """Stop after this many accepted updates of this client; None = until the task ends."""
    refuse_licences: frozenset[LicenceClass] = frozenset({LicenceClass.UNKNOWN})
    """Licence classes of the base model this device will not train on."""
    threads: int | None = None
    """Cap on torch's training threads; None = torch's default."""
    memory_limit_mb: int | None = None
    """Cap on the process's address space (RLIMIT_AS); None = no cap. Process-wide."""
    local_dp: LocalDpConfig | None = None
    """Clip + Gaussian noise on the update before it leaves the device; None = off."""
    precision: Precision = "nf4"
    """Frozen base precision for training: nf4 (QLoRA), bf16 or fp32."""
    compute: Compute = "auto"
    """The NF4 base's matrix products in training: fp32, or bf16 (faster on CPUs with bf16
    dot products; the adapter and the optimizer stay fp32), or auto: bf16 where the CPU has
    them, else fp32."""
    checkpoint_every: int = 5
    """Training checkpoint interval in optimizer steps (what a crash can lose at most)."""
    eval_batches: int = 4
    """Validation batches evaluated before and after each round (0: the whole split)."""
    val_fraction: float = 0.1
    """Share of the local examples held out for that validation loss; 0 trains on all of them
    and reports no eval loss (e.g. when the federation is evaluated centrally)."""
    seed: int = 0
    """Seeds the validation split; each round's data order derives from it and the round."""
    skip_bad: bool = False
    """Skip malformed data lines instead of failing."""
    discovery_timeout_s: float = 3.0
    """How long to listen for mDNS adverts."""
    discovery_interfaces: tuple[str, ...] | None = None
    """IPv4 addresses to browse on; None = every interface."""
    poll_interval_s: float = 2.0
    """How often to ask for a new global version while waiting for one."""
    final_wait_s: float = 30.0
    """After the last update: how long to wait for the version it feeds into (to serve it)."""
    retrain_after_s: float | None = None
    """Train again from the same version after waiting this long for a new one (async tasks)."""
    schedule_poll_s: float = 30.0
    """How often to ask the schedule hook again after it said "not now"."""
    swap_wait_s: float = 5.0
    """How long a hot-swap waits for a running generation before trying again later."""
    retry: RetryConfig = field(default_factory=RetryConfig)
    """Tries, backoff and timeouts of every request to the coordinator."""
    task_policy: TaskPolicy = field(default_factory=TaskPolicy)
    """Bounds on what a coordinator may ask (task sizes) and send (global adapters)."""
    preferences: tuple[str, ...] = ()
    """Preference pair files (JSONL with prompt or messages, chosen, rejected) for DPO tasks,
    besides the pairs the app records with `FederatedClient.record_feedback`."""
    feedback_limits: FeedbackLimits = field(default_factory=FeedbackLimits)
    """Bounds on the feedback kept in `state_dir/feedback` (bytes in all, bytes per record)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser())
        if isinstance(self.data, (str, os.PathLike)):
            object.__setattr__(self, "data", (str(self.data),))
        object.__setattr__(self, "data", tuple(str(d) for d in self.data))
        if isinstance(self.preferences, (str, os.PathLike)):
            object.__setattr__(self, "preferences", (str(self.preferences),))
        object.__setattr__(self, "preferences", tuple(str(d) for d in self.preferences))
        if self.coordinator_url is not None and not self.coordinator_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError(
                "`coordinator_url` should start with http:// "
                f"or https://, got {self.coordinator_url!r}"
            )
        code = None
        if self.join_code is not None:
            try:
                code = JoinCode.decode(self.join_code)
            except JoinCodeError as exc:
                raise JoinCodeError(
                    f"`join_code` (--join-code / ${JOIN_CODE_ENV}): {exc}"
                ) from None
        if self.tls_fingerprint is not None:
            pin = normalize_fingerprint(self.tls_fingerprint)
            object.__setattr__(self, "tls_fingerprint", pin)
            if code is not None and code.fingerprint != pin:
                raise ValueError(
                    "`tls_fingerprint` differs from the fingerprint "
                    "in the join code; give only the join code"
                )
        if self.coordinator_url is not None and self.coordinator_url.startswith("http://"):
            if code is not None or self.tls_fingerprint is not None:
                raise ValueError(
                    f"`coordinator_url` {self.coordinator_url!r} "
                    "is plain http://, but a certificate pin was "
                    "given (join code or tls_fingerprint): use https://"
                )
            if not self.insecure:
                raise ValueError(
                    f"`coordinator_url` {self.coordinator_url!r} "
                    "is plain http://: use https:// with the join "
                    "code, or allow plain HTTP with insecure=True (--insecure, on both sides)"
                )
        if not self.name or len(self.name) > 128:
            raise ValueError(f"`name` should be 1-128 characters, got {self.name!r}")
        if self.max_rounds is not None and (
            isinstance(self.max_rounds, bool) or self.max_rounds < 1
        ):
            raise ValueError(
                f"`max_rounds` should be a positive integer or None, got {self.max_rounds!r}"
            )
        object.__setattr__(
            self, "refuse_licences", frozenset(LicenceClass(c) for c in self.refuse_licences)
        )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"`threads` should be >= 1, got {self.threads!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"`precision` should be nf4, bf16 or fp32, got {self.precision!r}")
        require_compute(self.compute, self.precision)
        if self.checkpoint_every < 1:
            raise ValueError(f"`checkpoint_every` should be >= 1, got {self.checkpoint_every!r}")
        if self.eval_batches < 0:
            raise ValueError(f"`eval_batches` should be >= 0, got {self.eval_batches!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"`val_fraction` should be in [0, 1), got {self.val_fraction!r}")
        for name in ("discovery_timeout_s", "poll_interval_s", "schedule_poll_s", "swap_wait_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` should be > 0 seconds, got {getattr(self, name)!r}")
        if self.final_wait_s < 0:
            raise ValueError(f"`final_wait_s` should be >= 0, got {self.final_wait_s!r}")
        if self.retrain_after_s is not None and not self.retrain_after_s > 0:
            raise ValueError(
                f"`retrain_after_s` should be > 0 or None, got {self.retrain_after_s!r}"
            )
