"""What a user would write instead of `fedlm train MODEL --data FILE.txt`: HF transformers + peft +
bitsandbytes QLoRA on a text file, as one script (issue 16's whole-process baseline).

The same work as `fedlm train` with its defaults: tokenize the file (the GGUF's own tokenizer,
converted by transformers), cut it into `--seq-len` blocks (the usual `group_texts` recipe),
hold out 10 % for evaluation, evaluate, train `--steps` steps of `--batch-size` blocks with
LoRA r=`--rank` on the 7 projections of an NF4 base (`benchmarks/hf_qlora.py`), evaluate again,
save the adapter. It prints the same summary line as `fedlm train`
("trained N steps, T tokens in S s (X tokens/s)"), so `bench_train_cli.py` reads both alike.

Run (repository root on PYTHONPATH):
`.venv/bin/python benchmarks/hf_train_script.py --data FILE.txt --out DIR --steps 8`
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from transformers import AutoTokenizer

from benchmarks.hf_qlora import hf_qlora
from edge_sdk.models import resolve


def _blocks(path: str, tokenizer, seq_len: int) -> torch.Tensor:
    """(n, seq_len) token blocks of the whole file, the remainder dropped."""
    with open(path, encoding="utf-8") as f:
        ids = tokenizer(f.read())["input_ids"]
    n = len(ids) // seq_len
    if n < 2:
        raise SystemExit(f"{path}: {len(ids)} tokens, fewer than two blocks of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def _eval_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean loss over `blocks`, in train mode (no dropout here, so the values are eval mode's).

    Not `model.eval()`: on a CPU with AVX512-BF16 (this one), bitsandbytes 0.50's `Linear4bit`
    repacks its weight for a bf16 inference kernel at its first eval-mode forward, and from
    then on passes no gradient to its input (x.grad stays None: `tests/benchmarks/
    test_hf_baseline.py`). HF's training after such an evaluation measured 1.9x faster per
    step because it skips the base's input-gradient GEMMs: wrong gradients, not a faster stack.
    """
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch_size) if len(b)]
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    args = ap.parse_args()

    gguf = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf)
    )
    blocks = _blocks(args.data, tokenizer, args.seq_len)
    n_val = max(1, math.ceil(0.1 * len(blocks)))
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(blocks), generator=gen)
    val, train = blocks[order[:n_val]], blocks[order[n_val:]]
    print(f"data: {len(train)} train / {len(val)} val blocks of {args.seq_len} tokens", flush=True)

    model = hf_qlora(gguf, args.rank, 2.0 * args.rank)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    before = _eval_loss(model, val, args.batch_size)

    tokens, seconds, loss = 0, 0.0, float("nan")
    history = []
    for step in range(args.steps):
        i = (step * args.batch_size) % len(train)
        batch = train[i : i + args.batch_size]
        t0 = time.perf_counter()
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        seconds += dt
        tokens += batch.numel()
        loss = out.loss.item()
        history.append({"step": step + 1, "loss": loss, "tokens_per_s": batch.numel() / dt})
    after = _eval_loss(model, val, args.batch_size)
    model.save_pretrained(args.out)
    # The per-step records `fedlm train` writes too (bench_train_cli.py reads both alike).
    with open(os.path.join(args.out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump({"metrics": {"history": history}}, f)
    print(
        f"trained {args.steps} steps, {tokens} tokens in {seconds:.1f} s "
        f"({tokens / seconds:.0f} tokens/s); final train loss {loss:.4f}"
    )
    print(f"eval loss {before:.4f} -> {after:.4f}")


if __name__ == "__main__":
    main()
