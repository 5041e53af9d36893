#!/usr/bin/env bash
# Start a coordinator for the embedded default model: FedBuff (aggregate every 3 updates),
# exact LoRA aggregation, clients asked for 4-bit + deflate updates. TLS is on; the join code
# for the devices is printed at start. $FEDLM_JOIN_TOKEN keeps the same code across restarts.
set -euo pipefail
exec fedlm coordinator \
    --model smollm2-135m \
    --db "${DB:-fed.sqlite}" \
    --port "${PORT:-8750}" \
    --strategy fedbuff --buffer-size 3 \
    --lora-mode exact --rank 8 \
    --codec "int4:128+zlib" \
    --local-steps 20 --seq-len 128 --batch-size 4 \
    "$@"
