#!/usr/bin/env bash
# Data-parallel training over MPI with real ranks on this host: builds qlora with the `mpi`
# feature and runs tests/distributed_mpi.rs, which starts `mpirun -np 2` runs and compares them
# with one-process runs (same losses and adapter, only rank 0 writes, resume, refusal of ranks
# that disagree).
#
# Needs Open MPI (mpirun, and its headers for the `mpi` crate) and libclang (the crate generates
# its bindings with bindgen). When they are missing, they are installed from the distribution's
# packages (Debian/Ubuntu: openmpi-bin libopenmpi-dev libclang-dev), as root or with sudo.
# Not part of `cargo test --workspace`: a test command should not install system packages. The
# trainer's data-parallel logic itself is tested there (tests/data_parallel.rs, ranks as threads).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

have_mpi() { command -v mpirun >/dev/null && command -v mpicc >/dev/null; }
have_libclang() { ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so'; }
if ! have_mpi || ! have_libclang; then
    echo "== installing Open MPI and libclang from the distribution's packages"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    command -v apt-get >/dev/null || {
        echo "mpi-check: no apt-get here; install Open MPI (with headers) and libclang, then rerun" >&2
        exit 1
    }
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        openmpi-bin libopenmpi-dev libclang-dev
fi
echo "== $(mpirun --version | head -n 1)"
echo "== cargo test --release --features mpi --test distributed_mpi"
# The test runs target/release/qlora: build that binary with the feature first (a build without
# it, e.g. by `cargo test`, puts the plain binary there).
cargo build --release --features mpi --bin qlora
cargo test --release --features mpi --test distributed_mpi
echo "== mpi-check: ok in $((SECONDS - start)) s"
