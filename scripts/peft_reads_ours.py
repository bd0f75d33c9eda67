"""PEFT loading adapters that `qlora train` wrote, on the bases they were trained on.

For each case this trains a few steps with the given `qlora` binary (deterministic: fixed seed,
data in file order, one thread's worth of work), keeps the adapter under
`tests/fixtures/methods/ours/<case>/`, loads it with `PeftModel.from_pretrained` and saves
PEFT's logits on the base's reference ids as `ours/<case>/peft_logits.safetensors`.
`tests/adapter_methods.rs` trains the same run again, checks the adapter is the same file, and
compares our logits with PEFT's.

    "$(scripts/peft-baseline.sh)" scripts/peft_reads_ours.py target/release/qlora
"""

import os
import shutil
import subprocess
import sys
import tempfile

import torch
import peft
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

# case: (base under tests/fixtures, its reference ids, extra `qlora train` arguments)
CASES = {
    "embedding": ("arch/qwen2", "arch/qwen2/reference.safetensors",
                  ["--targets", "embed_tokens,q_proj,v_proj"]),
    "adalora": ("tiny-llama", "lora/reference.safetensors",
                ["--targets", "q_proj,v_proj", "--adalora", "--init-r", "4", "--target-r", "2",
                 "--tinit", "0", "--tfinal", "1", "--delta-t", "1"]),
}


def train_args(base, extra, out):
    return [
        "train", "--model", os.path.join(FIXTURES, base),
        "--data", os.path.join(FIXTURES, "methods", "embedding", "train", "data.jsonl"),
        "--out", out, "--steps", "3", "--batch-size", "4", "--seq-len", "16", "--lr", "1e-2",
        "--val-split", "0", "--no-shuffle", "--adapter-dtype", "f32", "--quant", "none",
        "--seed", "7", "--rank", "4", "--alpha", "8", "--dropout", "0",
    ] + extra


def main():
    qlora = sys.argv[1]
    for case, (base, ids_file, extra) in CASES.items():
        dest = os.path.join(FIXTURES, "methods", "ours", case)
        shutil.rmtree(dest, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            run = os.path.join(tmp, "run")
            subprocess.run([qlora] + train_args(base, extra, run), check=True,
                           stdout=subprocess.DEVNULL)
            shutil.copytree(os.path.join(run, "adapter"), dest)
        model = AutoModelForCausalLM.from_pretrained(
            os.path.join(FIXTURES, base), dtype=torch.float32, attn_implementation="eager")
        pm = peft.PeftModel.from_pretrained(model, dest).eval()
        ids = load_file(os.path.join(FIXTURES, ids_file))["input_ids"]
        with torch.no_grad():
            logits = pm(input_ids=ids).logits.float().contiguous()
        save_file({"logits": logits}, os.path.join(dest, "peft_logits.safetensors"))
        print(case, "PEFT loaded", sorted(k for k in load_file(
            os.path.join(dest, "adapter_model.safetensors")))[:3], "...")


if __name__ == "__main__":
    main()
