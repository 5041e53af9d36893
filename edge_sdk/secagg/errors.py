"""Errors of the secure-aggregation protocol: one base class, one subclass per kind of failure.

All are `FedlmError`s. Caller misuse (a wrong argument type or value) raises the built-in
`TypeError`/`ValueError` instead.
"""

from __future__ import annotations

from edge_sdk.errors import FedlmError


class SecAggError(FedlmError):
    """Base class of every error the secure-aggregation protocol raises on purpose."""


class PhaseError(SecAggError):
    """A message arrived in the wrong protocol phase (`expected SHARE_KEYS, got MASKED_INPUT`)."""


class MessageError(SecAggError):
    """Bytes or fields that do not form a valid secure-aggregation message (bounded decoding)."""


class ProtocolViolationError(SecAggError):
    """A well-formed message breaks the protocol: wrong round, unknown sender, duplicate, bad
    neighbour set, or a key that does not match the one advertised."""


class ConsistencyError(ProtocolViolationError):
    """The server asked a device for both kinds of share of one device (or asked twice): the
    device refuses, because answering would let the server unmask that device's input."""


class ReplayError(ProtocolViolationError):
    """A masked input is not bound to this round and cohort (its tag does not verify)."""


class DecryptionError(ProtocolViolationError):
    """An encrypted share does not decrypt under the pair's key and this round's binding."""


class DropoutError(SecAggError):
    """Too many devices dropped out: fewer than the threshold remain where the protocol needs
    them, so the sum cannot be recovered (it is never returned wrong)."""


class ReconstructionError(SecAggError):
    """Shamir reconstruction gave a secret that does not match its commitment or public key."""
