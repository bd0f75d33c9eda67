"""Reference outputs of transformers / PEFT / bitsandbytes for Qwen2, Mistral and Llama 3.1.

Writes `tests/fixtures/arch/` (see its README.md). Run it with the reference stack that
`scripts/peft-baseline.sh` installs (torch 2.15.0, transformers 5.23.0, PEFT 0.21.2,
bitsandbytes 0.50.2):

    "$(scripts/peft-baseline.sh)" scripts/make_arch_fixtures.py tests/fixtures/arch

Every model is random (fixed seeds), tiny, f32, eager attention, one CPU thread, so the
outputs are reproducible and the folder stays small.
"""

import json
import os
import shutil
import sys

import torch
import bitsandbytes as bnb
import peft
import transformers
from safetensors.torch import save_file
from transformers import (
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

torch.set_num_threads(1)
SEQ = 24
VOCAB = 512
# tiny-llama's byte-level BPE tokenizer (vocab 512: <unk>, <s>, </s>, bytes, merges), copied into
# every folder so the models can be exported to GGUF with a vocabulary.
TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny-llama")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]


def init_weights(model, seed):
    """N(0, 0.1) for matrices and biases, 1 + N(0, 0.1) for norms: every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            if "norm" in name:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def input_ids(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, SEQ), generator=g)


@torch.no_grad()
def run(model, ids):
    out = model(input_ids=ids, output_hidden_states=True)
    return out.logits.float().contiguous(), [h.float().contiguous() for h in out.hidden_states]


def build(cls, cfg, seed):
    model = cls(cfg).eval()
    init_weights(model, seed)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def save_reference(path, ids, logits, hidden, extra):
    tensors = {"input_ids": ids.to(torch.int64).contiguous(), "logits": logits}
    for i, h in enumerate(hidden):
        tensors[f"hidden_states.{i}"] = h
    tensors.update({k: v.float().contiguous() for k, v in extra.items()})
    save_file(tensors, path)


def add_adapter(cls, cfg, seed, d, ids):
    """A PEFT LoRA adapter (r 4, alpha 8, all seven projections) saved to `d/adapter`; B is
    drawn too (PEFT's init leaves it zero). Returns the PeftModel's logits on `ids`."""
    lcfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(build(cls, cfg, seed), lcfg).eval()
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = os.path.join(d, "adapter")
    pm.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))  # PEFT's generated model card
    cfg_path = os.path.join(out, "adapter_config.json")
    with open(cfg_path) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = ".."
    # PEFT writes a set's order, which changes with Python's string hashing: sort it.
    acfg["target_modules"] = sorted(acfg["target_modules"])
    with open(cfg_path, "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
    with torch.no_grad():
        return pm(input_ids=ids).logits.float()


def save_model(model, d):
    model.save_pretrained(d)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(TOKENIZER, name), os.path.join(d, name))


def common(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        attn_implementation="eager",
    )
    base.update(kw)
    return base


def qwen2(out):
    """Qwen2 with q/k/v biases and tied embeddings, plus a PEFT adapter and a bnb 4-bit copy."""
    cfg = Qwen2Config(
        **common(tie_word_embeddings=True, use_sliding_window=False),
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    model = build(Qwen2ForCausalLM, cfg, 11)
    d = os.path.join(out, "qwen2")
    save_model(model, d)
    ids = input_ids(1)
    logits, hidden = run(model, ids)

    # Same weights with the q/k/v biases zeroed, so a test can show they are not ignored.
    nobias = build(Qwen2ForCausalLM, cfg, 11)
    with torch.no_grad():
        for name, p in nobias.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    logits_nobias, _ = run(nobias, ids)

    logits_adapter = add_adapter(Qwen2ForCausalLM, cfg, 11, d, ids)

    # bitsandbytes NF4 + double quantization through transformers, f32 compute; the plain f32
    # path (see ../bnb4/README.md for the AVX512-BF16 note).
    q = Qwen2ForCausalLM.from_pretrained(
        d,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
        dtype=torch.float32,
        device_map="cpu",
        attn_implementation="eager",
    ).eval()
    for m in q.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        logits_4bit = q(input_ids=ids).logits.float()
    q.save_pretrained(os.path.join(d, "bnb4"))

    save_reference(
        os.path.join(d, "reference.safetensors"),
        ids,
        logits,
        hidden,
        {
            "logits_zero_bias": logits_nobias,
            "logits_adapter": logits_adapter,
            "logits_4bit": logits_4bit,
        },
    )


def with_variant(out, name, cls, cfg, variant_cfg, variant_key, seed, ids_seed):
    """Save the model `cls(cfg)` to `out/name` with an adapter and a reference file that also
    holds `variant_key`: the logits of `cls(variant_cfg)` with the same weights and ids."""
    model = build(cls, cfg, seed)
    d = os.path.join(out, name)
    save_model(model, d)
    ids = input_ids(ids_seed)
    logits, hidden = run(model, ids)
    logits_variant, _ = run(build(cls, variant_cfg, seed), ids)
    logits_adapter = add_adapter(cls, cfg, seed, d, ids)
    save_reference(
        os.path.join(d, "reference.safetensors"),
        ids,
        logits,
        hidden,
        {variant_key: logits_variant, "logits_adapter": logits_adapter},
    )


def mistral(out):
    """Mistral with a sliding window of 6 keys over 24 positions (variant: no window)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    windowed, full = (
        MistralConfig(
            **common(tie_word_embeddings=False, sliding_window=w, head_dim=16),
            rope_parameters=rope,
        )
        for w in (6, None)
    )
    with_variant(out, "mistral", MistralForCausalLM, windowed, full, "logits_no_window", 9, 2)


def llama3(out):
    """Llama 3.1 RoPE scaling with bands that fall inside 24 positions (original context 16;
    variant: plain RoPE)."""
    scaled = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    plain = {"rope_type": "default", "rope_theta": 10000.0}
    cfg, plain_cfg = (
        LlamaConfig(**common(tie_word_embeddings=False), rope_parameters=r) for r in (scaled, plain)
    )
    with_variant(out, "llama3", LlamaForCausalLM, cfg, plain_cfg, "logits_default_rope", 5, 3)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/arch"
    for name in ["qwen2", "mistral", "llama3"]:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    qwen2(out)
    mistral(out)
    llama3(out)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bnb.__version__,
    }
    with open(os.path.join(out, "VERSIONS.json"), "w") as f:
        json.dump(versions, f, indent=2, sort_keys=True)
    print(json.dumps(versions))


if __name__ == "__main__":
    main()
