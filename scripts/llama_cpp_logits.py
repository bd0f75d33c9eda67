"""llama.cpp's logits on GGUF files that `qlora merge --format gguf` writes.

For each case below this exports a merged model with the given `qlora` binary, runs the GGUF in
llama.cpp (through llama-cpp-python, which builds the llama.cpp it vendors) on the reference
token ids, and writes `OUT/<case>.safetensors` (`logits` f32 [sequences, tokens, vocab]) and
`OUT/cases.json` (the merge arguments, the sha256 of the GGUF llama.cpp ran, versions).
`tests/llama_cpp_gguf.rs` re-exports each case, checks the file is byte-identical to the one
llama.cpp ran, and compares llama.cpp's logits with ours and with transformers / PEFT.

    scripts/llama-cpp.sh           # builds the python with llama-cpp-python, prints its path
    "$(scripts/llama-cpp.sh)" scripts/llama_cpp_logits.py target/release/qlora tests/fixtures/llama_cpp
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import llama_cpp
from safetensors.numpy import load_file, save_file

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

# name: (model folder, adapter folder, reference file holding `input_ids`, extra merge args,
#        reference logits of the adapted model, logits of the model without the adapter)
ORIGINAL = ["--base", "original"]


def tiny_llama(args):
    return ("tiny-llama", "lora/adapter", "lora/reference.safetensors", ORIGINAL + args,
            "logits_adapter", "logits_base")


def arch(name):
    return (f"arch/{name}", f"arch/{name}/adapter", f"arch/{name}/reference.safetensors",
            ORIGINAL + ["--dtype", "f32"], "logits_adapter", "logits")


CASES = {
    "tiny-llama-f32": tiny_llama(["--dtype", "f32"]),
    "tiny-llama-f16": tiny_llama(["--dtype", "f16"]),
    "tiny-llama-bf16": tiny_llama(["--dtype", "bf16"]),
    "tiny-llama-q8_0": tiny_llama(["--gguf-type", "q8_0"]),
    # The QLoRA packaging path: the adapter merged into the dequantized NF4 weights (the default
    # --base; quantizing tiny-llama on load is bit-exact with bnb4/model), against PEFT on
    # bitsandbytes' 4-bit model.
    "tiny-llama-nf4-f32": ("tiny-llama", "lora/adapter", "bnb4/reference.safetensors",
                           ["--dtype", "f32"], "logits_4bit_lora", "logits_4bit"),
    "qwen2-f32": arch("qwen2"),
    "llama3-f32": arch("llama3"),
    "mistral-f32": arch("mistral"),
    # llama.cpp's `gpt2` architecture: Conv1D weights transposed, learned positions, tied head.
    "gpt2-f32": arch("gpt2"),
    "gpt2-f16": ("arch/gpt2", "arch/gpt2/adapter", "arch/gpt2/reference.safetensors",
                 ORIGINAL + ["--dtype", "f16"], "logits_adapter", "logits"),
}


def merge_args(model, adapter, extra, out):
    return [
        "merge",
        "--model",
        os.path.join(FIXTURES, model),
        "--adapter",
        os.path.join(FIXTURES, adapter),
        "--format",
        "gguf",
        "--out",
        out,
    ] + extra


def llama_cpp_logits(gguf, ids):
    """Logits of every position of each row of `ids`, each row its own sequence."""
    n = ids.shape[1]
    llm = llama_cpp.Llama(
        model_path=gguf,
        n_ctx=max(64, n),
        n_batch=max(64, n),
        n_threads=1,
        logits_all=True,
        # f32 keys and values: llama.cpp's default f16 cache alone moves logits by ~1e-3.
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    rows = []
    for row in ids:
        llm.reset()
        llm.eval([int(t) for t in row])
        rows.append(np.array(llm.scores[:n], dtype=np.float32))
    return np.stack(rows)


def main():
    qlora, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    manifest = {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(),
        "cases": {},
    }
    for name, (model, adapter, ref, extra, adapted, base) in CASES.items():
        ids = load_file(os.path.join(FIXTURES, ref))["input_ids"]
        with tempfile.TemporaryDirectory() as tmp:
            dest = os.path.join(tmp, "out")
            subprocess.run([qlora] + merge_args(model, adapter, extra, dest), check=True,
                           stdout=subprocess.DEVNULL)
            (gguf,) = [f for f in os.listdir(dest) if f.endswith(".gguf")]
            path = os.path.join(dest, gguf)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            logits = llama_cpp_logits(path, ids)
        save_file({"logits": logits}, os.path.join(out, f"{name}.safetensors"))
        manifest["cases"][name] = {
            "model": model,
            "adapter": adapter,
            "input_ids": ref,
            "merge_args": ["--format", "gguf"] + extra,
            "reference": adapted,
            "reference_base": base,
            "gguf_sha256": digest,
        }
        print(name, digest, logits.shape)
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
