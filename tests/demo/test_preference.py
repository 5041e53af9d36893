"""The preference arm of the demo (`fedlm demo --method dpo`): pairs, judge, every arm."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.demo.config import DemoConfig
from edge_sdk.demo.preference import experiment, preference_pair
from edge_sdk.demo.tasks import FAMILIES, TaskConfig, exact_match, generate


def test_every_family_has_a_distinct_checkable_rejected_format() -> None:
    data = generate(TaskConfig(clients=len(FAMILIES), train_per_client=8, eval_per_family=2))
    for ex in data.eval:
        pair = preference_pair(ex)
        assert pair.chosen == ex.answer  # the users' preferred format is the rule's answer
        assert pair.rejected != pair.chosen and pair.rejected.strip()
        assert not exact_match(pair.rejected, ex.answer)  # the judge refuses the near miss
        assert pair.prompt[-1] == {"role": "user", "content": ex.prompt}
    # Non-IID: each client's pairs come mostly from its own family.
    for c, examples in enumerate(data.clients):
        own = sum(e.family == FAMILIES[c].name for e in examples) / len(examples)
        assert own >= 0.75


def test_the_preference_experiment_runs_every_arm(tiny_gguf: Path, tmp_path: Path) -> None:
    config = DemoConfig(
        model=str(tiny_gguf), clients=2, rounds=2, local_steps=1, batch_size=2, seq_len=256,
        train_per_client=6, eval_per_family=2, precision="fp32", lr=1e-2, codec="fp32",
        greedy_eval=False, method="dpo", beta=0.5,
    )  # fmt: skip
    report = experiment(config, tmp_path, workers=1)
    assert report["pairs_per_client"] == [6, 6] and report["eval_pairs"] == 4
    assert report["base"]["reward_accuracy"] == 0.0  # the policy is the reference
    for arm in ("federated", "centralized", *(f"local_only.{c}" for c in "01")):
        scores = report[arm] if "." not in arm else report["local_only"][arm[-1]]
        assert 0.0 <= scores["win_rate"] <= 1.0 and 0.0 <= scores["reward_accuracy"] <= 1.0
    # Trained arms moved off the reference: held-out pairs now get a nonzero implicit reward.
    assert report["centralized"]["reward_accuracy"] > 0.0
    assert [c["version"] for c in report["curve"]] == [2]
    assert len(report["bytes_sent"]) == 2 and min(report["bytes_sent"]) > 0
    assert "gap_closed" in report and isinstance(report["beats_every_local"], bool)
    assert report["cpu_s"] > 0 and report["wall_s"] > 0 and len(report["load_avg"]["end"]) == 3


def _tiny_config(tiny_gguf: Path) -> DemoConfig:
    return DemoConfig(
        model=str(tiny_gguf), clients=2, rounds=2, local_steps=1, batch_size=2, seq_len=256,
        train_per_client=6, eval_per_family=3, precision="fp32", lr=3e-2, codec="fp32",
        greedy_eval=False, method="dpo", beta=0.5, sft_weight=1.0,
    )  # fmt: skip


def test_one_pass_scores_equal_the_judge_and_the_reference_log_probs(tiny_gguf: Path) -> None:
    """The merged evaluation (judge + reward accuracy in one forward) against the two passes it
    replaces: TeacherForcedEvaluator's per-example exact match and dpo.reference_logps."""
    import numpy as np
    import torch

    from edge_sdk.demo.evaluate import TeacherForcedEvaluator
    from edge_sdk.demo.preference import PreferenceEvaluator, pair_dataset
    from edge_sdk.demo.simulate import initial_global, train_config, train_run
    from edge_sdk.training.dpo import reference_logps
    from edge_sdk.training.tokenizer import load_tokenizer
    from edge_sdk.training.trainer import load_for_training

    config = _tiny_config(tiny_gguf)
    data = generate(config.task_config())
    tokenizer = load_tokenizer(tiny_gguf)
    model = load_for_training(tiny_gguf, train_config(config, 1))
    eval_pairs = pair_dataset(data.eval, tokenizer, config)
    ours = PreferenceEvaluator(model, tokenizer, data.eval, eval_pairs, batch_size=2)
    judge = TeacherForcedEvaluator(model, tokenizer, data.eval)
    base = reference_logps(model, eval_pairs, "train", reference="base", batch_size=3)
    torch.testing.assert_close(ours.reference, base, rtol=1e-4, atol=1e-3)
    trained = train_run(model, pair_dataset(data.clients[0], tokenizer, config), config,
                        initial_global(model, config), 4, seed=3)  # fmt: skip
    for adapter in (None, trained.adapter):
        got = ours.score(adapter)
        want = judge.score(adapter)
        assert got["win_rate"] == round(want.exact_match, 4)
        assert got["per_family"] == {k: round(v, 2) for k, v in want.per_family.items()}
    policy = reference_logps(model, eval_pairs, "train", reference="start", batch_size=3)
    assert ours._pass(trained.adapter).logps.sub(policy).abs().max() < 1e-3
    margin = (policy[:, 0] - base[:, 0]) - (policy[:, 1] - base[:, 1])
    assert ours.score(trained.adapter)["reward_accuracy"] == round(
        float((margin > 0).float().mean()), 4
    )
    assert ours.score(None)["reward_accuracy"] == 0.0
    assert not np.allclose(policy.numpy(), base.numpy())  # the adapter moved the log-probs


def test_the_evaluator_refuses_pairs_that_are_not_the_judges_sequences(tiny_gguf: Path) -> None:
    from edge_sdk.demo.preference import PreferenceEvaluator, pair_dataset
    from edge_sdk.demo.simulate import train_config
    from edge_sdk.training.tokenizer import load_tokenizer
    from edge_sdk.training.trainer import load_for_training

    config = _tiny_config(tiny_gguf)
    data = generate(config.task_config())
    tokenizer = load_tokenizer(tiny_gguf)
    model = load_for_training(tiny_gguf, train_config(config, 1))
    shuffled = pair_dataset(list(reversed(data.eval)), tokenizer, config)
    with pytest.raises(ValueError, match="held-out pair 0 .* not the judge's sequence"):
        PreferenceEvaluator(model, tokenizer, data.eval, shuffled)


def test_workers_give_the_same_figures(tiny_gguf: Path, tmp_path: Path) -> None:
    """Two worker processes (the default on 2 cores) report what one process reports."""
    config = _tiny_config(tiny_gguf)
    one = experiment(config, tmp_path, workers=1)
    two = experiment(config, tmp_path, workers=2)
    assert two["workers"] != 1 and len(two["workers"]) == 2
    assert {w["threads"] for w in two["workers"]} == {1} or config.threads is not None
    for key in ("base", "federated", "centralized"):
        for field in ("wins", "win_rate", "reward_accuracy", "per_family"):
            assert two[key][field] == one[key][field], (key, field)
    for c in one["local_only"]:
        assert two["local_only"][c]["wins"] == one["local_only"][c]["wins"]
        assert two["local_only"][c]["reward_accuracy"] == one["local_only"][c]["reward_accuracy"]
    assert list(two["local_only"]) == ["0", "1"]
    assert two["gap_closed"] == one["gap_closed"]
    assert two["bytes_sent"] == one["bytes_sent"]
    assert two["cpu_s"] >= max(w["cpu_s"] for w in two["workers"])  # the workers' CPU counts


def test_the_preference_config_is_validated() -> None:
    with pytest.raises(ValueError, match="`beta`"):
        DemoConfig(method="dpo", beta=float("nan"))
    with pytest.raises(ValueError, match="`method`"):
        DemoConfig(method="ppo")
    assert DemoConfig.preference().method == "dpo"
    with pytest.raises(ValueError, match="`sft_weight` should be a finite number"):
        DemoConfig(method="dpo", sft_weight=-1.0)
    # The preset trains with the RPO term: plain DPO ranks but does not change greedy answers.
    assert DemoConfig.preference().sft_weight > 0
    # Its verdict is judged on 128 held-out prompts: on 64, rounding alone moved it by ~5 %.
    assert DemoConfig.preference().eval_per_family * 4 == 128
