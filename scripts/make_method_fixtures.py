"""Reference outputs of PEFT (and bitsandbytes) for the adapter methods beyond plain LoRA:
per-module ranks and alphas (`rank_pattern`, `alpha_pattern`), `layers_to_transform` +
`exclude_modules`, and LoRA on token embeddings.

Writes `tests/fixtures/methods/` (see its README.md). The base models are the tiny random ones of
`tests/fixtures/arch/` (Llama 3.1 with an untied head, Qwen2 with a tied one and its bnb 4-bit
checkpoint). Run it with the reference stack that `scripts/peft-baseline.sh` installs:

    "$(scripts/peft-baseline.sh)" scripts/make_method_fixtures.py tests/fixtures/methods
"""

import json
import os
import shutil
import sys
import tempfile

import torch
import bitsandbytes as bnb
import peft
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

sys.path.insert(0, os.path.dirname(__file__))
from make_task_fixtures import decoded_4bit  # noqa: E402

torch.set_num_threads(1)
ARCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "arch")


def base(name, four_bit=False):
    path = os.path.join(ARCH, name, "bnb4" if four_bit else "")
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map="cpu", attn_implementation="eager").eval()


def ids_of(name):
    return load_file(os.path.join(ARCH, name, "reference.safetensors"))["input_ids"]


def redraw(pm, seed, names):
    """Draw every adapter tensor whose name contains one of `names` (N(0, 0.05)), so each
    parameter matters (PEFT zeroes B, and an embedding adapter's A)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def save_adapter(pm, out, base_path):
    pm.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))
    path = os.path.join(out, "adapter_config.json")
    with open(path) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = base_path
    acfg["target_modules"] = sorted(acfg["target_modules"])
    with open(path, "w") as f:
        json.dump(acfg, f, indent=2)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float().contiguous()


def decoded(name):
    """The f32 model `name` with its linear weights replaced by bitsandbytes' NF4 codes (double
    quantization, blocksize 64) decoded as the format defines them: what a 4-bit base computes
    (bitsandbytes' own CPU forward is off for `[64, 96]` weights, see ../arch/README.md)."""
    with tempfile.TemporaryDirectory() as tmp:
        q = AutoModelForCausalLM.from_pretrained(
            os.path.join(ARCH, name),
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32),
            dtype=torch.float32, device_map="cpu")
        q.save_pretrained(tmp)
        return decoded_4bit(base(name), tmp)


def patterns(out):
    """Per-module ranks and alphas on Llama 3.1, and layers_to_transform + exclude_modules."""
    d = os.path.join(out, "patterns")
    os.makedirs(d)
    ids = ids_of("llama3")
    ref = {"input_ids": ids}
    cases = {
        "patterns": peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"],
            rank_pattern={"down_proj": 8, r"layers\.1\.self_attn\.q_proj": 2},
            alpha_pattern={"v_proj": 3}),
        "layers": peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
            layers_to_transform=[1], exclude_modules=["k_proj"]),
    }
    for i, (name, lcfg) in enumerate(cases.items()):
        torch.manual_seed(10 + i)
        pm = peft.get_peft_model(base("llama3"), lcfg).eval()
        redraw(pm, 20 + i, ["lora_B"])
        save_adapter(pm, os.path.join(d, name), "../../arch/llama3")
        ref[f"logits_{name}"] = logits(pm, ids)
        q = peft.PeftModel.from_pretrained(decoded("llama3"), os.path.join(d, name)).eval()
        ref[f"logits_{name}_4bit_decoded"] = logits(q, ids)
        ranks = {n: p.shape[0] for n, p in pm.named_parameters() if "lora_A" in n}
        print(name, ranks)
    save_file(ref, os.path.join(d, "reference.safetensors"))


def embedding_config():
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["embed_tokens", "q_proj", "v_proj"])


def embedding(out):
    """LoRA on `embed_tokens` + q_proj + v_proj: Qwen2 (tied head) full precision and bnb 4-bit,
    Llama 3.1 (untied head); merged as PEFT merges it; 20 training steps."""
    d = os.path.join(out, "embedding")
    os.makedirs(d)
    ref = {}
    for name in ["qwen2", "llama3"]:
        ids = ids_of(name)
        ref[f"input_ids_{name}"] = ids
        torch.manual_seed(30)
        pm = peft.get_peft_model(base(name), embedding_config()).eval()
        redraw(pm, 31, ["lora_B", "lora_embedding_A", "lora_embedding_B"])
        save_adapter(pm, os.path.join(d, name), f"../../arch/{name}")
        ref[f"logits_{name}"] = logits(pm, ids)
        head = pm.base_model.model.get_output_embeddings().weight.detach().clone()
        merged = pm.merge_and_unload()
        ref[f"logits_{name}_merged"] = logits(merged, ids)
        ref[f"head_{name}_merged"] = merged.get_output_embeddings().weight.detach().clone()
        ref[f"head_{name}"] = head
        ref[f"embed_{name}_merged"] = merged.get_input_embeddings().weight.detach().clone()
    # The same adapter on bitsandbytes' 4-bit Qwen2 (the embedding stays full precision).
    q = peft.PeftModel.from_pretrained(base("qwen2", four_bit=True), os.path.join(d, "qwen2"))
    for m in q.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    ref["logits_qwen2_4bit"] = logits(q.eval(), ids_of("qwen2"))
    dq = peft.PeftModel.from_pretrained(decoded("qwen2"), os.path.join(d, "qwen2")).eval()
    ref["logits_qwen2_4bit_decoded"] = logits(dq, ids_of("qwen2"))
    print("qwen2 4-bit: bitsandbytes' CPU forward vs the decoded codes:",
          (ref["logits_qwen2_4bit"] - ref["logits_qwen2_4bit_decoded"]).abs().max().item())
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(d, "reference.safetensors"))
    train(os.path.join(d, "train"), "qwen2", embedding_config(), ["lora_B", "lora_embedding_A"])


def head(out):
    """LoRA on Llama 3's untied `lm_head` + q_proj + v_proj: logits, merged logits, 20 steps."""
    d = os.path.join(out, "head")
    os.makedirs(d)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["lm_head", "q_proj", "v_proj"])
    ids = ids_of("llama3")
    torch.manual_seed(60)
    pm = peft.get_peft_model(base("llama3"), lcfg).eval()
    redraw(pm, 61, ["lora_B"])
    save_adapter(pm, os.path.join(d, "adapter"), "../../../arch/llama3")
    ref = {"input_ids": ids, "logits": logits(pm, ids)}
    ref["logits_merged"] = logits(pm.merge_and_unload(), ids)
    save_file(ref, os.path.join(d, "reference.safetensors"))
    train(os.path.join(d, "train"), "llama3", lcfg, ["lora_B"])


def train(t, name, lcfg, drawn):
    """20 AdamW steps on the f32 base `name` from PEFT's initial adapter of `lcfg` (the tensors
    named in `drawn` redrawn), batches of 4 × 16 in file order."""
    os.makedirs(t)
    torch.manual_seed(40)
    pm = peft.get_peft_model(base(name), lcfg)
    redraw(pm, 41, drawn)
    save_adapter(pm, os.path.join(t, "adapter_init"), f"../../../arch/{name}")
    g = torch.Generator().manual_seed(42)
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
    save_adapter(pm, os.path.join(t, "adapter_final"), f"../../../arch/{name}")
    with open(os.path.join(t, "losses.json"), "w") as f:
        json.dump({"losses": losses, "batch_size": 4, "seq_len": 16, "lr": 1e-3}, f, indent=2)
    print(t, "losses[0]", losses[0], "losses[19]", losses[19])


ADALORA = dict(init_r=6, target_r=3, tinit=3, tfinal=5, deltaT=2, beta1=0.85, beta2=0.85,
               orth_reg_weight=0.5, total_step=20, lora_alpha=16, lora_dropout=0.0,
               target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
TINY = os.path.join(ARCH, "..")


def orth_reg(pm):
    """PEFT's AdaLoRA regulariser: mean over A and B of ‖AAᵀ − I‖_F / ‖BᵀB − I‖_F."""
    total, n = 0.0, 0
    for name, p in pm.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and "default" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            total = total + torch.norm(cov - torch.eye(*cov.shape), p="fro")
            n += 1
    return total / n


def adalora(out):
    """20 AdaLoRA steps on bitsandbytes' 4-bit tiny-llama (../bnb4/model): budget 24 -> 12
    triplets over q_proj and v_proj, tinit 3, tfinal 5, deltaT 2, so ranks are masked at steps 4,
    6, ..., 14, fixed at step 15 and kept after; PEFT's loop: forward, backward, optimizer step,
    update_and_allocate(step), zero grads."""
    d = os.path.join(out, "adalora")
    os.makedirs(d)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(TINY, "bnb4", "model"), dtype=torch.float32, device_map="cpu",
        attn_implementation="eager")
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    torch.manual_seed(50)
    pm = peft.get_peft_model(model, peft.AdaLoraConfig(**ADALORA))
    # PEFT starts E at zero; draw it so every parameter moves from step 0.
    g = torch.Generator().manual_seed(51)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(pm, os.path.join(d, "adapter_init"), "../../../bnb4/model")
    g = torch.Generator().manual_seed(52)
    data = torch.randint(3, 512, (8, 16), generator=g)
    with open(os.path.join(d, "data.jsonl"), "w") as f:
        for row in data.tolist():
            f.write(json.dumps({"input_ids": row}) + "\n")
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            foreach=False)
    pm.train()
    losses, regs, budgets = [], [], []
    for step in range(20):
        batch = data[4 * (step % 2): 4 * (step % 2) + 4]
        with torch.no_grad():
            regs.append(orth_reg(pm).item())
        loss = pm(input_ids=batch, labels=batch).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
        pm.base_model.update_and_allocate(step)
        budgets.append(pm.base_model.rankallocator.budget_schedule(step)[0])
        opt.zero_grad()
    rank_pattern = pm.peft_config["default"].rank_pattern
    save_adapter(pm, os.path.join(d, "adapter_final"), "../../../bnb4/model")
    with open(os.path.join(d, "losses.json"), "w") as f:
        json.dump({"losses": losses, "orth_reg": regs, "budget": budgets, "batch_size": 4,
                   "seq_len": 16, "lr": 1e-3,
                   "rank_pattern": {k: [bool(x) for x in v] for k, v in rank_pattern.items()}},
                  f, indent=2)
    # PEFT's final (pruned) adapter loaded as a user would: on the 4-bit and the f32 base, and
    # merged into the f32 one.
    ids = load_file(os.path.join(TINY, "lora", "reference.safetensors"))["input_ids"]
    q = AutoModelForCausalLM.from_pretrained(
        os.path.join(TINY, "bnb4", "model"), dtype=torch.float32, device_map="cpu",
        attn_implementation="eager")
    for m in q.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    final = os.path.join(d, "adapter_final")
    ref = {"input_ids": ids,
           "logits_final_4bit": logits(peft.PeftModel.from_pretrained(q, final).eval(), ids)}
    f = AutoModelForCausalLM.from_pretrained(os.path.join(TINY, "tiny-llama"),
                                             dtype=torch.float32, attn_implementation="eager")
    pf = peft.PeftModel.from_pretrained(f, final).eval()
    ref["logits_final"] = logits(pf, ids)
    ref["logits_final_merged"] = logits(pf.merge_and_unload(), ids)
    save_file(ref, os.path.join(d, "reference.safetensors"))
    print("adalora: losses[0]", losses[0], "losses[19]", losses[19],
          "kept", {k: sum(v) for k, v in rank_pattern.items()})


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/methods"
    for name in ["patterns", "embedding", "head", "adalora"]:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    patterns(out)
    embedding(out)
    head(out)
    adalora(out)
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
