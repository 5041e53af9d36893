"""Run onnxruntime-genai's model builder with a Gemma 3 config shim (a child-process entry point).

Usage: python -m edge_sdk.onnx.builder_shim <model builder arguments>

transformers 5 stores Gemma 3's RoPE settings per layer type
(`rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}`); the builder's
`make_rope_init` reads `rope_parameters["rope_type"]` and fails with `KeyError: 'rope_type'`
(issue 13). The shim hands it the full-attention entry and sets the flat `rope_theta` /
`rope_local_base_freq` the Gemma 3 builder reads, then runs the builder unchanged.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any


def _patch() -> None:
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path)
    from builders import base

    original = base.Model.make_rope_init

    def make_rope_init(self: Any, config: Any) -> None:
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict) and "full_attention" in params and "rope_type" not in params:
            full: dict[str, Any] = params["full_attention"]
            local: dict[str, Any] = params.get("sliding_attention", full)
            config.rope_theta = full.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            config.rope_local_base_freq = local.get("rope_theta", config.rope_theta)
            config.rope_parameters = dict(full)
            try:
                original(self, config)
            finally:
                config.rope_parameters = params
            return
        original(self, config)

    base.Model.make_rope_init = make_rope_init


def main(argv: list[str]) -> None:
    _patch()
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
