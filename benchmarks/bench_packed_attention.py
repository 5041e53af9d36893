"""Packed-sequence attention on CPU: one masked SDPA call against a loop over the examples.

Both compute the same thing: every packed example attends causally to itself only (issue 16,
part 1). Shapes are SmolLM2-135M's attention (9 query heads, 3 KV heads, head dim 64) at
sequence 256, batch 4, forward + backward, for each layer of the model (30). The examples'
lengths are drawn from `--mean-len` (the demo's chat examples are 40-90 tokens).

- `causal`: today's unmasked `is_causal=True` call (contaminated; the cost baseline);
- `mask`: one SDPA call with a (B, 1, T, T) boolean block-diagonal causal mask;
- `loop`: one `is_causal=True` SDPA call per (row, example) slice, outputs concatenated;
- `split`: the same calls, the examples cut out of the (B*T)-token axis by one `split` (what
  `Attention._packed` does: a slice's backward zero-fills a tensor of the whole input per
  example, `split`'s is one `cat`).

`torch.nn.attention.varlen.varlen_attn` would be the third candidate, but in torch 2.13 it
has no CPU kernel (`aten::_flash_attention_forward` is CUDA only).

Run: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_packed_attention.py [--reps 7]`
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F


def segments(batch: int, seq_len: int, mean_len: int, seed: int) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) of each packed example (lengths ~ U(mean/2, 3*mean/2))."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        row, start = [], 0
        while start < seq_len:
            n = int(rng.integers(mean_len // 2, 3 * mean_len // 2 + 1))
            row.append((start, min(seq_len, start + n)))
            start += n
        rows.append(row)
    return rows


def block_mask(rows: list[list[tuple[int, int]]], seq_len: int) -> torch.Tensor:
    seg = torch.zeros(len(rows), seq_len, dtype=torch.long)
    for b, row in enumerate(rows):
        for i, (s, e) in enumerate(row):
            seg[b, s:e] = i
    idx = torch.arange(seq_len)
    causal = idx[:, None] >= idx[None, :]  # (T, T)
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # (B, 1, T, T)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--mean-len", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    B, T, nh, nkv, hd = args.batch, args.seq_len, 9, 3, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, nh, T, hd, generator=g, requires_grad=True)
    k = torch.randn(B, nkv, T, hd, generator=g, requires_grad=True)
    v = torch.randn(B, nkv, T, hd, generator=g, requires_grad=True)
    go = torch.randn(B, nh, T, hd, generator=g)
    rows = segments(B, T, args.mean_len, 0)
    mask = block_mask(rows, T)

    def causal() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def masked() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def loop() -> torch.Tensor:
        out = []
        for b, row in enumerate(rows):
            out.append(
                torch.cat(
                    [
                        F.scaled_dot_product_attention(
                            q[b : b + 1, :, s:e],
                            k[b : b + 1, :, s:e],
                            v[b : b + 1, :, s:e],
                            is_causal=True,
                            enable_gqa=True,
                        )
                        for s, e in row
                    ],
                    dim=2,
                )
            )
        return torch.cat(out, dim=0)

    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
    lengths = [e - s for row in rows for s, e in row]

    def split() -> torch.Tensor:
        pieces = zip(*(t.flatten(0, 1).split(lengths) for t in (qt, kt, vt)))
        y = [
            F.scaled_dot_product_attention(
                *(t.transpose(0, 1).unsqueeze(0) for t in qkv), is_causal=True, enable_gqa=True
            )[0].transpose(0, 1)
            for qkv in pieces
        ]
        return torch.cat(y).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd) like the others

    torch.testing.assert_close(masked(), loop(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked(), split(), rtol=1e-5, atol=1e-5)

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        def once() -> None:
            for _ in range(args.layers):
                fn().backward(go)

        once()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    n_ex = sum(len(r) for r in rows)
    print(
        f"B={B} T={T} heads {nh}/{nkv} hd {hd}, {n_ex} examples, {args.layers} layers fwd+bwd, "
        f"median of {args.reps}, threads {torch.get_num_threads()}"
    )
    # Interleave the candidates so that a busy spell on a shared machine hits all of them.
    results: dict[str, list[float]] = {"causal": [], "mask": [], "loop": [], "split": []}
    fns = {"causal": causal, "mask": masked, "loop": loop, "split": split}
    for _ in range(3):
        for name, fn in fns.items():
            results[name].append(timed(fn))
    base = statistics.median(results["causal"])
    for name, ts in results.items():
        med = statistics.median(ts)
        print(
            f"{name:7s} {med * 1000:8.1f} ms  ({med / base:.2f}x causal; rounds "
            f"{', '.join(f'{t * 1000:.0f}' for t in ts)} ms)"
        )


if __name__ == "__main__":
    main()
