"""A hostile enrolled device cannot crash ingest with integers SQLite cannot store.

Before the wire capped every uint at 2^63-1 (docs/wire-format.md, section 1), an update with
num_tokens = 2^64-1 decoded fine and then raised OverflowError inside the SQLite ledger: an
unhandled exception on the coordinator instead of a 400 naming the field.
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest

from coordinator.core import Coordinator
from coordinator.errors import BadRequestError
from coordinator.storage import SQLiteStorage
from edge_sdk.wire import MessageKind, _envelope
from tests.coordinator.helpers import JOIN_TOKEN, client_tensors, make_config, update_bytes


@pytest.mark.parametrize("field", ["num_tokens", "num_examples", "base_version"])
def test_uint64_counts_are_a_bad_request_not_a_crash(tmp_path: Path, field: str) -> None:
    storage = SQLiteStorage(tmp_path / "coordinator.sqlite")
    coordinator = Coordinator(make_config(tmp_path), storage, rng=np.random.default_rng(0))
    with storage:
        client_id = coordinator.join(JOIN_TOKEN, "hostile")["client_id"]
        good = update_bytes(client_id, client_tensors(np.random.default_rng(0), 8))
        body = msgpack.unpackb(good[8:])
        body[field] = (1 << 64) - 1
        with pytest.raises(BadRequestError, match=rf"AdapterUpdate\.{field}: expected an integer"):
            coordinator.submit(client_id, _envelope.pack(MessageKind.ADAPTER_UPDATE, body))
        coordinator.submit(client_id, good)  # the ledger still works afterwards
