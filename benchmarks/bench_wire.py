"""Wire-format benchmark: bytes, encode/decode time and reconstruction error per codec.

Subject: an adapter shaped like SmolLM2-135M with r=8 on all 7 linear projections of its 30
layers (2,442,240 parameters). Baseline: the fp32 PEFT state dict as safetensors bytes, which is
what FlowerTune-style clients send. Values are realistic rather than compressible: lora_A is
kaiming-uniform (PEFT's init, bound 1/sqrt(in)), lora_B a small gaussian.

    .venv/bin/python benchmarks/bench_wire.py [--repeats 5] [--rounds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
from safetensors.numpy import save as safetensors_save

from edge_sdk.wire import AdapterUpdate, LoraSpec, UpdateEncoder

LAYERS = 30
RANK = 8
SHA = "0" * 64
# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads / 3 kv heads of 64 -> k/v out 192.
PROJECTIONS = {  # module path -> (out_features, in_features)
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
CODECS = [
    "fp32",
    "fp16",
    "bf16",
    "int8",
    "nf4",
    "int4",
    "nf4+zlib",
    "nf4:256+zlib",
    "nf4:1024+zlib",
    "int4+zlib",
    "int4:128+zlib",
    "int4:256+zlib",
    "int8+zlib",
    "topk:0.05+int8",
    "topk:0.01+int8",
    "topk:0.01+nf4",
    "delta+topk:0.01+int8",
    "topk:0.05+int8+zlib",
]
LORA = LoraSpec(rank=RANK, alpha=16.0, targets=tuple(p.split(".")[1] for p in PROJECTIONS))


def make_adapter(seed: int, b_std: float = 0.01) -> dict[str, np.ndarray]:
    """lora_A (r, in) ~ U(-1/sqrt(in), 1/sqrt(in)); lora_B (out, r) ~ N(0, b_std^2)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(LAYERS):
        for mod, (d_out, d_in) in PROJECTIONS.items():
            key = f"model.layers.{layer}.{mod}"
            bound = 1.0 / np.sqrt(d_in)
            out[f"{key}.lora_A"] = rng.uniform(-bound, bound, (RANK, d_in)).astype(np.float32)
            out[f"{key}.lora_B"] = (rng.standard_normal((d_out, RANK)) * b_std).astype(np.float32)
    return out


def peft_safetensors_bytes(tensors: dict[str, np.ndarray]) -> int:
    """Size of the fp32 PEFT adapter_model.safetensors for the same tensors."""
    peft = {f"base_model.model.{k}.weight": v for k, v in tensors.items()}
    return len(safetensors_save(peft))


def rel_l2(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in b)
    den = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)
    return float(np.sqrt(num / den))


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build(
    tensors: dict[str, np.ndarray], encoder: UpdateEncoder, reference: dict | None = None
) -> AdapterUpdate:
    return AdapterUpdate.build(
        client_id="bench",
        base_version=1,
        model_sha256=SHA,
        lora=LORA,
        tensors=tensors,
        num_examples=1000,
        encoder=encoder,
        reference=reference,
        update_id="u",
    )


def bench_codec(codec: str, adapter: dict, previous: dict, baseline: int, repeats: int) -> dict:
    """One update of `adapter`; delta codecs are taken against `previous` (the last global)."""
    reference = previous if codec.startswith("delta") else None
    stateless = UpdateEncoder(codec, error_feedback=False)
    data = build(adapter, stateless, reference).to_bytes()
    decoded = AdapterUpdate.from_bytes(data).dense_tensors(reference)
    row = {
        "codec": codec,
        "bytes": len(data),
        "ratio": baseline / len(data),
        "encode_ms": median_ms(lambda: build(adapter, stateless, reference).to_bytes(), repeats),
        "decode_ms": median_ms(
            lambda: AdapterUpdate.from_bytes(data).dense_tensors(reference), repeats
        ),
        "rel_l2": rel_l2(decoded, adapter),
    }
    if reference is not None:  # error relative to what changed, the quantity actually coded
        change = {k: adapter[k] - previous[k] for k in adapter}
        row["rel_l2_of_change"] = rel_l2({k: decoded[k] - previous[k] for k in adapter}, change)
    return row


def bench_error_feedback(codec: str, rounds: int) -> dict:
    """Sum of `rounds` independent updates sent through `codec`, with and without error feedback."""
    updates = [make_adapter(100 + r) for r in range(rounds)]
    total = {k: np.sum([u[k] for u in updates], axis=0) for k in updates[0]}
    out = {}
    for ef in (True, False):
        enc = UpdateEncoder(codec, error_feedback=ef)
        sent = {k: np.zeros_like(v) for k, v in total.items()}
        for u in updates:
            for k, t in build(u, enc).tensors.items():
                sent[k] += t.decode()
        out["with_ef" if ef else "without_ef"] = rel_l2(sent, total)
    return out


def bench_frozen_a(codec: str, adapter: dict, baseline: int) -> dict:
    """frozen-a mode: A is regenerated from a shared seed, so an update carries only lora_B."""
    only_b = {k: v for k, v in adapter.items() if k.endswith("lora_B")}
    lora = LoraSpec(RANK, 16.0, LORA.targets, mode="frozen-a", a_seed=0)
    data = AdapterUpdate.build(
        client_id="bench",
        base_version=1,
        model_sha256=SHA,
        lora=lora,
        tensors=only_b,
        num_examples=1000,
        codec=codec,
        update_id="u",
    ).to_bytes()
    decoded = AdapterUpdate.from_bytes(data).dense_tensors()
    return {
        "codec": f"frozen-a, B only, {codec}",
        "bytes": len(data),
        "ratio": baseline / len(data),
        "rel_l2": rel_l2(decoded, only_b),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (median reported)")
    parser.add_argument(
        "--rounds", type=int, default=10, help="rounds of the error-feedback comparison"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    adapter = make_adapter(0)
    # The previous global: the same adapter before a local round changed it by ~10%.
    rng = np.random.default_rng(1)
    previous = {
        k: v - (0.1 * np.std(v) * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in adapter.items()
    }
    n_params = sum(v.size for v in adapter.values())
    baseline = peft_safetensors_bytes(adapter)

    rows = [bench_codec(c, adapter, previous, baseline, args.repeats) for c in CODECS]
    frozen = [bench_frozen_a(c, adapter, baseline) for c in ("int8", "nf4")]
    ef = {c: bench_error_feedback(c, args.rounds) for c in ("topk:0.01+int8", "topk:0.05+int8")}

    print(
        f"adapter: {len(adapter)} tensors, {n_params:,} parameters; "
        f"fp32 PEFT safetensors: {baseline:,} bytes\n"
    )
    print("| codec | bytes | vs fp32 safetensors | encode ms | decode ms | rel. L2 error |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        err = f"{r['rel_l2']:.2e}"
        if "rel_l2_of_change" in r:
            err += f" (of the change: {r['rel_l2_of_change']:.2e})"
        print(
            f"| `{r['codec']}` | {r['bytes']:,} | {r['ratio']:.1f}x | {r['encode_ms']:.0f} | "
            f"{r['decode_ms']:.0f} | {err} |"
        )
    for r in frozen:
        print(f"| {r['codec']} | {r['bytes']:,} | {r['ratio']:.1f}x | | | {r['rel_l2']:.2e} |")
    print(f"\nerror feedback: rel. L2 error of the sum of {args.rounds} independent updates")
    print("| codec | with error feedback | without |")
    print("|---|---:|---:|")
    for c, v in ef.items():
        print(f"| `{c}` | {v['with_ef']:.3f} | {v['without_ef']:.3f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "params": n_params,
                    "baseline_bytes": baseline,
                    "codecs": rows,
                    "frozen_a": frozen,
                    "error_feedback": ef,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
