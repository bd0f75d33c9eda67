"""The Python reference stack's QLoRA training speed on *this* machine, for `benches/train.rs`.

PEFT + bitsandbytes + transformers on SmolLM2-135M-Instruct with the configuration ANCHORS.md
measured (batch 4 x seq 512, LoRA r 16, alpha 32, dropout 0.05 on all seven projections, NF4 base
with double quantization and f32 compute, AdamW), so our bench can put a same-machine baseline
next to ANCHORS.md's figure from another CPU. Run by `scripts/peft-baseline.sh`, which builds the
virtualenv; prints the bench child's result line:

    result <last loss> <peak RSS MiB> <steps> <wall s of each timed step...> <CPU s of each...>

Usage: peft_baseline.py GGUF TEXT [--steps N] [--threads T] [--config nf4-ckpt|nf4|fp-ckpt|fp]
"""

import argparse
import resource
import subprocess
import sys
import tempfile
import time


def convert(gguf: str, out: str) -> None:
    """Write the GGUF as an f32 HF folder (weights, config, tokenizer)."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf.rsplit("/", 1)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    # save_pretrained refuses a model read from a GGUF: write the weights and the config (without
    # its GGUF quantization entry) by hand.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    save_model(model, f"{out}/model.safetensors", metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--convert":
        convert(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", help="SmolLM2-135M-Instruct GGUF (scripts/fetch-smollm2.sh)")
    ap.add_argument("text", help="training text (data/sonnets/train.txt)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default="nf4-ckpt", help="nf4-ckpt | nf4 | fp-ckpt | fp")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # The GGUF becomes an f32 HF folder in a child process, so this process's peak RSS is the
    # training run's alone (reading a GGUF holds the whole f32 model and more).
    hf_dir = tempfile.TemporaryDirectory()
    subprocess.run([sys.executable, __file__, "--convert", args.gguf, hf_dir.name], check=True)
    kwargs = {"torch_dtype": torch.float32}
    if args.config.startswith("nf4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(hf_dir.name, **kwargs)
    tok = AutoTokenizer.from_pretrained(hf_dir.name)
    if args.config.endswith("ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()

    batch, seq = 4, 512
    with open(args.text, encoding="utf-8") as f:
        ids = tok(f.read())["input_ids"]
    need = batch * seq
    if len(ids) < need:
        ids = (ids * (need // max(len(ids), 1) + 1))[:need]
    x = torch.tensor(ids[:need]).view(batch, seq)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    times, cpu = [], []
    loss = float("nan")
    for step in range(args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        loss = out.loss.item()
        print(f"  peft {args.config} step {step}: {dt:.2f} s wall, {dc:.2f} s CPU, loss {loss:.4f}", file=sys.stderr)
        if step > 0:
            times.append(dt)
            cpu.append(dc)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"result {loss} {rss_mib} {len(times)} " + " ".join(f"{t:.4f}" for t in times + cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
