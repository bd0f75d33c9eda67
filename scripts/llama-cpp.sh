#!/usr/bin/env bash
# A Python with llama-cpp-python 0.3.36 (which compiles the llama.cpp it vendors; 6 min on two
# cores) and numpy + safetensors, in a virtualenv cached outside git, from PyPI only. Prints the
# virtualenv's python, for scripts/llama_cpp_logits.py:
#
#   "$(scripts/llama-cpp.sh)" scripts/llama_cpp_logits.py target/release/qlora tests/fixtures/llama_cpp
set -euo pipefail
VENV="${QLORA_CACHE:-$HOME/.cache/qlora}/llamacpp-venv"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import llama_cpp, numpy, safetensors" 2>/dev/null; then
    python3 -m venv "$VENV" >&2
    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        "$VENV/bin/pip" install --quiet llama-cpp-python==0.3.36 numpy safetensors >&2
fi
echo "$VENV/bin/python"
