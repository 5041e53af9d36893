"""The demo end to end on a tiny generated model: report structure, files, and the pure parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.demo.config import DemoConfig
from edge_sdk.demo.evaluate import EvalScores
from edge_sdk.demo.report import build_report, gap_closed, write_report


def _s(em: float, loss: float = 1.0) -> EvalScores:
    return EvalScores(eval_loss=loss, exact_match=em, per_family={"date": em})


def test_gap_closed() -> None:
    assert gap_closed(0.0, 0.9, 1.0) == pytest.approx(0.9)
    assert gap_closed(0.1, 0.55, 0.6) == pytest.approx(0.9)
    assert gap_closed(0.5, 0.6, 0.5) is None  # centralized did not beat base: undefined


def test_build_report_targets() -> None:
    kw = {
        "model": "m",
        "config": {},
        "base": _s(0.0),
        "client_families": [["date"], ["phone"]],
        "centralized": _s(1.0),
        "bytes_sent": [100, 100],
        "fp32_bytes": [900, 700],
        "versions": [(1, _s(0.5)), (2, _s(0.95))],
        "wall_time_s": {"total": 100.0},
        "wall_budget_s": 600.0,
    }
    r = build_report(local_only=[_s(0.5), _s(0.6)], federated=_s(0.95), **kw)  # type: ignore[arg-type]
    t = r["targets"]
    assert t["gap_closed"] == pytest.approx(0.95) and t["gap_closed_met"]
    assert t["beats_every_local_only"] and t["wall_time_met"]
    assert r["bytes"]["ratio"] == pytest.approx(8.0) and t["bytes_ratio_met"]
    assert [c["ratio"] for c in r["bytes"]["per_client"]] == [9.0, 7.0]
    r = build_report(local_only=[_s(0.5), _s(0.95)], federated=_s(0.8), **kw)  # type: ignore[arg-type]
    assert not r["targets"]["gap_closed_met"] and not r["targets"]["beats_every_local_only"]
    with pytest.raises(ValueError, match="per client"):
        build_report(local_only=[_s(0.5)], federated=_s(0.8), **kw)  # type: ignore[arg-type]


def test_write_report_turns_nan_into_null(tmp_path: Path) -> None:
    path = write_report({"x": float("nan"), "y": [1.5, float("inf")]}, tmp_path)
    assert json.loads(path.read_text()) == {"x": None, "y": [1.5, None]}


@pytest.mark.slow
def test_run_demo_on_a_tiny_model_writes_a_complete_report(tiny_gguf: Path, tmp_path: Path) -> None:
    from edge_sdk.adapters.gguf_lora import read_gguf_lora
    from edge_sdk.demo.run import run_demo

    config = DemoConfig(
        model=str(tiny_gguf),
        clients=2,
        rounds=2,
        local_steps=2,
        batch_size=2,
        seq_len=128,
        train_per_client=8,
        eval_per_family=2,
        precision="fp32",
        lr=1e-2,
        codec="delta+int4",
    )
    report = run_demo(config, tmp_path / "run")
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
    assert len(report["local_only"]) == 2 and report["rounds"] == 2
    assert [v["version"] for v in report["global_versions"]] == [1, 2]
    for part in ("base", "federated", "centralized", *report["local_only"]):
        s = report[part] if isinstance(part, str) else part
        assert 0.0 <= s["exact_match"] <= 1.0 and np.isfinite(s["eval_loss"])
    assert "greedy_exact_match" in report["federated"]
    # int4 blockwise deltas: several times smaller than fp32 even with msgpack framing on tiny
    # tensors (on SmolLM2 the ratio is measured in BENCHMARKS.md).
    assert report["bytes"]["ratio"] > 4.0
    assert all(row["sent"] > 0 for row in report["bytes"]["per_client"])
    assert set(report["targets"]) >= {"gap_closed", "beats_every_local_only", "bytes_ratio_met"}
    assert report["chat"]["prompt"] and "base" in report["chat"]
    arts = {k: Path(v) for k, v in report["artifacts"].items()}
    assert arts["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (arts["peft_dir"] / "adapter_model.safetensors").exists()
    assert (arts["peft_dir"] / "adapter_config.json").exists()
    read_gguf_lora(arts["gguf"])
    on_disk = json.loads(arts["report"].read_text())
    assert on_disk["targets"]["bytes_ratio"] == pytest.approx(report["targets"]["bytes_ratio"])
    assert (tmp_path / "run" / "data" / "client_1.jsonl").exists()
