"""`fedlm demo --quick` on the real embedded model (the CI check of issue 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_demo_report_shows_federation_helped(smollm2_path: Path, tmp_path: Path) -> None:
    from edge_sdk.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {
        "base",
        "local_only",
        "federated",
        "centralized",
        "bytes",
        "rounds",
        "global_versions",
        "wall_time_s",
        "targets",
        "chat",
        "artifacts",
    }
    assert len(report["local_only"]) == 4
    assert report["federated"]["exact_match"] > report["base"]["exact_match"]
    assert report["federated"]["eval_loss"] < report["base"]["eval_loss"]
    assert report["bytes"]["ratio"] > 4.0
    assert (out / "eval_loss.png").stat().st_size > 0
    assert (out / "adapter" / "adapter.gguf").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
