"""Join the LAN federation from Python: `python join.py DATA.jsonl [--rounds N]`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edge_sdk.client import ClientConfig, FederatedClient, Ledger, format_summary, summarise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("data", nargs="+", help="local training files (JSONL or .txt)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--state-dir", default=str(Path.home() / ".fedlm" / "laptop"))
    ap.add_argument("--coordinator", default=None, help="URL; default: find it by mDNS")
    ap.add_argument(
        "--join-code", default=None, help="the coordinator's join code; default: $FEDLM_JOIN_CODE"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    config = ClientConfig(
        model="smollm2-135m",
        data=tuple(args.data),
        state_dir=Path(args.state_dir),
        coordinator_url=args.coordinator,
        join_code=args.join_code,  # None: $FEDLM_JOIN_CODE (needed only until enrolled)
        max_rounds=args.rounds,
    )
    summary = FederatedClient(config).run()
    print(summary)
    print(format_summary(summarise(Ledger(Path(args.state_dir) / "outbox.jsonl").entries())))


if __name__ == "__main__":
    main()
