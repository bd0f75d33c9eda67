#!/usr/bin/env bash
# Compile-check the CUDA backend on any Linux x86-64 machine, GPU or not:
#   1. the kernels in quant/kernels/*.cu to PTX for sm_80 (Ampere: A100, RTX 30xx) and sm_90
#      (Hopper), then each PTX through ptxas to machine code (catches what PTX alone accepts:
#      register/shared-memory limits), printing register use per kernel;
#   2. `cargo build --release --features cuda,nccl` (candle with CUDA, its kernels, our PTX via
#      build.rs, the device-side optimizer and paged state, the NCCL collective, the qlora
#      binary) and the test binaries, into target/cuda (apart from the CPU build, whose
#      target/release/qlora it would otherwise replace);
#   3. the GPU tests, which run on a GPU and report that they skip without one.
# The toolkit comes from scripts/cuda-env.sh (PyPI wheels, cached in ~/.cache/qlora/cuda; NCCL
# is linked against a stub). Logs: target/cuda-check/. CUDA_COMPUTE_CAP (default 80) picks the
# arch cargo builds for. scripts/gpu-check.sh reuses this build on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cuda-env.sh
source scripts/cuda-env.sh
out=target/cuda-check
mkdir -p "$out"
start=$SECONDS

echo "== nvcc: $(nvcc --version | tail -n 1)"
for cu in quant/kernels/*.cu; do
    name=$(basename "$cu" .cu)
    for arch in 80 90; do
        nvcc -ptx -std=c++17 -O3 --expt-relaxed-constexpr -arch=sm_$arch \
            -o "$out/$name.sm_$arch.ptx" "$cu"
        ptxas -arch=sm_$arch -v -o "$out/$name.sm_$arch.cubin" "$out/$name.sm_$arch.ptx" \
            2>"$out/$name.sm_$arch.ptxas.log"
        if grep -Eq '[1-9][0-9]* bytes (stack frame|spill)' "$out/$name.sm_$arch.ptxas.log"; then
            echo "FAIL $name sm_$arch: local-memory stack or spills (see $out/$name.sm_$arch.ptxas.log)"
            exit 1
        fi
        regs=$(grep -o 'Used [0-9]* registers' "$out/$name.sm_$arch.ptxas.log" | sort -u | tr '\n' ' ')
        echo "ok   $name sm_$arch (no stack, no spills; $regs)"
    done
done
echo "== kernels: $((SECONDS - start)) s"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
echo "== cargo build --release --features cuda,nccl into $CARGO_TARGET_DIR (log: $out/cargo-build.log)"
cargo build --release --workspace --features cuda,nccl --all-targets >"$out/cargo-build.log" 2>&1 || {
    tail -n 40 "$out/cargo-build.log"
    exit 1
}
echo "== build: $((SECONDS - start)) s"

# Same package and feature selection as the build above, so nothing is rebuilt (a narrower
# `-p qlora-quant` selection resolves features differently and recompiles candle's kernels).
echo "== GPU tests (they skip without a device)"
cargo test --release --workspace --features cuda,nccl --tests -- gpu_ --nocapture 2>&1 |
    tee "$out/gpu-tests.log" | grep -E 'skipping|test result|^test ' || true
grep -q 'test result: ok' "$out/gpu-tests.log"
echo "== check-cuda: ok in $((SECONDS - start)) s"
