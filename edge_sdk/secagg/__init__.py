"""Secure aggregation: the coordinator learns only the sum of the devices' updates.

The protocol of Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS) on the sparse communication graph of SecAgg+ (Bell et al. 2020,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS), with updates
stochastically rounded onto an integer grid and masked in the narrowest ring that holds the
cohort's sum. Shared by devices and the coordinator: numpy, `cryptography` and pycryptodome's
Shamir only. See docs/secure-aggregation.md.

    server = ServerRound(params)
    device = DeviceSession(server.setup(device_id))
    server.receive(device.advertise())           # round 0, every device
    requests = server.close_advertise()          # -> ShareKeysRequest per device
    server.receive(device.share_keys(requests[device_id]))
    requests = server.close_share_keys()         # -> MaskedInputRequest per device
    server.receive(device.masked_input(requests[device_id], update, weight))
    requests = server.close_masked_input()       # -> UnmaskRequest per device
    server.receive(device.unmask(requests[device_id]))
    result = server.close_unmask()               # sums only: result.mean, result.total_weight
"""

from edge_sdk.secagg.device import DeviceSession, DeviceState
from edge_sdk.secagg.errors import (
    ConsistencyError,
    DecryptionError,
    DropoutError,
    MessageError,
    PhaseError,
    ProtocolViolationError,
    ReconstructionError,
    ReplayError,
    SecAggError,
)
from edge_sdk.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    MaskedInputRequest,
    Message,
    RoundSetup,
    SecAggLimits,
    ShareKeys,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
    decode,
    decode_as,
    encode,
)
from edge_sdk.secagg.params import MIN_COHORT, SecAggParams
from edge_sdk.secagg.server import AggregateResult, ServerRound, ServerState

__all__ = [
    "MIN_COHORT",
    "AdvertiseKeys",
    "AggregateResult",
    "ConsistencyError",
    "DecryptionError",
    "DeviceSession",
    "DeviceState",
    "DropoutError",
    "MaskedInput",
    "MaskedInputRequest",
    "Message",
    "MessageError",
    "PhaseError",
    "ProtocolViolationError",
    "ReconstructionError",
    "ReplayError",
    "RoundSetup",
    "SecAggError",
    "SecAggLimits",
    "SecAggParams",
    "ServerRound",
    "ServerState",
    "ShareKeys",
    "ShareKeysRequest",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode",
    "decode_as",
    "encode",
]
