"""`fedlm demo --secure` against the unmasked run: accuracy, bytes per device, requests and
time of the protocol, read from two finished demo directories (report.json, the clients'
outbox ledgers and the coordinator's published versions).

    .venv/bin/python benchmarks/secagg_demo_compare.py SECURE_DIR UNMASKED_DIR [UNMASKED_DIR ...]

Per device and update: bytes sent (every request body of the update: for --secure every
protocol message, the masked input among them), requests (POST /v1/updates, or the protocol's
setup, advertise, share keys, masked input, unmask and the `next` long polls), and, for
--secure, the protocol's wall time: from the device's setup request to its unmask request
(it includes waiting for the cohort's slowest device to finish training, so the table also
gives the time from the round's *last* setup to its last unmask: the protocol itself).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def ledger(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def client_dirs(run: Path) -> list[Path]:
    return sorted(p for p in (run / "federation").glob("client-*") if p.is_dir())


def summarise(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    per_update_bytes, per_update_requests = [], []
    masked_bytes: list[int] = []
    rounds: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    own_protocol_s = []
    for d in client_dirs(run):
        entries = [e for e in ledger(d / "outbox.jsonl") if e.get("kind") == "update"]
        by_update: dict[str, list[dict]] = defaultdict(list)
        current = ""
        for e in entries:
            detail = e.get("detail") or {}
            if "secagg" in detail:  # a protocol run: from its setup to the next setup
                if detail["secagg"] == "setup":
                    current = f"v{detail.get('version')}"
                key = current
            else:
                key = str(detail.get("update_id") or e["seq"])
            by_update[key].append(e)
            if detail.get("secagg") == "masked_input":
                masked_bytes.append(int(e["bytes"]))
        for key, es in by_update.items():
            per_update_bytes.append(sum(int(e["bytes"]) for e in es))
            per_update_requests.append(len(es))
            phases = {(e.get("detail") or {}).get("secagg"): e["time"] for e in es}
            if "setup" in phases and "unmask" in phases:
                own_protocol_s.append(phases["unmask"] - phases["setup"])
                rounds[key]["setup"].append(phases["setup"])
                rounds[key]["unmask"].append(phases["unmask"])
    after_last_setup = [max(r["unmask"]) - max(r["setup"]) for r in rounds.values()]
    t = report["targets"]
    return {
        "run": str(run),
        "secure": bool(report["config"].get("secure")),
        "mode": report["config"]["mode"],
        "exact_match": report["federated"]["exact_match"],
        "centralized": report["centralized"]["exact_match"],
        "best_local_only": max(c["exact_match"] for c in report["local_only"]),
        "gap_closed": t["gap_closed"],
        "beats_every_local_only": t["beats_every_local_only"],
        "greedy": report["federated"].get("greedy_exact_match"),
        "bytes_ratio_vs_fp32": report["bytes"]["ratio"],
        "bytes_per_device_update": statistics.median(per_update_bytes),
        "masked_input_bytes": statistics.median(masked_bytes) if masked_bytes else None,
        "requests_per_update": statistics.median(per_update_requests),
        "protocol_s_per_round_device": (
            statistics.median(own_protocol_s) if own_protocol_s else None
        ),
        "protocol_s_after_last_setup": (
            statistics.median(after_last_setup) if after_last_setup else None
        ),
        "federated_phase_s": report["wall_time_s"].get("federated"),
        "total_s": report["wall_time_s"].get("total"),
        "cpu_s": report.get("cpu_time_s"),
    }


def main() -> None:
    rows = [summarise(Path(a)) for a in sys.argv[1:]]
    for r in rows:
        print(json.dumps(r))
    print()
    print(
        "| run | mode | exact match | gap closed | beats local-only | B/device/update | "
        "x fp32 | requests/update | protocol s/round (device; after last setup) | "
        "federated phase s | total s |"
    )
    print("|" + "---|" * 11)
    for r in rows:
        prot = (
            f"{r['protocol_s_per_round_device']:.1f}; {r['protocol_s_after_last_setup']:.2f}"
            if r["protocol_s_per_round_device"] is not None
            else "-"
        )
        print(
            f"| {'--secure' if r['secure'] else 'unmasked'} | {r['mode']} | "
            f"{r['exact_match']:.1%} | {r['gap_closed']:.1%} | "
            f"{'yes' if r['beats_every_local_only'] else 'no'} | "
            f"{r['bytes_per_device_update']:,.0f} | {r['bytes_ratio_vs_fp32']:.2f} | "
            f"{r['requests_per_update']:.0f} | {prot} | {r['federated_phase_s']:.0f} | "
            f"{r['total_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
