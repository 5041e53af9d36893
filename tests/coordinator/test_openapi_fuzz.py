"""Schemathesis against the live /openapi.json of a real coordinator on 127.0.0.1.

Every documented operation gets a bounded number of generated requests (valid and invalid),
with a client's bearer token and without one. No answer may be a 5xx, and every answer must
match the document: a documented status code, content type, headers and body schema.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.coordinator.helpers import make_config
from tests.coordinator.limits_helpers import ServiceThread

fuzz_helpers = pytest.importorskip("tests.coordinator.fuzz_helpers")
schemathesis = pytest.importorskip("schemathesis")

pytestmark = pytest.mark.timeout(300)

BUDGET_S = 120.0


def test_the_live_api_matches_its_openapi_document(tmp_path: Path) -> None:
    config = make_config(tmp_path, rate_per_s=1000.0, rate_burst=1000)
    with ServiceThread(config) as st:
        schema = schemathesis.openapi.from_url(f"{st.url}/openapi.json")
        token = fuzz_helpers.join_fuzz_client(st.port)
        started = time.monotonic()
        operations = [result.ok() for result in schema.get_all_operations()]
        # Every route but /openapi.json itself, which schemathesis leaves out.
        assert {op.label for op in operations} == {
            "POST /v1/join", "GET /v1/task", "GET /v1/adapter", "POST /v1/updates",
            "GET /v1/status", "GET /metrics", "GET /healthz", "POST /v1/secagg/{phase}",
        }  # fmt: skip
        for operation in operations:
            for headers in ({"Authorization": f"Bearer {token}"}, {}):
                if time.monotonic() - started > BUDGET_S:
                    pytest.fail(f"schemathesis ran past its {BUDGET_S:.0f} s budget")
                fuzz_helpers.fuzz_operation(operation, st.url, headers)
