"""Trainer: learning, determinism, resume after a crash and after SIGKILL, config validation."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from edge_sdk.adapters import load_peft, read_gguf_lora
from edge_sdk.models.identity import model_sha256
from edge_sdk.training.checkpoint import load_checkpoint
from edge_sdk.training.data import build_dataset
from edge_sdk.training.errors import CheckpointError
from edge_sdk.training.lora import LoraConfig, lora_modules
from edge_sdk.training.schedule import lr_at
from edge_sdk.training.tokenizer import load_tokenizer
from edge_sdk.training.trainer import TrainConfig, fit, load_for_training, run, seeded_adapter
from tests.training.helpers import (
    REPO,
    assert_same_adapters,
    kill_at_checkpoint,
    run_train,
    train_env,
)

WORDS = ["hello", "world", "the", "a", "is", "of", "and", "to", "in"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learnable skill: answer 'x y' with 'y x'."""
    path = tmp_path_factory.mktemp("data") / "swap.jsonl"
    with path.open("w") as f:
        for w in WORDS:
            for v in WORDS:
                f.write(json.dumps({"prompt": f"{w} {v}", "completion": f"{v} {w}"}) + "\n")
    return path


def _config(**kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "steps": 12,
        "seq_len": 64,
        "batch_size": 2,
        "lr": 1e-2,
        "warmup": 2,
        "precision": "fp32",
        "checkpoint_every": 4,
    }
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.1}
    for name in ("rank", "alpha", "dropout", "freeze_a"):
        if name in kw:
            lora[name] = kw.pop(name)
    base.update(kw)
    return TrainConfig(lora=LoraConfig(**lora), **base)  # type: ignore[arg-type]


def _fit(tiny_gguf: Path, data_file: Path, config: TrainConfig, **kw: object):
    tok = load_tokenizer(tiny_gguf)
    ds = build_dataset(data_file, tok, config.data_config())
    model = load_for_training(tiny_gguf, config)
    return model, ds, fit(model, ds, config, **kw)  # type: ignore[arg-type]


def test_schedule_warmup_then_cosine() -> None:
    lrs = [lr_at(s, base_lr=1.0, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    with pytest.raises(ValueError, match=r"`step` should be in \[0, 20\), got 20"):
        lr_at(20, base_lr=1.0, warmup=4, total=20)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="`steps` should be a positive integer, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="`precision` should be one of"):
        TrainConfig(precision="int3")
    with pytest.raises(ValueError, match="`targets`"):
        TrainConfig(lora=LoraConfig(targets=("qkv",)))
    with pytest.raises(ValueError, match="`lora` should be a LoraConfig, got dict"):
        TrainConfig(lora={"rank": 4})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`method` should be one of"):
        TrainConfig(method="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`beta` should be a positive number, got 0"):
        TrainConfig(beta=0)
    with pytest.raises(ValueError, match="`dpo_loss` should be one of"):
        TrainConfig(dpo_loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`lr`"):
        TrainConfig(lr=float("nan"))


def test_seeded_adapter_is_seeded_per_module() -> None:
    shapes = {"model.layers.0.self_attn.q_proj": (8, 16), "model.layers.1.mlp.up_proj": (32, 16)}
    a = seeded_adapter(shapes, 4, seed=3)
    b = seeded_adapter({"model.layers.1.mlp.up_proj": (32, 16)}, 4, seed=3)
    np.testing.assert_array_equal(
        a["model.layers.1.mlp.up_proj.lora_A"], b["model.layers.1.mlp.up_proj.lora_A"]
    )
    assert not (a["model.layers.0.self_attn.q_proj.lora_B"]).any()
    assert np.abs(a["model.layers.0.self_attn.q_proj.lora_A"]).max() <= 1 / 4  # 1/sqrt(16)
    c = seeded_adapter(shapes, 4, seed=4)
    assert not np.array_equal(
        a["model.layers.0.self_attn.q_proj.lora_A"], c["model.layers.0.self_attn.q_proj.lora_A"]
    )


def test_fit_learns_trains_only_adapter_and_is_deterministic(
    tiny_gguf: Path, data_file: Path
) -> None:
    config = _config(steps=16, checkpoint_every=0)
    model, ds, res = _fit(tiny_gguf, data_file, config)
    m = res.metrics
    assert m.eval_loss is not None and m.eval_loss_before is not None
    assert m.eval_loss < 0.5 * m.eval_loss_before
    assert (
        m.steps == 16 and m.num_tokens == 16 * 2 * 64 and m.num_examples == ds.stats.train_examples
    )
    assert m.tokens_per_s > 0 and len(m.history) == 16
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert any(np.abs(v).max() > 0 for k, v in res.adapter.items() if k.endswith("lora_B"))
    _, _, again = _fit(tiny_gguf, data_file, config)
    for k, v in res.adapter.items():
        np.testing.assert_array_equal(again.adapter[k], v)


def test_freeze_a_and_init_adapter(tiny_gguf: Path, data_file: Path) -> None:
    config = _config(steps=4, checkpoint_every=0, freeze_a=True)
    tok = load_tokenizer(tiny_gguf)
    ds = build_dataset(data_file, tok, config.data_config())
    model = load_for_training(tiny_gguf, config)
    rng = np.random.default_rng(0)
    start = {
        k: rng.standard_normal(v.shape).astype(np.float32) * 0.01
        for k, v in seeded_adapter(
            {p: (m.out_features, m.in_features) for p, m in lora_modules(model)}, 4, 0
        ).items()
    }
    res = fit(model, ds, config, init_adapter=start)
    for k, v in res.adapter.items():
        if k.endswith("lora_A"):
            np.testing.assert_array_equal(v, start[k])  # frozen, and started from the given A
        else:
            assert not np.array_equal(v, start[k])


def test_resume_after_crash_equals_uninterrupted(
    tmp_path: Path, tiny_gguf: Path, data_file: Path
) -> None:
    config = _config(steps=12, checkpoint_every=4)
    _, _, full = _fit(tiny_gguf, data_file, config, checkpoint_path=tmp_path / "a.pt")

    class Crash(Exception):
        pass

    def crash_at_7(record: dict[str, float]) -> None:
        if record["step"] == 7:
            raise Crash("injected at step 7")

    ckpt = tmp_path / "b.pt"
    with pytest.raises(Crash, match="injected at step 7"):
        _fit(tiny_gguf, data_file, config, checkpoint_path=ckpt, on_step=crash_at_7)
    assert load_checkpoint(ckpt)["step"] == 4
    _, _, resumed = _fit(tiny_gguf, data_file, config, checkpoint_path=ckpt, resume=True)
    for k, v in full.adapter.items():
        np.testing.assert_array_equal(resumed.adapter[k], v)
    assert [h["loss"] for h in resumed.metrics.history] == [h["loss"] for h in full.metrics.history]

    other = _config(steps=12, checkpoint_every=4, lr=5e-3)
    with pytest.raises(CheckpointError, match="another configuration"):
        _fit(tiny_gguf, data_file, other, checkpoint_path=ckpt, resume=True)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def _cli(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edge_sdk.cli",
        "train",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "40",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--warmup",
        "2",
        "--rank",
        "4",
        "--dropout",
        "0.1",
        "--precision",
        "fp32",
        "--checkpoint-every",
        "2",
        "--no-progress",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_equal(
    tmp_path: Path, tiny_gguf: Path, data_file: Path
) -> None:
    env = train_env()
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    done = run_train(_cli(tiny_gguf, data_file, ref), env)
    assert done.returncode == 0, done.stderr

    step = kill_at_checkpoint(_cli(tiny_gguf, data_file, killed), killed, env)
    assert 6 <= step < 40 and not (killed / "adapter.gguf").exists()

    again = run_train(_cli(tiny_gguf, data_file, killed), env)
    assert again.returncode == 2 and "--resume" in again.stderr  # refuses to clobber the checkpoint
    resumed = run_train(_cli(tiny_gguf, data_file, killed, "--resume"), env)
    assert resumed.returncode == 0, resumed.stderr
    ma, mb = assert_same_adapters(ref, killed)
    assert ma["eval_loss"] == mb["eval_loss"] and ma["num_tokens"] == mb["num_tokens"]


def test_run_writes_both_formats(tmp_path: Path, tiny_gguf: Path, data_file: Path) -> None:
    out = run(tiny_gguf, data_file, tmp_path / "out", _config(steps=3, checkpoint_every=0))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["peft_type"] == "LORA"
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert out.gguf_path.is_file() and out.metrics_path.is_file()
    sha = model_sha256(tiny_gguf)
    assert read_gguf_lora(out.gguf_path).metadata["fedlm.base_model.sha256"] == sha
    assert load_peft(tmp_path / "out").metadata["fedlm.base_model.sha256"] == sha
    assert len(tensors) == len(out.result.adapter)
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        run(tiny_gguf, data_file, tmp_path / "fresh", _config(), resume=True)


@pytest.mark.slow
def test_real_model_learns_the_capitals_format(tmp_path: Path, smollm2_path: Path) -> None:
    """QLoRA (NF4) on SmolLM2 with the shipped capitals->JSON data lowers the eval loss."""
    data = REPO / "tests" / "data" / "capitals_json.jsonl"
    config = TrainConfig(
        steps=8,
        seq_len=128,
        batch_size=1,
        lr=2e-3,
        warmup=2,
        lora=LoraConfig(rank=8, alpha=16.0),
        checkpoint_every=0,
        eval_batches=4,
    )
    out = run(smollm2_path, data, tmp_path / "out", config)
    m = out.result.metrics
    assert m.eval_loss is not None and m.eval_loss_before is not None
    assert m.eval_loss < 0.8 * m.eval_loss_before
    from edge_sdk.adapters import check_adapter_compatible

    check_adapter_compatible(out.gguf_path, smollm2_path)
