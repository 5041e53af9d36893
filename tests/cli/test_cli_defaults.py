"""Every default of `fedlm join`, `fedlm coordinator` and `fedlm train` is its config field's.

Issue 17: each default is defined once, in the config dataclass, and the CLI derives from it
(`ConfigDefault`). The tests walk each parser: every option is either tied to a dataclass field
(its default must equal the field's, after the flag's unit or spelling is converted) or listed
as the CLI's own with the reason, so a new option with a default typed in the CLI fails here.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.next_version import AggregationConfig
from coordinator.privacy import DpConfig
from coordinator.strategies import FedAvg, FedBuff
from edge_sdk.cli import build_parser
from edge_sdk.cli._help import ConfigDefault, resolve
from edge_sdk.client import ClientConfig, LocalDpConfig
from edge_sdk.env import JOIN_CODE_ENV, JOIN_TOKEN_ENV
from edge_sdk.method import MethodSpec
from edge_sdk.models.licence import parse_policy
from edge_sdk.models.naming import LORA_TARGETS
from edge_sdk.models.store import DEFAULT_MODEL
from edge_sdk.training.lora import LoraConfig
from edge_sdk.training.methods import (
    DEFAULT_BETA,
    DEFAULT_DPO_LOSS,
    DEFAULT_METHOD,
    DEFAULT_REFERENCE,
    DEFAULT_SFT_WEIGHT,
)
from edge_sdk.training.trainer import TrainConfig


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _same(value: Any) -> Any:
    return value


def _tuple(value: Any) -> Any:
    return tuple(value) if value is not None else None


@dataclasses.dataclass(frozen=True)
class Field:
    """The dataclass field an option sets, and how the flag's value becomes the field's."""

    cls: type
    name: str
    from_cli: Callable[[Any], Any] = _same


# dest -> the field it sets. An option whose CLI default is None or False and whose field's
# default is the same None / False is listed too: the default must still agree.
JOIN: dict[str, Field] = {
    "preferences": Field(ClientConfig, "preferences", _tuple),
    "join_code": Field(ClientConfig, "join_code"),
    "coordinator": Field(ClientConfig, "coordinator_url"),
    "coordinator_name": Field(ClientConfig, "coordinator_name"),
    "join_token": Field(ClientConfig, "join_token"),
    "tls_fingerprint": Field(ClientConfig, "tls_fingerprint"),
    "insecure": Field(ClientConfig, "insecure"),
    "max_rounds": Field(ClientConfig, "max_rounds"),
    "final_wait": Field(ClientConfig, "final_wait_s"),
    "refuse_licence": Field(ClientConfig, "refuse_licences", parse_policy),
    "threads": Field(ClientConfig, "threads"),
    "memory_mb": Field(ClientConfig, "memory_limit_mb"),
    "dp_clip": Field(ClientConfig, "local_dp"),  # no clip: no local DP
    "dp_noise": Field(LocalDpConfig, "noise_multiplier"),
    "precision": Field(ClientConfig, "precision"),
    "compute": Field(ClientConfig, "compute"),
    "val_fraction": Field(ClientConfig, "val_fraction"),
    "poll_interval": Field(ClientConfig, "poll_interval_s"),
    "seed": Field(ClientConfig, "seed"),
    "discovery_timeout": Field(ClientConfig, "discovery_timeout_s"),
    "interface": Field(ClientConfig, "discovery_interfaces", _tuple),
}
JOIN_CLI_ONLY = {
    "model": "positional, required",
    "data": "required",
    "state_dir": "ClientConfig.state_dir has no default: the CLI's own ~/.fedlm/client",
    "name": "None: ClientConfig's default (the host name) applies",
    "backend": "the local runtime, not part of the client's config",
    "serve_model": "the local runtime, not part of the client's config",
}

COORDINATOR: dict[str, Field] = {
    "port": Field(CoordinatorConfig, "port"),
    "min_cohort": Field(CoordinatorConfig, "min_cohort"),
    "secure": Field(CoordinatorConfig, "secure"),
    "secure_clip": Field(CoordinatorConfig, "secure_clip"),
    "secure_grid_bits": Field(CoordinatorConfig, "secure_grid_bits"),
    "secure_phase": Field(CoordinatorConfig, "secure_phase_s"),
    "min_clients": Field(FedAvg, "min_clients"),
    "deadline": Field(FedAvg, "deadline_s"),
    "buffer_size": Field(FedBuff, "buffer_size"),
    "min_updates": Field(FedBuff, "min_updates"),
    "max_wait": Field(FedBuff, "max_wait_s"),
    "max_staleness": Field(FedBuff, "max_staleness"),
    "rank": Field(AggregationConfig, "rank"),
    "alpha": Field(AggregationConfig, "alpha"),
    "targets": Field(CoordinatorConfig, "targets", _comma_list),
    "a_seed": Field(AggregationConfig, "a_seed"),
    "codec": Field(CoordinatorConfig, "codec"),
    "exact_max_rank": Field(AggregationConfig, "exact_max_rank"),
    "server_lr": Field(AggregationConfig, "server_lr"),
    "fedadam": Field(AggregationConfig, "fedadam", lambda on: on or None),
    "clip_norm": Field(AggregationConfig, "clip_norm"),
    "clip_multiplier": Field(AggregationConfig, "clip_multiplier"),
    "clip_history": Field(AggregationConfig, "clip_history"),
    "max_weight_examples": Field(AggregationConfig, "max_weight_examples"),
    "robust": Field(AggregationConfig, "robust"),
    "trim_ratio": Field(AggregationConfig, "trim_ratio"),
    "dp_noise": Field(AggregationConfig, "dp"),  # no noise: no central DP
    "dp_clip": Field(DpConfig, "clip_norm"),
    "dp_delta": Field(DpConfig, "delta"),
    "local_steps": Field(CoordinatorConfig, "local_steps"),
    "batch_size": Field(CoordinatorConfig, "batch_size"),
    "seq_len": Field(CoordinatorConfig, "seq_len"),
    "lr": Field(CoordinatorConfig, "lr"),
    "method": Field(MethodSpec, "name"),
    "beta": Field(MethodSpec, "beta"),
    "sft_weight": Field(MethodSpec, "sft_weight"),
    "dpo_loss": Field(MethodSpec, "loss"),
    "max_rounds": Field(CoordinatorConfig, "max_rounds"),
    "insecure": Field(CoordinatorConfig, "tls", lambda insecure: not insecure),
    "no_mdns": Field(CoordinatorConfig, "mdns", lambda off: not off),
    "mdns_name": Field(CoordinatorConfig, "mdns_name"),
    "mdns_interface": Field(CoordinatorConfig, "mdns_interfaces", _tuple),
    "max_body_mb": Field(CoordinatorConfig, "max_body_bytes", lambda mib: int(mib * (1 << 20))),
    "rate": Field(CoordinatorConfig, "rate_per_s"),
}
COORDINATOR_CLI_ONLY = {
    "model": "the model store's DEFAULT_MODEL (checked below); the config holds its sha256",
    "host": "0.0.0.0 on purpose: the command serves the LAN (the config's 127.0.0.1 does not)",
    "db": "CoordinatorConfig.db_path has no default: the CLI's own file in the working directory",
    "strategy": "None: fedbuff (FedBuff.name), fedavg with --secure",
    "clients_per_round": "None: FedAvg.clients_per_round, or the cohort size with --secure",
    "lora_mode": "None: AggregationConfig.mode, or frozen-a with --secure",
    "no_clip": "turns AggregationConfig.clip_multiplier off",
    "join_token": f"None: ${JOIN_TOKEN_ENV}, else generated",
    "operator_token": "None: $FEDLM_OPERATOR_TOKEN, else generated",
    "log_level": "the process's logging, not part of any config",
}

TRAIN: dict[str, Field] = {
    "method": Field(TrainConfig, "method"),
    "beta": Field(TrainConfig, "beta"),
    "sft_weight": Field(TrainConfig, "sft_weight"),
    "dpo_loss": Field(TrainConfig, "dpo_loss"),
    "reference": Field(TrainConfig, "reference"),
    "steps": Field(TrainConfig, "steps"),
    "rank": Field(LoraConfig, "rank"),
    "dropout": Field(LoraConfig, "dropout"),
    "targets": Field(LoraConfig, "targets", _comma_list),
    "seq_len": Field(TrainConfig, "seq_len"),
    "batch_size": Field(TrainConfig, "batch_size"),
    "grad_accum": Field(TrainConfig, "grad_accum"),
    "lr": Field(TrainConfig, "lr"),
    "warmup": Field(TrainConfig, "warmup"),
    "seed": Field(TrainConfig, "seed"),
    "val_fraction": Field(TrainConfig, "val_fraction"),
    "eval_every": Field(TrainConfig, "eval_every"),
    "checkpoint_every": Field(TrainConfig, "checkpoint_every"),
    "precision": Field(TrainConfig, "precision"),
    "compute": Field(TrainConfig, "compute"),
    "gradient_checkpointing": Field(TrainConfig, "gradient_checkpointing"),
}
TRAIN_CLI_ONLY = {
    "model": "positional, required",
    "data": "required",
    "out": "required",
    "init_adapter": "None: a fresh adapter",
    "alpha": "None: 2 x --rank (checked below against LoraConfig's)",
    "resume": "an action of the command",
    "skip_bad": "an option of the data reader",
    "no_progress": "the command's output",
}

# Options whose CLI default is the very constant the field's default is (not a `ConfigDefault`):
# `train` imports its method defaults and the LoRA targets where TrainConfig and LoraConfig do.
SHARED_CONSTANT = {
    ("train", "method"): DEFAULT_METHOD,
    ("train", "beta"): DEFAULT_BETA,
    ("train", "sft_weight"): DEFAULT_SFT_WEIGHT,
    ("train", "dpo_loss"): DEFAULT_DPO_LOSS,
    ("train", "reference"): DEFAULT_REFERENCE,
    ("train", "targets"): ",".join(LORA_TARGETS),
}

COMMANDS = {
    "join": (JOIN, JOIN_CLI_ONLY),
    "coordinator": (COORDINATOR, COORDINATOR_CLI_ONLY),
    "train": (TRAIN, TRAIN_CLI_ONLY),
}


def _parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices[command]
    return parser


def _options(command: str) -> dict[str, argparse.Action]:
    return {a.dest: a for a in _parser(command)._actions if a.dest != "help"}


def _field_default(cls: type, name: str) -> Any:
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    raise AssertionError(f"{cls.__name__}.{name} has no default")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_tied_to_a_field_or_listed_as_the_clis_own(command: str) -> None:
    fields, own = COMMANDS[command]
    dests = set(_options(command))
    assert not dests & set(fields) & set(own), "an option is listed twice"
    unlisted = dests - set(fields) - set(own)
    assert not unlisted, f"`fedlm {command}` options tied to no config field: {sorted(unlisted)}"
    stale = (set(fields) | set(own)) - dests
    assert not stale, f"`fedlm {command}` has no options {sorted(stale)}"


@pytest.mark.parametrize(
    ("command", "dest"), [(c, d) for c, (fields, _) in sorted(COMMANDS.items()) for d in fields]
)
def test_option_default_is_its_config_fields(command: str, dest: str) -> None:
    field = COMMANDS[command][0][dest]
    action = _options(command)[dest]
    expected = _field_default(field.cls, field.name)
    got = field.from_cli(resolve(action.default))
    assert got == expected, (
        f"`fedlm {command} {action.option_strings[0]}` defaults to {action.default!r}, "
        f"{field.cls.__name__}.{field.name} to {expected!r}"
    )
    if (command, dest) in SHARED_CONSTANT:
        assert action.default == SHARED_CONSTANT[command, dest]
    elif action.default is not None and action.default is not False:
        # A default typed in the CLI (not read from the field) can drift: only the field's.
        assert isinstance(action.default, ConfigDefault), (
            f"`fedlm {command} {action.option_strings[0]}` declares its own default "
            f"{action.default!r}; take it from {field.cls.__name__}.{field.name} (ConfigDefault)"
        )
    if action.choices is not None:
        assert expected in action.choices


def test_cli_only_defaults_that_mirror_a_definition_elsewhere() -> None:
    assert _options("coordinator")["model"].default == DEFAULT_MODEL
    lora_defaults = LoraConfig()
    assert lora_defaults.alpha == 2.0 * lora_defaults.rank  # what `train` without --alpha uses
    assert _field_default(CoordinatorConfig, "host") == "127.0.0.1"  # the library: loopback
    assert _options("coordinator")["host"].default == "0.0.0.0"  # the command: the LAN


def test_clients_per_round_help_states_the_strategys_and_secaggs_numbers() -> None:
    from edge_sdk.secagg.params import MIN_COHORT

    text = _options("coordinator")["clients_per_round"].help or ""
    assert f"default: {FedAvg.clients_per_round};" in text
    assert f"max({MIN_COHORT}, --min-cohort)" in text


def test_max_body_mb_help_shows_the_configs_mib() -> None:
    action = _options("coordinator")["max_body_mb"]
    assert resolve(action.default) * (1 << 20) == _field_default(
        CoordinatorConfig, "max_body_bytes"
    )
    assert str(action.default) == "64.0"


def test_refuse_licence_help_shows_the_configs_classes() -> None:
    assert str(_options("join")["refuse_licence"].default) == "unknown"


def test_join_without_options_builds_the_default_client_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edge_sdk.cli.join_cmd import _config

    monkeypatch.delenv(JOIN_CODE_ENV, raising=False)
    args = build_parser().parse_args(["join", "model.gguf", "--data", "d.jsonl"])
    expected = ClientConfig(
        model="model.gguf", data=("d.jsonl",), state_dir=Path("~/.fedlm/client")
    )
    assert _config(args) == expected
    with_dp = build_parser().parse_args(
        ["join", "model.gguf", "--data", "d.jsonl", "--dp-clip", "0.5"]
    )
    assert _config(with_dp).local_dp == LocalDpConfig(0.5)


def test_coordinator_without_options_builds_the_default_config(tiny_gguf: Path) -> None:
    """The only difference from `CoordinatorConfig`'s defaults is the listening address."""
    from coordinator.shapes import shapes_from_gguf
    from edge_sdk.cli.coordinator_cmd import _config
    from edge_sdk.models.identity import model_sha256

    args = build_parser().parse_args(["coordinator", "--model", str(tiny_gguf)])
    expected = CoordinatorConfig(
        model_sha256=model_sha256(tiny_gguf),
        shapes=shapes_from_gguf(tiny_gguf, LORA_TARGETS),
        db_path=Path("fedlm-coordinator.sqlite"),
        model_name=tiny_gguf.name,
        join_token="j" * 16,
        host="0.0.0.0",
    )
    assert _config(args, "j" * 16) == expected
