"""Reference outputs of transformers / PEFT / bitsandbytes for GPT-2 (`GPT2LMHeadModel`).

Writes `tests/fixtures/arch/gpt2/` (see `tests/fixtures/arch/README.md`). Run it with the
reference stack that `scripts/peft-baseline.sh` installs:

    "$(scripts/peft-baseline.sh)" scripts/make_task_fixtures.py tests/fixtures/arch

Random tiny model (fixed seeds), f32, eager attention, one CPU thread, every dropout 0, so the
outputs are reproducible.
"""

import json
import os
import shutil
import sys

import torch
import bitsandbytes as bnb
import peft
from transformers import BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel

sys.path.insert(0, os.path.dirname(__file__))
from make_arch_fixtures import TOKENIZER, TOKENIZER_FILES, input_ids, run, save_reference  # noqa: E402

torch.set_num_threads(1)
TARGETS = ["c_attn", "c_proj", "c_fc"]


def init_weights(model, seed):
    """N(0, 0.1) for every parameter, 1 + N(0, 0.1) for LayerNorm weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if (".ln_" in name or "ln_f" in name) and name.endswith("weight") else noise)


def config():
    return GPT2Config(
        vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=96,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, attn_implementation="eager",
    )


def build(seed=21):
    model = GPT2LMHeadModel(config()).eval()
    init_weights(model, seed)
    model.tie_weights()
    return model


def save_adapter(pm, out):
    pm.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))
    path = os.path.join(out, "adapter_config.json")
    with open(path) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = ".." if out.endswith("adapter") else "../.."
    acfg["target_modules"] = sorted(acfg["target_modules"])
    with open(path, "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)


def lora_config():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, fan_in_fan_out=True,
                           lora_dropout=0.0, task_type="CAUSAL_LM")


def redraw_b(pm, seed, std):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def train(d):
    """20 AdamW steps on the f32 base from PEFT's adapter (B redrawn), batches in file order."""
    t = os.path.join(d, "train")
    os.makedirs(t)
    pm = peft.get_peft_model(build(), lora_config())
    redraw_b(pm, 33, 0.02)
    save_adapter(pm, os.path.join(t, "adapter_init"))
    g = torch.Generator().manual_seed(44)
    data = torch.randint(3, 512, (8, 16), generator=g)
    with open(os.path.join(t, "data.jsonl"), "w") as f:
        for row in data.tolist():
            f.write(json.dumps({"input_ids": row}) + "\n")
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            foreach=False)
    pm.train()
    losses = []
    for step in range(20):
        batch = data[4 * (step % 2): 4 * (step % 2) + 4]
        opt.zero_grad()
        loss = pm(input_ids=batch, labels=batch).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
    save_adapter(pm, os.path.join(t, "adapter_final"))
    with open(os.path.join(t, "losses.json"), "w") as f:
        json.dump({"losses": losses, "batch_size": 4, "seq_len": 16, "lr": 1e-3}, f, indent=2)
    print("gpt2 train: losses[0]", losses[0], "losses[19]", losses[19])


def gpt2(out):
    d = os.path.join(out, "gpt2")
    model = build()
    model.save_pretrained(d)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(TOKENIZER, name), os.path.join(d, name))
    ids = input_ids(4)
    logits, hidden = run(model, ids)

    pm = peft.get_peft_model(build(), lora_config()).eval()
    redraw_b(pm, 31, 0.05)
    save_adapter(pm, os.path.join(d, "adapter"))
    with torch.no_grad():
        logits_adapter = pm(input_ids=ids).logits.float()
    merged = pm.merge_and_unload()
    with torch.no_grad():
        logits_merged = merged(input_ids=ids).logits.float()
    merged.save_pretrained(os.path.join(d, "merged"))

    q = GPT2LMHeadModel.from_pretrained(
        d,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32),
        dtype=torch.float32, device_map="cpu", attn_implementation="eager",
    ).eval()
    quantized = sorted(n for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    for m in q.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        logits_4bit = q(input_ids=ids).logits.float()
    # transformers transposes Conv1D to [out, in] before quantizing: check it on one layer.
    layer = q.transformer.h[0].attn.c_attn
    deq = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    conv = model.transformer.h[0].attn.c_attn.weight.detach()
    transposed = bool(deq.shape == conv.t().shape and (deq - conv.t()).abs().max() < 0.05)
    q.save_pretrained(os.path.join(d, "bnb4"))
    with open(os.path.join(d, "bnb4", "quantized_modules.json"), "w") as f:
        json.dump({"linear4bit": quantized, "c_attn_dequantized_shape": list(deq.shape),
                   "conv1d_weight_shape": list(conv.shape),
                   "dequantized_equals_conv1d_transposed_within_0.05": transposed}, f, indent=2)

    save_reference(os.path.join(d, "reference.safetensors"), ids, logits, hidden,
                   {"logits_adapter": logits_adapter, "logits_merged": logits_merged,
                    "logits_4bit": logits_4bit})
    train(d)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/arch"
    shutil.rmtree(os.path.join(out, "gpt2"), ignore_errors=True)
    torch.manual_seed(0)
    gpt2(out)


if __name__ == "__main__":
    main()
