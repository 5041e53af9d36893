"""DemoConfig: presets and validation."""

from __future__ import annotations

import pytest

from edge_sdk.demo.config import DemoConfig


def test_presets_keep_the_steps_per_client_of_their_schedule() -> None:
    full, quick = DemoConfig.full(), DemoConfig.quick()
    assert full.total_local_steps == full.rounds * full.local_steps == 16
    assert quick.total_local_steps < full.total_local_steps
    assert quick.task_config().num_families == 4


@pytest.mark.parametrize(
    "field,value",
    [
        ("rounds", 0),
        ("local_steps", -1),
        ("lr", 0.0),
        ("mode", "mean"),
        ("seq_len", 8),
        ("threads", 0),
        ("precision", "int8"),
        ("compute", "fp16"),
        ("own_fraction", 2.0),
    ],
)
def test_bad_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        DemoConfig(**{field: value})  # type: ignore[arg-type]


def test_bad_codec_is_refused() -> None:
    from edge_sdk.wire import WireError

    with pytest.raises(
        (ValueError, WireError), match=r"unknown codec stage 'int3' in 'delta\+int3'"
    ):
        DemoConfig(codec="delta+int3")


def test_compute_reaches_every_run_of_the_demo() -> None:
    """`fedlm demo --compute bf16`: the in-process runs' TrainConfig and each networked
    client's `fedlm join` command line carry it; it needs the NF4 base."""
    from edge_sdk.demo.simulate import train_config

    config = DemoConfig.quick().replace(compute="bf16")
    assert train_config(config, 2).compute == "bf16"
    assert train_config(DemoConfig.quick(), 2).compute == "auto"  # resolved where a run starts
    assert train_config(DemoConfig.quick().replace(compute="fp32"), 2).compute == "fp32"
    with pytest.raises(ValueError, match="`compute` bf16 applies to an NF4 base"):
        DemoConfig(compute="bf16", precision="fp32")
