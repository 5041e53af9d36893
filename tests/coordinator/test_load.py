"""A short run of the load generator (benchmarks/bench_load.py) against a real coordinator
subprocess over HTTPS on 127.0.0.1: every acknowledged update must be in its SQLite file."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _model() -> Path:
    from edge_sdk.errors import FedlmError
    from edge_sdk.models import resolve

    try:
        return resolve("smollm2-135m")
    except FedlmError:
        pytest.skip("needs the smollm2-135m model package")


def test_short_load_run_loses_no_acknowledged_update(tmp_path: Path) -> None:
    import bench_load

    # 50 devices, each sending once in 20 s (the coordinator holds one update per device per
    # buffer), buffer K = 10: several aggregations run while updates keep arriving.
    result = asyncio.run(
        bench_load.run_load(
            _model(),
            devices=50,
            rate=2.5,
            seconds=20,
            buffer_size=10,
            connections=8,
            templates=2,
            workdir=tmp_path,
        )
    )
    assert result["client_errors"] == []
    assert not any(code.startswith("5") for code in result["statuses"]), result["statuses"]
    assert result["accepted"] >= 0.8 * result["offered"], result
    assert result["aggregations"] >= 1, result
    assert result["acked_lost"] == 0, result
