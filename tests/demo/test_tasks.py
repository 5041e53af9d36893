"""The built-in demo data: determinism, the non-IID partition, held-out disjointness, scoring."""

from __future__ import annotations

import json

import pytest

from edge_sdk.demo.tasks import (
    FAMILIES,
    TaskConfig,
    exact_match,
    family_shares,
    generate,
    read_examples,
    score,
    write_task_data,
)


def test_same_seed_same_data_other_seed_other_data() -> None:
    cfg = TaskConfig(clients=4, train_per_client=40, eval_per_family=5, seed=3)
    a, b = generate(cfg), generate(cfg)
    assert a.clients == b.clients and a.eval == b.eval
    c = generate(TaskConfig(clients=4, train_per_client=40, eval_per_family=5, seed=4))
    assert c.eval != a.eval


def test_partition_is_non_iid_with_the_configured_skew() -> None:
    cfg = TaskConfig(clients=4, families_per_client=2, train_per_client=100, own_fraction=0.9)
    data = generate(cfg)
    for c, examples in enumerate(data.clients):
        assert len(examples) == 100
        own = set(cfg.owned(c))
        shares = family_shares(examples)
        assert sum(v for k, v in shares.items() if k in own) == pytest.approx(0.9)
        # Every other family appears, but only rarely: local-only training barely sees it.
        others = [f.name for f in cfg.families if f.name not in own]
        assert all(0 < shares.get(f, 0.0) <= 0.1 / len(others) + 0.02 for f in others)
    owners = [set(cfg.owned(c)) for c in range(cfg.clients)]
    assert all(not (owners[i] & owners[j]) for i in range(4) for j in range(i + 1, 4))


def test_eval_set_is_balanced_and_disjoint_from_training() -> None:
    cfg = TaskConfig(clients=2, families_per_client=2, train_per_client=60, eval_per_family=7)
    data = generate(cfg)
    assert family_shares(data.eval) == {f.name: 0.25 for f in cfg.families}
    train_prompts = {e.prompt for client in data.clients for e in client}
    assert not train_prompts & {e.prompt for e in data.eval}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_is_a_deterministic_short_transformation(family) -> None:  # type: ignore[no-untyped-def]
    import random

    x1, y1 = family.make(random.Random(5))
    x2, y2 = family.make(random.Random(5))
    assert (x1, y1) == (x2, y2)
    assert x1 != y1 and 0 < len(y1) <= 24


def test_files_round_trip_in_the_trainers_chat_format(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = generate(TaskConfig(clients=2, train_per_client=10, eval_per_family=3))
    paths, eval_path = write_task_data(data, tmp_path)
    assert [p.name for p in paths] == ["client_0.jsonl", "client_1.jsonl"]
    first = json.loads(paths[0].read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert read_examples(eval_path) == data.eval


def test_exact_match_scorer() -> None:
    assert exact_match(" 17.04.2023<|im_end|>\n", "17.04.2023")
    assert not exact_match("17.04.2023.", "17.04.2023")
    assert not exact_match("17/04/2023", "17.04.2023")
    assert not exact_match("Lovelace, a.", "Lovelace, A.")  # case matters
    data = generate(TaskConfig(clients=2, train_per_client=4, eval_per_family=2))
    preds = [e.answer for e in data.eval]
    preds[0] = "wrong"
    overall, per_family = score(preds, data.eval)
    assert overall == pytest.approx(3 / 4)
    assert per_family[data.eval[0].family] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="predictions"):
        score(preds[:-1], data.eval)


@pytest.mark.parametrize(
    "field,value",
    [("clients", 0), ("train_per_client", -1), ("own_fraction", 0.0), ("own_fraction", 1.5)],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        TaskConfig(**{field: value})  # type: ignore[arg-type]


def test_config_rejects_more_families_than_exist() -> None:
    with pytest.raises(ValueError, match="families"):
        TaskConfig(clients=5, families_per_client=2)


def test_user_records_keep_their_own_system_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "mine.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "2+2"},
                {"role": "assistant", "content": "4"},
            ]
        },
        {"prompt": "capital of France", "completion": "Paris"},
        {"text": "not scorable"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a, b = read_examples(path)
    assert a.messages(with_answer=False) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "2+2"},
    ]
    assert b.messages() == [
        {"role": "user", "content": "capital of France"},
        {"role": "assistant", "content": "Paris"},
    ]
