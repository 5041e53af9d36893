"""The in-process federation: the coordinator's aggregation applied to wire-encoded updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_sdk.demo.config import DemoConfig
from edge_sdk.demo.simulate import load_dataset, simulate_federation, train_config, train_run
from edge_sdk.demo.tasks import TaskConfig, generate, write_task_data


@pytest.fixture(scope="module")
def setup(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from edge_sdk.training.tokenizer import load_tokenizer
    from edge_sdk.training.trainer import load_for_training

    config = DemoConfig(
        model=str(tiny_gguf),
        clients=2,
        rounds=1,
        local_steps=2,
        batch_size=2,
        seq_len=128,
        train_per_client=6,
        eval_per_family=1,
        precision="fp32",
        lr=1e-2,
        codec="fp32",
        greedy_eval=False,
    )
    data = generate(TaskConfig(clients=2, train_per_client=6, eval_per_family=1))
    paths, _ = write_task_data(data, tmp_path_factory.mktemp("sim"))
    tok = load_tokenizer(tiny_gguf)
    datasets = [load_dataset(p, tok, config) for p in paths]
    model = load_for_training(tiny_gguf, train_config(config, 1))
    return config, datasets, model


def _products(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    mods = {k.rsplit(".", 1)[0] for k in adapter}
    return {m: adapter[f"{m}.lora_B"].astype(np.float64) @ adapter[f"{m}.lora_A"] for m in mods}


def test_one_client_exact_round_reproduces_its_update(setup) -> None:  # type: ignore[no-untyped-def]
    config, datasets, model = setup
    fed = simulate_federation(model, datasets[:1], config)
    assert len(fed.versions) == 2
    # Retrain the same round by hand: same init (version 0), same seed as the simulation.
    alone = train_run(model, datasets[0], config, fed.versions[0], config.local_steps, seed=1)
    got, want = _products(fed.versions[1]), _products(alone.adapter)
    for m in want:
        np.testing.assert_allclose(got[m], want[m], atol=1e-5)
    # fp32 codec: every byte is a float32 of A and B, plus a little framing.
    assert fed.fp32_bytes[0] <= fed.bytes_sent[0] < 1.1 * fed.fp32_bytes[0]


def test_int4_deltas_shrink_the_updates_and_still_move_the_adapter(setup) -> None:  # type: ignore[no-untyped-def]
    config, datasets, model = setup
    events: list[tuple[str, dict]] = []
    fed = simulate_federation(
        model,
        datasets,
        config.replace(codec="delta+int4", rounds=2),
        progress=lambda event, fields: events.append((event, fields)),
    )
    assert len(fed.versions) == 3 and len(fed.bytes_sent) == 2
    # One "federation" event per client update, counting what the live view shows.
    assert [e for e, _ in events] == ["federation"] * 4
    assert [f["updates"] for _, f in events] == [[1, 0], [1, 1], [2, 1], [2, 2]]
    assert events[-1][1]["bytes_sent"] == fed.bytes_sent
    assert events[-1][1]["latest_loss"] == list(fed.client_loss[-1])
    assert all(f / s > 4.0 for s, f in zip(fed.bytes_sent, fed.fp32_bytes))
    assert any(np.abs(v).max() > 0 for k, v in fed.versions[-1].items() if k.endswith("lora_B"))
    assert all(np.isfinite(x) for r in fed.client_loss for x in r)
