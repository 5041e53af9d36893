"""The coordinator's configuration: one dataclass, validated on construction."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.next_version import AggregationConfig, Shapes
from coordinator.strategies import FedAvg, FedBuff
from edge_sdk.method import DEFAULT_CODECS, MethodSpec
from edge_sdk.models.naming import LORA_TARGETS
from edge_sdk.validators import is_int
from edge_sdk.wire import parse_codec
from edge_sdk.wire.limits import INT_MAX

# An mDNS instance label: kept to safe characters so it also works as a file or log token.
_MDNS_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")

_MIB = 1 << 20

MIN_JOIN_TOKEN_CHARS = 8
"""Shortest accepted join token (the generated ones have 43 characters)."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything a coordinator needs; the CLI builds one from its flags."""

    model_sha256: str
    """sha256 of the base model's GGUF; updates for another model are refused."""
    shapes: Shapes
    """(out, in) of every LoRA target layer (`coordinator.shapes.shapes_from_gguf`)."""
    db_path: Path
    """SQLite database file (created on first start, resumed afterwards)."""
    model_name: str = ""
    """The base model's name (e.g. `smollm2-135m`), shown to devices in the mDNS advert so a
    mismatch can name models, not only hashes (display only, never trusted)."""
    targets: tuple[str, ...] = LORA_TARGETS
    """LoRA target projections (must match the keys of `shapes`)."""
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    strategy: FedAvg | FedBuff = field(default_factory=FedBuff)
    codec: str | None = None
    """Codec the task asks clients to use (any valid codec is accepted on ingest); None: the
    method's (`edge_sdk.method.DEFAULT_CODECS`: int4 deltas for sft, int8 for dpo, as measured
    by the demos). `task_codec` is the one in force."""
    global_codec: str = "fp32"
    """Value format of the served global adapter (fp32 keeps deltas exact)."""
    local_steps: int = 20
    """Task: local optimizer steps per round on a device."""
    batch_size: int = 4
    """Task: local batch size."""
    seq_len: int = 256
    """Task: training sequence length in tokens."""
    lr: float = 2e-4
    """Task: local learning rate."""
    method: MethodSpec = field(default_factory=MethodSpec)
    """Task: the post-training method devices run locally (sft on examples, or dpo on
    preference pairs with its beta and loss); stated in `TaskConfig.extra["method"]`.
    Updates of either method are validated and aggregated the same way."""
    max_rounds: int | None = None
    """Stop accepting updates once this many global versions were published; None = never."""
    join_token: str = ""
    """Shared enrollment secret, at least 8 characters (the CLI generates one when not given).
    Devices get it inside the join code, bound to the certificate's fingerprint."""
    host: str = "127.0.0.1"
    port: int = 8750
    """TCP port; 0 picks a free one."""
    tls: bool = True
    """Serve HTTPS with a self-signed certificate kept next to the database
    (`<db>.tls/cert.pem`). False serves plain HTTP, where anyone on the LAN can read the join
    token and the bearer tokens (the CLI asks for `--insecure`; a warning is logged at start)."""
    mdns: bool = True
    """Advertise on mDNS."""
    mdns_interfaces: tuple[str, ...] | None = None
    """IPv4 addresses to advertise on; None = loopback for a loopback bind, else every interface."""
    mdns_name: str | None = None
    """mDNS instance name (clients can pick it with `--coordinator-name`); None = a fresh
    `fedlm-<task>-<random>` each start."""
    max_body_bytes: int = 64 * _MIB
    """Largest accepted request body (also the wire decoder's `max_bytes`)."""
    rate_per_s: float = 5.0
    """Per-client sustained request rate (token bucket)."""
    rate_burst: int = 20
    """Per-client burst size."""
    tick_s: float = 1.0
    """How often deadlines are checked."""
    ingest_workers: int = 2
    """Threads that decode and validate updates (numpy releases the GIL)."""
    header_timeout_s: float = 10.0
    """A new connection must deliver a complete request head within this many seconds (and a
    TLS handshake must finish within it). A real client sends its head in one packet, in
    milliseconds even on poor WiFi; 10 s tolerates a stalled link, not a slowloris."""
    body_timeout_s: float = 60.0
    """A started request's body must arrive in full, and a response the peer stopped reading
    must resume, within this many seconds. 60 s carries a 64 MiB body at >= 1.1 MB/s and a
    typical 1-5 MB update at WiFi speed with a wide margin."""
    keepalive_timeout_s: float = 30.0
    """An idle keep-alive connection is closed after this many seconds without a complete
    request head (aiohttp's own default is 3630 s). Longer than aiohttp clients' 15 s idle
    time, so the client, not the server, closes a pooled connection first."""
    max_connections_per_address: int = 32
    """Open connections one peer address may hold; the next one is answered 429 and closed. A
    device's client uses one or two; the network demo runs ~10 processes on 127.0.0.1."""
    max_connections: int = 512
    """Open connections in all; the next one is answered 503 and closed (a process's default
    limit of open files is often 1024, which the database and mDNS share)."""
    max_inflight_body_bytes: int = 256 * _MIB
    """Update bytes being received or checked at once, over all clients (a body without a
    Content-Length reserves `max_body_bytes`); beyond it an update is answered 503 with
    Retry-After. Each client may also have only one update in flight (a second one is 429),
    so an enrolled device cannot hold 32 connections x 64 MiB of bodies in memory."""
    operator_token: str = ""
    """Bearer token of the operator's read-only view of `/v1/status` (every client's updates);
    empty = no operator view over HTTP. Kept in memory only; the CLI generates one when not
    given and prints it once."""
    secure: bool = False
    """Secure aggregation (`coordinator.secure`, docs/secure-aggregation.md): devices send
    masked vectors over /v1/secagg/*, the coordinator learns only each round's sum, and POST
    /v1/updates is refused. Needs mode `frozen-a` (exact under sums), strategy `fedavg`, no
    central DP and robust `mean` (trimmed statistics need individual updates)."""
    min_cohort: int = 3
    """Secure aggregation: the smallest cohort a round closes with (raised, where needed, to
    the protocol's own floor: 3, threshold + 1 and FedAvg's `min_clients`; the task states
    the result)."""
    secure_clip: float = 0.01
    """Secure aggregation: per-coordinate bound C on a device's B delta (devices clip to
    [-C, C]; the coordinator cannot clip what it cannot see)."""
    secure_grid_bits: int = 0
    """Secure aggregation: bits g of the integer grid over [-C, C]; the ring is
    g + ceil(log2 cohort) bits. 0 (default) picks the widest grid whose ring fits 7 bits
    (`edge_sdk.secagg.params.grid_bits_for`: 5, 4, 3, 1 bits at cohorts 3, 8, 16, 64), which
    keeps a masked update >= 4x below fp32; more bits buy accuracy at the cost of bytes."""
    secure_phase_s: float = 30.0
    """Secure aggregation: each protocol phase closes this many seconds after it opened (or
    as soon as every device asked has answered); a device that has not answered is a
    drop-out."""

    @property
    def task_codec(self) -> str:
        """The codec the task asks for: `codec`, or the method's default."""
        return self.codec if self.codec is not None else DEFAULT_CODECS[self.method.name]

    def __post_init__(self) -> None:
        if len(self.model_sha256) != 64 or any(
            c not in "0123456789abcdef" for c in self.model_sha256
        ):
            raise ValueError(
                f"`model_sha256` should be 64 lowercase hex digits, got {self.model_sha256!r}"
            )
        if not self.shapes:
            raise ValueError("`shapes` should name at least one target layer")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"`targets` should be some of {', '.join(LORA_TARGETS)}, got {self.targets!r}"
            )
        for module, dims in self.shapes.items():
            if module.rsplit(".", 1)[-1] not in self.targets:
                raise ValueError(f"`shapes` has {module!r}, which is not in targets {self.targets}")
            if len(dims) != 2 or min(dims) <= 0:
                raise ValueError(f"`shapes[{module!r}]` should be (out, in) > 0, got {dims!r}")
        parse_codec(self.task_codec)
        global_spec = parse_codec(self.global_codec)
        if global_spec.delta or global_spec.topk is not None:
            raise ValueError(
                f"`global_codec` should be a dense value format, got {self.global_codec!r}"
            )
        for name in ("local_steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` should be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"`lr` should be > 0, got {self.lr}")
        if not isinstance(self.method, MethodSpec):
            raise ValueError(  # noqa: TRY004 (style: a bad config field is a ValueError)
                f"`method` should be a MethodSpec, got {type(self.method).__name__}"
            )
        if self.max_rounds is not None and self.max_rounds < 1:
            raise ValueError(f"`max_rounds` should be >= 1 or None, got {self.max_rounds}")
        if len(self.join_token) < MIN_JOIN_TOKEN_CHARS:
            raise ValueError(
                f"`join_token` should have at least {MIN_JOIN_TOKEN_CHARS} characters, "
                f"got {len(self.join_token)}"
            )
        if self.mdns_name is not None and not _MDNS_NAME.fullmatch(self.mdns_name):
            raise ValueError(
                f"`mdns_name` should be 1-63 letters, digits, '-' or '_', got {self.mdns_name!r}"
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"`port` should be in 0..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"`max_body_bytes` should be >= 1024, got {self.max_body_bytes}")
        if not self.rate_per_s > 0:
            raise ValueError(f"`rate_per_s` should be > 0, got {self.rate_per_s}")
        if self.rate_burst < 1:
            raise ValueError(f"`rate_burst` should be >= 1, got {self.rate_burst}")
        if not self.tick_s > 0:
            raise ValueError(f"`tick_s` should be > 0, got {self.tick_s}")
        if self.ingest_workers < 1:
            raise ValueError(f"`ingest_workers` should be >= 1, got {self.ingest_workers}")
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"`{name}` should be a finite number > 0, got {value}")
        for name in ("max_connections_per_address", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` should be >= 1, got {getattr(self, name)}")
        # Task integers travel in TaskConfig, whose every integer fits int64: refuse them here,
        # at start, rather than as a 500 on every GET /v1/task.
        for name in ("local_steps", "batch_size", "seq_len", "max_rounds"):
            value = getattr(self, name)
            if value is not None and value > INT_MAX:
                raise ValueError(f"`{name}` should be at most 2^63-1, got {value}")
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"`max_inflight_body_bytes` should be >= max_body_bytes ({self.max_body_bytes}), "
                f"got {self.max_inflight_body_bytes}"
            )
        if self.secure:
            self._check_secure()
        if self.operator_token and len(self.operator_token) < 16:
            raise ValueError(
                "`operator_token` (--operator-token, $FEDLM_OPERATOR_TOKEN) should have at "
                f"least 16 characters, got {len(self.operator_token)}"
            )

    def _check_secure(self) -> None:
        """Refuse settings that secure aggregation cannot honour, naming the flag to change."""
        agg = self.aggregation
        if agg.mode != "frozen-a":
            raise ValueError(
                f"`aggregation.mode` should be 'frozen-a' with secure aggregation (sums of B are "
                f"exact only when A is shared), got {agg.mode!r}; use --lora-mode frozen-a"
            )
        if not isinstance(self.strategy, (FedAvg, FedBuff)):
            raise ValueError(  # noqa: TRY004 (style: a bad config field is a ValueError)
                f"`strategy` should be fedavg or fedbuff with secure aggregation, got "
                f"{self.strategy.name!r}"
            )
        if agg.robust != "mean":
            raise ValueError(
                f"`aggregation.robust` should be 'mean' with secure aggregation (robust "
                f"statistics need individual updates), got {agg.robust!r}"
            )
        if not is_int(self.min_cohort):
            raise ValueError(f"`min_cohort` should be an integer, got {self.min_cohort!r}")
        if self.min_cohort < 3:
            raise ValueError(f"`min_cohort` should be >= 3, got {self.min_cohort}")
        from coordinator.secure import cohort_flag_of, cohort_size_of, min_cohort_of, secagg_params

        cohort, flag = cohort_size_of(self), cohort_flag_of(self)
        if self.min_cohort > cohort:
            raise ValueError(
                f"secure aggregation: `min_cohort` {self.min_cohort} exceeds the cohort size "
                f"({flag} = {cohort}); raise {flag}"
            )
        if not (self.secure_phase_s > 0 and math.isfinite(self.secure_phase_s)):
            raise ValueError(
                f"`secure_phase_s` should be a finite number > 0, got {self.secure_phase_s}"
            )
        try:  # the protocol's own checks: cohort size, grid bits vs ring width, clip
            params = secagg_params(self, 1, 1)
        except ValueError as exc:
            raise ValueError(f"secure aggregation: {exc}") from None
        floor = min_cohort_of(self, params)
        if floor > cohort:
            raise ValueError(
                f"a cohort of {cohort} ({flag}) is below the protocol's minimum {floor} "
                f"(threshold {params.threshold} + 1); raise {flag}"
            )
