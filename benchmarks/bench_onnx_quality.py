"""What the int4 ONNX export costs: top-1 agreement and KL against fp32 torch and llama.cpp.

    python benchmarks/bench_onnx_quality.py --model smollm2-135m DIR [DIR ...]

Each DIR is a `fedlm export-onnx` folder of `--model`. On a few fixed texts (prose, code, a chat
turn; every position teacher-forced) the next-token distributions of

- our fp32 torch forward of the GGUF (`load_model(..., precision="fp32")`): the reference the
  export starts from (the GGUF's 4-bit weights dequantized exactly);
- llama.cpp on the same GGUF (what the llama.cpp backend serves);
- each ONNX folder, run by core onnxruntime (one prefill over the whole text);

are compared pairwise: top-1 agreement (share of positions where the argmax is the same) and
mean KL(reference ‖ candidate) in nats. `measure()` is what the slow tests call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXTS = (
    (
        "The history of the city goes back many centuries. Merchants came from the coast, farmers "
        "from the hills, and scholars from distant universities. In the old market square, the "
        "cathedral and the town hall still face each other, as they have since the fourteenth "
        "century."
    ),
    (
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
        "    return a\n\nprint([fibonacci(i) for i in range(10)])\n"
    ),
    (
        "Photosynthesis converts light energy into chemical energy. Plants absorb carbon dioxide "
        "and water, and with sunlight they produce glucose and oxygen. The process happens in the "
        "chloroplasts, which contain the green pigment chlorophyll."
    ),
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean KL(ref ‖ got) over the rows of two (T, vocab) logit arrays."""
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "top1": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "kl": float(kl.mean()),
        "positions": int(ref.shape[0]),
    }


def torch_logits(gguf: Path, texts: list[list[int]]) -> list[np.ndarray]:
    import torch

    from edge_sdk.models.loader import load_model

    model = load_model(gguf, precision="fp32")
    with torch.no_grad():
        return [model(torch.tensor([t])).numpy()[0] for t in texts]


def llama_logits(gguf: Path, texts: list[list[int]], threads: int) -> list[np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=512, logits_all=True, n_threads=threads, verbose=False
    )
    out = []
    for t in texts:
        llm.reset()
        llm.eval(t)
        out.append(np.array(llm.scores[: len(t)], dtype=np.float32))
    llm.close()
    return out


def onnx_logits(folder: Path, texts: list[list[int]], threads: int) -> list[np.ndarray]:
    """Teacher-forced logits of an export via core onnxruntime (empty KV cache, one prefill)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(folder / "model.onnx"), opts)
    model = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    kv, head = model["num_key_value_heads"], model["head_size"]
    # Sliding-window layers (Gemma 3) refuse a KV buffer smaller than their window, even when
    # it is empty: give them a zeroed buffer of window size (the attention mask says 0 of it is
    # filled, as genai's shared buffer does).
    window = int((model.get("sliding_window") or {}).get("window_size") or 0)
    out = []
    for t in texts:
        ids = np.array([t], dtype=np.int64)
        capacity = max(window, len(t)) if window else 0
        past = {
            i.name: np.zeros((1, kv, capacity, head), np.float32)
            for i in sess.get_inputs()
            if i.name.startswith("past_key_values.")
        }
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **past}
        out.append(sess.run(["logits"], feeds)[0][0])
    return out


def tokenize(gguf: Path, extra: list[str] | None = None) -> list[list[int]]:
    """The texts in the GGUF's own tokenizer (with BOS where the model adds one)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode(), add_bos=True) for t in [*TEXTS, *(extra or [])]]
    finally:
        llm.close()


def measure(
    gguf: Path, folders: dict[str, Path], threads: int = 2, cache: Path | None = None
) -> dict[str, dict]:
    """{pair: {top1, kl, positions}} for torch fp32 vs llama.cpp and vs each folder, and
    llama.cpp vs each folder (all positions of all texts pooled).

    `cache` (.npz) keeps the torch and llama.cpp logits between runs of the same GGUF.
    """
    texts = tokenize(gguf)
    if cache is not None and cache.is_file():
        saved = np.load(cache)
        ref, llama = saved["torch"], saved["llama"]
    else:
        ref = np.concatenate(torch_logits(gguf, texts))
        llama = np.concatenate(llama_logits(gguf, texts, threads))
        if cache is not None:
            np.savez(cache, torch=ref, llama=llama)
    res = {"llama.cpp vs torch fp32": compare(ref, llama)}
    for tag, folder in folders.items():
        got = np.concatenate(onnx_logits(folder, texts, threads))
        res[f"{tag} vs torch fp32"] = compare(ref, got)
        res[f"{tag} vs llama.cpp"] = compare(llama, got)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("folders", nargs="+", type=Path, help="fedlm export-onnx folders (TAG=DIR ok)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--cache", type=Path, help=".npz keeping the torch/llama.cpp logits")
    args = p.parse_args()
    from edge_sdk.models.store import resolve

    folders = {}
    for f in args.folders:
        tag, _, path = str(f).rpartition("=")
        folders[tag or Path(path).name] = Path(path)
    res = measure(resolve(args.model), folders, args.threads, args.cache)
    print(f"model {args.model}; {next(iter(res.values()))['positions']} positions")
    print(f"{'pair':42}{'top-1':>8}{'mean KL':>10}")
    for pair, r in res.items():
        print(f"{pair:42}{r['top1']:8.3f}{r['kl']:10.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
