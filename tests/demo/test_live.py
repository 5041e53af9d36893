"""The demo's live view follows the progress events and renders them."""

from __future__ import annotations

from rich.console import Console

from edge_sdk.demo.live import PHASES, DemoView


def _text(view: DemoView) -> str:
    console = Console(width=140, record=True, force_terminal=False)
    console.print(view)
    return console.export_text()


def test_view_tracks_phases_versions_and_clients() -> None:
    now = [100.0]
    view = DemoView(clients=2, rounds=3, clock=lambda: now[0])
    assert view.phase == "data"
    view("phase", {"name": "data", "seconds": 1.0})
    view("phase", {"name": "load", "seconds": 2.0})
    view("score", {"arm": "base", "eval_loss": 2.25, "exact_match": 0.0})
    view("local", {"client": 1, "exact_match": 0.1875})
    assert view.phase == "local_only"
    view("version", {"version": 2, "eval_loss": 0.5, "exact_match": 0.25})
    view(
        "federation",
        {
            "version": 2,
            "rounds": 3,
            "updates": [2, 3],
            "latest_loss": [0.91, None],
            "bytes_sent": [2048, 3 * 1024 * 1024],
        },
    )
    now[0] = 142.0

    text = _text(view)
    assert (
        "training local-only baselines" in text and "42 s" in text and "global version 2/3" in text
    )
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") >= 5}
    assert "18.8%" in rows["1"] and "3/3" in rows["1"] and "3,072" in rows["1"]
    assert "2/3" in rows["0"] and "0.910" in rows["0"] and " 2 " in rows["0"]
    assert "0.0%" in rows["base"] and "eval loss 2.250" in rows["base"]
    assert "25.0%" in rows["federated"] and "eval loss 0.500" in rows["federated"]


def test_view_grows_for_clients_known_late_and_ends_done() -> None:
    view = DemoView(clients=1, rounds=1)
    view("local", {"client": 2, "exact_match": 0.5})  # --data DIR: the count comes from the files
    assert len(view.rows) == 3 and view.rows[2].local_exact_match == 0.5
    for name in PHASES:
        view("phase", {"name": name, "seconds": 0.1})
    assert view.phase == "done"
    assert "done" in _text(view)
