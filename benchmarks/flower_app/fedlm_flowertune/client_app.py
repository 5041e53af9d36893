"""FlowerTune-style ClientApp: HF transformers + peft + bitsandbytes QLoRA on one partition.

What the FlowerTune LLM template does, on the fedlm-edge demo task:
- `client_fn`-style: the model is built inside the train handler (a Flower ClientApp handles
  one message per process in deployment, so nothing survives between rounds);
- the base is the same SmolLM2 GGUF the fedlm clients run, loaded with
  `AutoModelForCausalLM.from_pretrained(gguf_file=...)` in fp32, every decoder `nn.Linear`
  swapped for an NF4 `bnb.nn.Linear4bit` (what `BitsAndBytesConfig(load_in_4bit=True)` builds;
  HF refuses GGUF + quantization_config), then `peft.get_peft_model` (r, alpha, all 7
  projections, no dropout): benchmarks/hf_qlora.py, shared with benchmarks/bench_train.py;
- the global adapter arrives as an fp32 `ArrayRecord` of `get_peft_model_state_dict` and the
  trained one leaves the same way; FedAvg weighs by "num-examples".

The data is the fedlm client's own pipeline (`edge_sdk.training.data.build_dataset`, the same
packed 64-token sequences of the same partition file), the optimizer the fedlm trainer's
(AdamW, betas 0.9/0.999, no weight decay, constant lr, grad-norm clip 1.0), so that only the
stack differs. Each call appends one JSON line of timings to the node's `timings-path`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _process_start_epoch() -> float:
    """Wall-clock time this process started (from /proc, so interpreter start counts)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rpartition(")")[2].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")


@app.train()
def train(msg: Message, context: Context) -> Message:
    marks = {"process_start": _process_start_epoch(), "handler": time.time()}
    import numpy as np
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from edge_sdk.training.data import DataConfig, build_dataset
    from edge_sdk.training.tokenizer import load_tokenizer

    marks["imports"] = time.time()
    run = context.run_config
    node = context.node_config
    cfg = msg.content["config"]
    server_round = int(cfg["server-round"])
    partition = int(node["partition-id"])
    threads = int(node.get("threads", 1))
    torch.set_num_threads(threads)
    torch.manual_seed(int(run["seed"]) * 1000 + partition)
    rank, alpha = int(run["rank"]), float(run["alpha"])

    # Imported here: transformers, peft and bitsandbytes load with it (the model-load phase).
    from benchmarks.hf_qlora import hf_qlora

    model = hf_qlora(str(run["gguf"]), rank, alpha)
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    marks["model_loaded"] = time.time()
    # The same packed sequences as the fedlm client; a new order every round.
    dataset = build_dataset(
        [str(node["data-path"])],
        load_tokenizer(str(run["gguf"])),
        DataConfig(seq_len=int(run["seq-len"]), val_fraction=0.0, seed=int(run["seed"])),
    )
    seed = int(run["seed"]) * 1_000_003 + partition * 10_007 + server_round
    order_seed_dataset = dataclasses.replace(dataset, seed=seed)
    marks["data_ready"] = time.time()

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(run["lr"]), betas=(0.9, 0.999), eps=1e-8)
    model.train()
    batch_size, steps = int(run["batch-size"]), int(run["local-steps"])
    losses = []
    for step in range(steps):
        if step == 0:
            marks["first_step"] = time.time()
        batch = order_seed_dataset.train_batch(step * batch_size, batch_size)
        out = model(
            input_ids=torch.from_numpy(batch.ids),
            labels=torch.from_numpy(batch.labels),
            position_ids=torch.from_numpy(batch.positions),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    marks["trained"] = time.time()

    state = get_peft_model_state_dict(model)
    arrays = ArrayRecord({k: v.detach().float() for k, v in state.items()})  # fp32 state_dict
    metrics = MetricRecord(
        {"num-examples": steps * batch_size, "train-loss": float(np.mean(losses))}
    )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "round": server_round,
        "partition": partition,
        "pid": os.getpid(),
        "marks": marks,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024.0,
        "train_loss": float(np.mean(losses)),
    }
    with open(str(node["timings-path"]), "a") as f:
        f.write(json.dumps(record) + "\n")
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
