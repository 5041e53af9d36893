"""DPO / IPO: the loss and its gradient against the papers' formulas, the reference log-probs,
resume after a crash, and preference data (parsing, errors, tokenization), on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_sdk.models.loader import load_model
from edge_sdk.training import dpo
from edge_sdk.training.checkpoint import load_checkpoint
from edge_sdk.training.data import DataConfig, stream_indexes
from edge_sdk.training.dpo import (
    DpoObjective,
    adapter_disabled,
    preference_loss,
    reference_logps,
)
from edge_sdk.training.errors import CheckpointError, DataFormatError, EmptyDatasetError
from edge_sdk.training.lora import LoraConfig, load_lora_state_dict, lora_modules
from edge_sdk.training.preferences import (
    PreferencePair,
    build_preference_dataset,
    load_preferences,
    tokenize_pair,
    write_preferences,
)
from edge_sdk.training.tokenizer import load_tokenizer
from edge_sdk.training.trainer import TrainConfig, fit, load_for_training, seeded_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["hello", "world", "the", "a", "is", "of", "and", "to", "in"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learnable preference: for 'x y' prefer 'y x' over repeating the prompt back."""
    path = tmp_path_factory.mktemp("prefs") / "swap.jsonl"
    with path.open("w") as f:
        for w in WORDS:
            for v in WORDS:
                f.write(
                    json.dumps(
                        {"prompt": f"{w} {v}", "chosen": f"{v} {w}", "rejected": f"{w} {v} {w}"}
                    )
                    + "\n"
                )
    return path


def _config(**kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "steps": 8,
        "method": "dpo",
        "lora": LoraConfig(rank=4, alpha=8.0, dropout=0.1),
        "seq_len": 64,
        "batch_size": 2,
        "lr": 1e-2,
        "warmup": 2,
        "precision": "fp32",
        "checkpoint_every": 3,
    }
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _random_adapter(model: torch.nn.Module, rank: int, seed: int) -> dict[str, np.ndarray]:
    """A non-zero adapter (B != 0), so that the policy differs from the base."""
    rng = np.random.default_rng(seed)
    shapes = {p: (m.out_features, m.in_features) for p, m in lora_modules(model)}
    return {
        k: (rng.standard_normal(v.shape) * (0.05 if k.endswith("lora_B") else 0.3)).astype(
            np.float32
        )
        for k, v in seeded_adapter(shapes, rank, 0).items()
    }


# --------------------------------------------------------------------------- independent math


def _answer_logps_by_hand(model: torch.nn.Module, tok, prompt: str, answer: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """log π(answer | prompt) from full logits and log_softmax, the answer located by
    tokenizing the rendered prompt on its own (not through the code under test)."""
    user = [{"role": "user", "content": prompt}]
    prefix = tok.encode(tok.render_chat(user, add_generation_prompt=True), add_bos=False)
    full = tok.encode(
        tok.render_chat(
            [*user, {"role": "assistant", "content": answer}], add_generation_prompt=False
        ),
        add_bos=False,
    )
    assert full[: len(prefix)] == prefix
    ids = torch.tensor([full])
    logp = torch.log_softmax(model(ids)[0].double(), dim=-1)  # (T, V)
    # Token t (t >= len(prefix)) is predicted at position t - 1.
    return sum(logp[t - 1, full[t]] for t in range(len(prefix), len(full)))  # type: ignore[return-value]


def _answer_tokens_by_hand(tok, prompt: str, answer: str) -> int:  # type: ignore[no-untyped-def]
    """|y|: the tokens the rendered answer adds after the rendered prompt."""
    user = [{"role": "user", "content": prompt}]
    prefix = tok.encode(tok.render_chat(user, add_generation_prompt=True), add_bos=False)
    full = tok.encode(
        tok.render_chat(
            [*user, {"role": "assistant", "content": answer}], add_generation_prompt=False
        ),
        add_bos=False,
    )
    return len(full) - len(prefix)


@pytest.mark.parametrize(
    ("loss", "sft_weight"), [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.7), ("ipo", 1.5)]
)
def test_loss_and_gradient_match_the_papers_formula(
    tiny_gguf: Path, tmp_path: Path, loss: str, sft_weight: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DPO/IPO and, with sft_weight α > 0, RPO (Pang et al. 2024, eq. 3; TRL's rpo_alpha):
    DPO + α · NLL(chosen) / |chosen|. The MLP's saved activations stay fp32 here, so that the
    two gradients differ by summation order only (bf16 saving: tests/training/test_lora.py)."""
    from edge_sdk.models import transformer

    monkeypatch.setattr(transformer, "SAVE_16BIT", False)
    config = _config(
        dpo_loss=loss,
        batch_size=3,
        val_fraction=0.0,
        lora=LoraConfig(rank=4, alpha=8.0),
        sft_weight=sft_weight,
    )
    raw = [("hello world", "world hello", "hello world hello"), ("the a", "a the", "the the"),
           ("is of", "of is", "is")]  # fmt: skip
    pairs = [PreferencePair(p, c, r) for p, c, r in raw]
    tok = load_tokenizer(tiny_gguf)
    ds = build_preference_dataset(pairs, tok, config.data_config())
    model = load_for_training(tiny_gguf, config)
    load_lora_state_dict(model, _random_adapter(model, 4, 1))
    objective = DpoObjective(ds)
    objective.prepare(model, config)
    model.train()
    out = objective.step(model, 0, config)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith(("lora_A", "lora_B")) for n in grads)

    # The paper's formula, term by term, on logits computed the plain way.
    model.zero_grad(set_to_none=True)
    model.eval()
    beta = config.beta
    terms, correct = [], 0
    for prompt, chosen, rejected in raw:
        with torch.no_grad(), adapter_disabled(model):
            ref_w = _answer_logps_by_hand(model, tok, prompt, chosen)
            ref_l = _answer_logps_by_hand(model, tok, prompt, rejected)
        pi_w = _answer_logps_by_hand(model, tok, prompt, chosen)
        pi_l = _answer_logps_by_hand(model, tok, prompt, rejected)
        h = (pi_w - ref_w) - (pi_l - ref_l)
        if loss == "sigmoid":  # Rafailov et al. 2023, eq. 7
            terms.append(-torch.log(1.0 / (1.0 + torch.exp(-beta * h))))
        else:  # Azar et al. 2023, eq. 17
            terms.append((h - 1.0 / (2.0 * beta)) ** 2)
        if sft_weight:  # the chosen answer's mean per-token negative log-likelihood
            n_w = _answer_tokens_by_hand(tok, prompt, chosen)
            assert n_w >= 2
            terms[-1] = terms[-1] + sft_weight * (-pi_w / n_w)
        correct += int(beta * (pi_w - ref_w) > beta * (pi_l - ref_l))
    expected = sum(terms) / len(terms)
    expected.backward()  # type: ignore[union-attr]
    assert out.loss == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-5)
    if not sft_weight:  # the policy is not the reference
        assert out.loss != pytest.approx(math.log(2.0), abs=1e-3)
    assert out.metrics["reward_accuracy"] == pytest.approx(correct / 3)
    for name, g in grads.items():
        ref = dict(model.named_parameters())[name].grad
        assert ref is not None
        # fp32 (code under test) against fp64 log_softmax (here): close to float precision.
        scale = float(ref.abs().max())
        torch.testing.assert_close(g, ref.float(), rtol=1e-3, atol=1e-4 * scale)
        assert float((g - ref).norm()) <= 1e-4 * float(ref.norm())


def test_preference_loss_values() -> None:
    pc, pr = torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -2.0])
    rc, rr = torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -4.0])
    out = preference_loss(pc, pr, rc, rr, beta=0.5, loss="sigmoid")
    h = torch.tensor([2.0, -3.0])  # (pc - rc) - (pr - rr)
    torch.testing.assert_close(out.losses, torch.log1p(torch.exp(-0.5 * h)))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, -0.5]))
    ipo = preference_loss(pc, pr, rc, rr, beta=0.5, loss="ipo")
    torch.testing.assert_close(ipo.losses, (h - 1.0) ** 2)
    with pytest.raises(ValueError, match="`loss` should be one of"):
        preference_loss(pc, pr, rc, rr, beta=0.5, loss="hinge")  # type: ignore[arg-type]
    rpo = preference_loss(
        pc, pr, rc, rr, beta=0.5, sft_weight=2.0, chosen_tokens=torch.tensor([4, 10])
    )
    torch.testing.assert_close(
        rpo.losses, torch.log1p(torch.exp(-0.5 * h)) + 2.0 * torch.tensor([1.0 / 4, 5.0 / 10])
    )
    torch.testing.assert_close(rpo.chosen_rewards, out.chosen_rewards)  # rewards unchanged
    with pytest.raises(ValueError, match="`chosen_tokens` is needed"):
        preference_loss(pc, pr, rc, rr, beta=0.5, sft_weight=1.0)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), 1e9, True, "1"])
def test_sft_weight_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="`sft_weight` should be a finite number"):
        TrainConfig(method="dpo", sft_weight=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reference


def test_reference_logps_equal_a_forward_with_the_adapter_disabled(
    tiny_gguf: Path, pairs_file: Path
) -> None:
    config = _config(val_fraction=0.0)
    tok = load_tokenizer(tiny_gguf)
    pairs = load_preferences(pairs_file)[:5]
    ds = build_preference_dataset(pairs, tok, config.data_config())
    model = load_for_training(tiny_gguf, config)
    load_lora_state_dict(model, _random_adapter(model, 4, 2))
    base_ref = reference_logps(model, ds, "train", reference="base")
    start_ref = reference_logps(model, ds, "train", reference="start")
    assert all(m.enabled for _, m in lora_modules(model))  # switched back on
    model.eval()  # the reference is dropout-free
    # A separately loaded model with no LoRA layers at all is the base.
    plain = load_model(tiny_gguf, precision="fp32")
    for i, tp in enumerate(ds.train):
        pair = next(p for p in pairs if p.source == tp.source)
        prompt = pair.prompt[0]["content"]
        with torch.no_grad():
            for j, answer in enumerate((pair.chosen, pair.rejected)):
                want = _answer_logps_by_hand(plain, tok, prompt, answer)
                assert float(base_ref[i, j]) == pytest.approx(float(want), rel=1e-5, abs=1e-4)
                policy = _answer_logps_by_hand(model, tok, prompt, answer)
                assert float(start_ref[i, j]) == pytest.approx(float(policy), rel=1e-5, abs=1e-4)
    assert not torch.allclose(base_ref, start_ref)  # the adapter does change them


def test_fresh_adapter_starts_at_log_2_and_learns(tiny_gguf: Path, pairs_file: Path) -> None:
    config = _config(steps=12, checkpoint_every=0, val_fraction=0.2)
    tok = load_tokenizer(tiny_gguf)
    ds = build_preference_dataset(pairs_file, tok, config.data_config())
    model = load_for_training(tiny_gguf, config)
    res = fit(model, ds, config)
    m = res.metrics
    # B = 0: the policy is the base, so h = 0 and the loss is log 2 for every pair.
    assert m.eval_loss_before == pytest.approx(math.log(2.0), abs=1e-6)
    assert m.history[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert m.eval_metrics_before["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert m.eval_loss is not None and m.eval_loss < 0.5 * math.log(2.0)
    assert m.eval_metrics["reward_accuracy"] >= 0.9 and m.eval_metrics["reward_margin"] > 0
    for key in ("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"):
        assert key in m.history[-1] and f"eval_{key}" in m.history[-1]
    assert m.num_examples == len(ds.train) and m.num_tokens > 0


# --------------------------------------------------------------------------- resume


def _fit(tiny_gguf: Path, pairs_file: Path, config: TrainConfig, **kw: object):
    tok = load_tokenizer(tiny_gguf)
    ds = build_preference_dataset(pairs_file, tok, config.data_config())
    model = load_for_training(tiny_gguf, config)
    if kw.pop("random_start", False):
        kw["init_adapter"] = _random_adapter(model, config.lora.rank, 5)
    return fit(model, ds, config, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("reference", ["base", "start"])
def test_resume_after_crash_equals_uninterrupted_and_reuses_the_reference(
    tmp_path: Path,
    tiny_gguf: Path,
    pairs_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    reference: str,
) -> None:
    config = _config(steps=9, checkpoint_every=3, eval_every=3, reference=reference)
    # "start" starts from a non-zero adapter, so that its reference differs from the base's.
    start = {"random_start": reference == "start"}
    full = _fit(tiny_gguf, pairs_file, config, checkpoint_path=tmp_path / "a.pt", **start)

    class Crash(Exception):
        pass

    def crash_at_5(record: dict[str, float]) -> None:
        if record["step"] == 5:
            raise Crash("injected at step 5")

    ckpt = tmp_path / "b.pt"
    with pytest.raises(Crash, match="injected at step 5"):
        _fit(tiny_gguf, pairs_file, config, checkpoint_path=ckpt, on_step=crash_at_5, **start)
    saved = load_checkpoint(ckpt)
    assert saved["step"] == 3
    cache = saved["objective"]["reference"]["train"]
    ds = build_preference_dataset(pairs_file, load_tokenizer(tiny_gguf), config.data_config())
    assert tuple(cache.shape) == (len(ds.train), 2)
    # Exactly the pairs of the first 3 steps (2 pairs each) have a cached reference.
    seen = {int(i) for i in stream_indexes(config.seed, len(ds.train), 0, 6)}
    assert {int(i) for i in (~torch.isnan(cache[:, 0])).nonzero()} == seen
    assert ("start_adapter" in saved["objective"]) == (reference == "start")

    # The resumed run computes the reference of new pairs only, batch by batch.
    calls: list[int] = []
    real_policy = dpo._reference_policy

    def counting(*args: object, **kw: object):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real_policy(*args, **kw)  # type: ignore[arg-type]

    def no_recompute(*args: object, **kw: object) -> None:
        raise AssertionError("a resumed run recomputed the held-out reference log-probs")

    monkeypatch.setattr(dpo, "_reference_policy", counting)
    monkeypatch.setattr(dpo, "reference_logps", no_recompute)
    resumed = _fit(tiny_gguf, pairs_file, config, checkpoint_path=ckpt, resume=True, **start)
    expected_calls = 0
    for step in range(3, 9):
        batch = {int(i) for i in stream_indexes(config.seed, len(ds.train), 2 * step, 2)}
        expected_calls += bool(batch - seen)
        seen |= batch
    assert len(calls) == expected_calls
    for k, v in full.adapter.items():
        np.testing.assert_array_equal(resumed.adapter[k], v)

    def _no_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in history]

    assert _no_timing(resumed.metrics.history) == _no_timing(full.metrics.history)
    assert resumed.metrics.eval_metrics == full.metrics.eval_metrics

    for other in (_config(steps=9, beta=0.2), _config(steps=9, dpo_loss="ipo")):
        with pytest.raises(CheckpointError, match="another configuration"):
            _fit(tiny_gguf, pairs_file, other, checkpoint_path=ckpt, resume=True, **start)


def test_checkpoint_without_reference_is_refused(
    tmp_path: Path, tiny_gguf: Path, pairs_file: Path
) -> None:
    config = _config(steps=4, checkpoint_every=2)
    ckpt = tmp_path / "c.pt"
    _fit(tiny_gguf, pairs_file, config, checkpoint_path=ckpt)
    state = torch.load(ckpt, weights_only=True)
    del state["objective"]
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="no reference log-probs"):
        _fit(tiny_gguf, pairs_file, config, checkpoint_path=ckpt, resume=True)


def test_sft_fingerprint_fields_are_unchanged() -> None:
    """An SFT config fingerprints the same flat fields as before `lora` was a LoraConfig, so a
    checkpoint written by the earlier code still resumes (with fp32 compute, what those runs
    used; auto's bf16 adds `compute`: tests/training/test_lora_bf16.py)."""
    fields = TrainConfig(compute="fp32").trajectory_fields()
    assert fields == {
        "steps": 200, "rank": 8, "alpha": 16.0, "dropout": 0.0,
        "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "seq_len": 256, "batch_size": 1, "grad_accum": 1, "lr": 2e-4, "warmup": 10,
        "min_lr_ratio": 0.1, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0,
        "val_fraction": 0.1, "precision": "nf4", "gradient_checkpointing": False,
        "freeze_a": False,
    }  # fmt: skip
    dpo_fields = TrainConfig(method="dpo").trajectory_fields()
    assert dpo_fields["method"] == "dpo" and dpo_fields["beta"] == 0.1
    assert dpo_fields["dpo_loss"] == "sigmoid" and dpo_fields["reference"] == "base"
    # Plain DPO fingerprints as before sft_weight existed; a non-zero weight changes the path.
    assert "sft_weight" not in dpo_fields
    assert TrainConfig(method="dpo", sft_weight=1.0).trajectory_fields()["sft_weight"] == 1.0


def test_fit_refuses_the_wrong_dataset_kind(tiny_gguf: Path, pairs_file: Path) -> None:
    config = _config()
    tok = load_tokenizer(tiny_gguf)
    ds = build_preference_dataset(pairs_file, tok, config.data_config())
    model = load_for_training(tiny_gguf, config)
    with pytest.raises(TypeError, match="method 'sft' trains on a Dataset, got PreferenceDataset"):
        fit(model, ds, _config(method="sft"))
    with pytest.raises(ValueError, match="method='dpo'"):
        dpo.fit_dpo(model, ds, _config(method="sft"))


# --------------------------------------------------------------------------- data


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD = {"prompt": "hello", "chosen": "world", "rejected": "the"}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "hello", "chosen": "", "rejected": "the"}, "`chosen` is empty"),
        ({"prompt": "hello", "chosen": "  ", "rejected": "the"}, "`chosen` is empty"),
        ({"prompt": "hello", "chosen": "world", "rejected": "world"}, "are the same answer"),
        ({"prompt": "hello", "chosen": "world"}, "missing field `rejected`"),
        ({"prompt": "hello", "rejected": "world"}, "missing field `chosen`"),
        ({"chosen": "a", "rejected": "b"}, r"missing field `prompt` \(or `messages`\)"),
        ({"prompt": "a", "messages": [], "chosen": "a", "rejected": "b"}, "not both"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "`prompt` should be a string or a list"),
        ({"prompt": "a", "chosen": 3, "rejected": "b"}, "`chosen` should be a string, got int"),
        (
            {"prompt": "a", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
            "`chosen` should be an assistant turn",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "x"},
                ],
                "chosen": "a",
                "rejected": "b",
            },
            "should end with a user turn, not with a 'assistant' turn",
        ),
        (
            {"messages": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
            "messages\\[0\\].role 'robot' is not one of",
        ),
        ("{broken", "invalid JSON"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_bad_pair_names_file_and_line(tmp_path: Path, record: object, message: str) -> None:
    path = _write(tmp_path / "p.jsonl", [GOOD, record, GOOD])
    with pytest.raises(DataFormatError, match=rf"p\.jsonl:2: .*{message}"):
        load_preferences(path)
    pairs = load_preferences(path, skip_bad=True)
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:3"]


def test_answer_forms_and_prompt_forms(tmp_path: Path) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    path = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "hi", "chosen": {"role": "assistant", "content": "a"}, "rejected": "b"},
            {"prompt": msgs, "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
            {"messages": msgs, "chosen": "a", "rejected": "b"},
            "",
        ],
    )
    a, b, c = load_preferences(path)
    assert a.prompt == ({"role": "user", "content": "hi"},) and a.chosen == "a"
    assert b.prompt == c.prompt == tuple(msgs) and b.chosen == c.chosen == "a"
    # Round trip through the writer that an app uses to store its pairs.
    again = load_preferences(write_preferences(tmp_path / "w.jsonl", [a, b, c]))
    assert [(p.prompt, p.chosen, p.rejected) for p in again] == [
        (p.prompt, p.chosen, p.rejected) for p in (a, b, c)
    ]


def test_pair_built_in_code_is_validated() -> None:
    with pytest.raises(ValueError, match="`chosen` is empty"):
        PreferencePair("hello", "", "b")
    with pytest.raises(ValueError, match="app:7: `chosen` and `rejected` are the same answer"):
        PreferencePair("hello", "b", "b", source="app:7")
    assert PreferencePair("hello", "a", "b").prompt == ({"role": "user", "content": "hello"},)


def test_non_jsonl_and_empty_data_are_refused(tmp_path: Path, tiny_gguf: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps([GOOD]))
    with pytest.raises(DataFormatError, match=r"p\.json: preference data is JSONL"):
        load_preferences(tmp_path / "p.json")
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "", "rejected": "b"}])
    tok = load_tokenizer(tiny_gguf)
    with pytest.raises(EmptyDatasetError, match="no usable preference pairs \\(1 malformed"):
        build_preference_dataset(bad, tok, DataConfig(skip_bad=True))


def test_tokenization_scores_the_answer_only(tiny_gguf: Path) -> None:
    tok = load_tokenizer(tiny_gguf)
    pair = PreferencePair(
        (
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "the world"},  # an earlier turn: not scored
            {"role": "user", "content": "a"},
        ),
        "world hello",
        "hello",
    )
    tp = tokenize_pair(tok, pair)
    prompt = tok.render_chat(list(pair.prompt), add_generation_prompt=True)
    n_prompt = len(tok.encode(prompt, add_bos=False))
    for ex, answer in ((tp.chosen, pair.chosen), (tp.rejected, pair.rejected)):
        turn = {"role": "assistant", "content": answer}
        full = tok.encode(
            tok.render_chat([*pair.prompt, turn], add_generation_prompt=False), add_bos=False
        )
        assert ex.input_ids.tolist() == full
        # Scored: exactly the tokens after the prompt (the answer and its end-of-turn marker).
        assert ex.loss_mask.tolist() == [i >= n_prompt for i in range(len(full))]
        assert tok.decode(ex.input_ids[ex.loss_mask].tolist()).startswith(answer + "<|im_end|>")
    # The batch puts chosen rows first, and masks prompt and padding in the labels.
    ds = build_preference_dataset(
        [pair, PreferencePair("a", "b", "a b")], tok, DataConfig(val_fraction=0)
    )
    batch = ds.train_batch(0, 2)
    assert batch.ids.shape[0] == 4 and batch.pairs == 2
    for row in range(4):
        source = ds.train[batch.index[row % 2]]
        ex = source.chosen if row < 2 else source.rejected
        n = len(ex.input_ids)
        np.testing.assert_array_equal(batch.ids[row, :n], ex.input_ids)
        want = np.where(ex.loss_mask, ex.input_ids, -100)
        want[0] = -100
        np.testing.assert_array_equal(batch.labels[row, :n], want)
        assert (batch.labels[row, n:] == -100).all()


def test_a_prompt_longer_than_seq_len_is_dropped(tiny_gguf: Path) -> None:
    tok = load_tokenizer(tiny_gguf)
    long = PreferencePair(" ".join(["hello"] * 80), "a", "b")
    ds = build_preference_dataset(
        [long, PreferencePair("a", "b", "a b")], tok, DataConfig(seq_len=48, val_fraction=0)
    )
    assert len(ds.train) == 1 and ds.stats.dropped_no_target == 1 and ds.stats.truncated == 1
