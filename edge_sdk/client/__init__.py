"""The device side of federation: discovery, the federation loop, and the outbox ledger.

    from edge_sdk.client import ClientConfig, FederatedClient
    from edge_sdk.runtime import EdgeModel

    model = EdgeModel("smollm2-135m")                    # the app's inference
    client = FederatedClient(
        ClientConfig(model="smollm2-135m", data=("notes.jsonl",), state_dir="~/.fedlm/client"),
        runtime=model,                                   # gets every new global adapter
        schedule=lambda: device_is_idle(),               # train only when allowed
    )
    summary = client.run()                               # or: await client.run_async()

Every request that leaves the device is in `<state_dir>/outbox.jsonl` (`Ledger`, `fedlm ledger`).
"""

from __future__ import annotations

from edge_sdk.client.config import ClientConfig
from edge_sdk.client.controls import LocalDpConfig, privatize
from edge_sdk.client.discovery import (
    SERVICE_TYPE,
    DiscoveryReport,
    Offer,
    discover,
    evaluate_offers,
)
from edge_sdk.client.errors import (
    AdapterRefusedError,
    AuthenticationError,
    ClientError,
    DiscoveryError,
    LicenceRefusedError,
    ModelMismatchError,
    ProtocolError,
    RequestRejectedError,
    ResponseTooLargeError,
    StateError,
    TaskRefusedError,
    TlsPinError,
    TransportError,
    VerificationError,
)
from edge_sdk.client.ledger import Ledger, LedgerEntry, format_summary, summarise
from edge_sdk.client.loop import FederatedClient
from edge_sdk.client.reports import RoundReport, RunSummary
from edge_sdk.client.state import ClientState
from edge_sdk.client.task_policy import TaskPolicy
from edge_sdk.client.transport import RetryConfig, Transport
from edge_sdk.env import JOIN_TOKEN_ENV

__all__ = [
    "JOIN_TOKEN_ENV",
    "SERVICE_TYPE",
    "AdapterRefusedError",
    "AuthenticationError",
    "ClientConfig",
    "ClientError",
    "ClientState",
    "DiscoveryError",
    "DiscoveryReport",
    "FederatedClient",
    "Ledger",
    "LedgerEntry",
    "LicenceRefusedError",
    "LocalDpConfig",
    "ModelMismatchError",
    "Offer",
    "ProtocolError",
    "RequestRejectedError",
    "ResponseTooLargeError",
    "RetryConfig",
    "RoundReport",
    "RunSummary",
    "StateError",
    "TaskPolicy",
    "TaskRefusedError",
    "TlsPinError",
    "Transport",
    "TransportError",
    "VerificationError",
    "discover",
    "evaluate_offers",
    "format_summary",
    "privatize",
    "summarise",
]
