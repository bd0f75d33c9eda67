#!/usr/bin/env bash
# The Python reference stack (torch 2.15.0, transformers 5.23.0, PEFT 0.21.2, bitsandbytes
# 0.50.2: the versions of ANCHORS.md and tests/fixtures) in a virtualenv cached outside git,
# from PyPI only (~3.5 GB with torch's CUDA dependencies, which its PyPI wheel needs even on a
# CPU). Prints the virtualenv's python; `cargo bench --bench train` runs PEFT through it when
# QLORA_BENCH_PEFT_PYTHON names it:
#
#   QLORA_BENCH_PEFT_PYTHON=$(scripts/peft-baseline.sh) cargo bench --bench train
set -euo pipefail
VENV="${QLORA_CACHE:-$HOME/.cache/qlora}/peft-venv"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import peft, bitsandbytes, gguf" 2>/dev/null; then
    python3 -m venv "$VENV" >&2
    "$VENV/bin/pip" install --quiet torch==2.15.0 transformers==5.23.0 peft==0.21.2 \
        bitsandbytes==0.50.2 accelerate gguf >&2
fi
echo "$VENV/bin/python"
