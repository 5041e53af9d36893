"""A real client in its own process, for the kill-at-every-step tests (test_crash_points.py).

    FEDLM_JOIN_CODE=... python -m tests.client.crash_client STATE_DIR MODEL DATA URL

Runs `FederatedClient` until the task ends and prints its summary as one JSON line. With
`$FEDLM_CRASH_AT` set, `edge_sdk.client.state.crash_point` SIGKILLs it at that step.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from edge_sdk.client import FederatedClient
from tests.client.helpers import client_config


def main(argv: list[str]) -> int:
    state_dir, model, data, url = argv
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    config = client_config(
        Path(state_dir),
        Path(model),
        Path(data),
        coordinator_url=url,
        final_wait_s=0.5,
        join_token=None,  # enrolls with $FEDLM_JOIN_CODE (the coordinator serves TLS)
    )
    summary = FederatedClient(config).run()
    print(json.dumps({
        "reason": summary.reason, "global_version": summary.global_version,
        "rounds": [{"update_id": r.update_id, "base_version": r.base_version, "outcome": r.outcome}
                   for r in summary.rounds],
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
