"""A real federation on 127.0.0.1 hot-swaps each global adapter into the ONNX backend.

The client's runtime is an `OnnxEdgeModel` of the exported tiny model: the client writes every
new global adapter as GGUF and calls `runtime.load_adapter(path, wait=...)`, which converts it to
`.onnx_adapter` on the device. The served logits are then checked against our torch model with
that same GGUF adapter merged in.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(400)


def test_federation_hot_swaps_into_the_onnx_backend(tmp_path: Path) -> None:
    import torch

    from coordinator.server import Service
    from coordinator.strategies import FedBuff
    from edge_sdk.adapters.gguf_lora import read_gguf_lora
    from edge_sdk.client import FederatedClient
    from edge_sdk.models.loader import load_model
    from edge_sdk.onnx.export import export_onnx
    from edge_sdk.onnx.runtime import OnnxEdgeModel
    from tests.client.helpers import client_config, coordinator_config, write_data
    from tests.tiny_models import write_tiny_gguf

    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = export_onnx(model, tmp_path / "onnx", precision="fp32")
    runtime = OnnxEdgeModel(folder, n_threads=1)
    data = write_data(tmp_path / "data.jsonl")
    tokens = [1, 270, 280, 290, 10, 100]

    async def scenario():
        config = coordinator_config(tmp_path, model, strategy=FedBuff(buffer_size=1), max_rounds=2)
        async with Service(config) as service:
            cfg = client_config(tmp_path / "state", model, data, service=service)
            client = FederatedClient(cfg, runtime=runtime)
            return await asyncio.wait_for(client.run_async(), timeout=300)

    try:
        base = runtime.next_token_logits(tokens)
        summary = asyncio.run(scenario())
        assert summary.reason == "task_complete" and summary.global_version == 2
        assert summary.adapter_path is not None
        assert runtime.adapter_path == summary.adapter_path  # the newest global adapter is served
        served = runtime.next_token_logits(tokens)
    finally:
        runtime.close()

    lora = read_gguf_lora(summary.adapter_path)
    torch_model = load_model(model, precision="fp32")
    with torch.no_grad():
        want_base = torch_model(torch.tensor([tokens])).numpy()[0, -1]
        for key in {k.rpartition(".")[0] for k in lora.tensors}:
            delta = lora.tensors[f"{key}.lora_B"] @ lora.tensors[f"{key}.lora_A"]
            torch_model.get_submodule(key).weight += lora.scale * torch.from_numpy(delta)
        want = torch_model(torch.tensor([tokens])).numpy()[0, -1]
    assert np.abs(base - want_base).max() < 1e-4
    assert np.abs(served - want).max() < 1e-4
    assert np.abs(served - base).max() > 1e-3  # the federated adapter really changed the model


def test_cli_join_backend_onnx_serves_and_swaps(tmp_path: Path) -> None:
    """`fedlm join --backend onnx --serve-model DIR` as a real process against a real
    coordinator on 127.0.0.1: the ONNX runtime hot-swaps every global version while the device
    trains, and at the end serves the newest one (the adapter file the client wrote)."""
    import os
    import re
    import sys

    from coordinator.server import Service
    from coordinator.strategies import FedBuff
    from edge_sdk.onnx.export import export_onnx
    from tests.client.helpers import coordinator_config, join_code, write_data
    from tests.tiny_models import write_tiny_gguf

    repo = Path(__file__).resolve().parents[2]
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = export_onnx(model, tmp_path / "onnx", precision="fp32")
    data = write_data(tmp_path / "data.jsonl")
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FEDLM_JOIN_TOKEN", None)
    join = [sys.executable, "-m", "edge_sdk.cli", "join", str(model), "--data", str(data)]

    async def scenario() -> tuple[int, str, str, int]:
        config = coordinator_config(tmp_path, model, strategy=FedBuff(buffer_size=1))
        async with Service(config) as service:
            proc = await asyncio.create_subprocess_exec(
                *join, "--coordinator", service.url, "--join-code", join_code(service),
                "--max-rounds", "2", "--state-dir", str(tmp_path / "state"), "--precision",
                "fp32", "--threads", "1", "--backend", "onnx", "--serve-model", str(folder),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), timeout=300)
            return proc.returncode or 0, out.decode(), err.decode(), service.coordinator.version

    code, out, err, version = asyncio.run(scenario())
    assert code == 0, err[-2000:]
    assert version >= 2
    swaps = [int(v) for v in re.findall(r"runtime now serves global version (\d+)", err)]
    assert len(swaps) >= 2 and swaps == sorted(swaps), err[-2000:]  # it kept swapping, in order
    final = re.search(r"global version (\d+), adapter (\S+)", out)
    assert final is not None, out
    assert swaps[-1] == int(final.group(1))
    assert f"onnx runtime served: {final.group(2)}" in out  # the newest global, not an old one

    # A usage error names the missing flag and the command that makes the folder.
    bad = subprocess.run(
        [*join, "--coordinator", "http://127.0.0.1:9", "--insecure", "--backend", "onnx"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "--serve-model" in bad.stderr and "fedlm export-onnx" in bad.stderr
