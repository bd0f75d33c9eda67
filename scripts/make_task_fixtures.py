"""Reference outputs of transformers / PEFT / bitsandbytes for GPT-2 (`GPT2LMHeadModel`) and
sequence classifiers (`BertForSequenceClassification`, `LlamaForSequenceClassification`).

Writes `tests/fixtures/arch/{gpt2,bert-cls,llama-cls}/` (see `tests/fixtures/arch/README.md`). Run it with the
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
from safetensors.torch import load_file, save_file
import peft
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BitsAndBytesConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForSequenceClassification,
)

sys.path.insert(0, os.path.dirname(__file__))
from make_arch_fixtures import (  # noqa: E402
    TOKENIZER,
    TOKENIZER_FILES,
    common,
    input_ids,
    run,
    save_reference,
)
from make_arch_fixtures import init_weights as init_decoder  # noqa: E402

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


def decoded_4bit(model, bnb_dir, transpose=()):
    """`model` (f32) with every weight the bnb checkpoint in `bnb_dir` stores in 4-bit replaced
    by its codes decoded as the format defines them (BNB_FORMAT.md: `quant_map[code] · absmax`,
    the absmax from its nested 8-bit codes + offset); modules in `transpose` store `[in, out]`.
    transformers then runs the checkpoint's values in f32; bitsandbytes' own CPU forward does not
    for some shapes (see tests/fixtures/arch/README.md)."""
    f = load_file(os.path.join(bnb_dir, "model.safetensors"))
    with torch.no_grad():
        for key in f:
            if not key.endswith(".quant_state.bitsandbytes__nf4"):
                continue
            p = key[: -len(".quant_state.bitsandbytes__nf4")]
            st = json.loads(bytes(f[key].tolist()))
            b = f[p].flatten().to(torch.int64)
            codes = torch.stack([b >> 4, b & 15], 1).flatten()
            am = f[p + ".absmax"]
            absmax = (f[p + ".nested_quant_map"][am.to(torch.int64)]
                      * f[p + ".nested_absmax"].repeat_interleave(256)[: am.numel()]
                      + st["nested_offset"])
            n = st["shape"][0] * st["shape"][1]
            w = (f[p + ".quant_map"][codes] * absmax.repeat_interleave(st["blocksize"])[: codes.numel()])
            w = w[:n].reshape(st["shape"])
            module = p[: -len(".weight")]
            target = model.get_submodule(module).weight
            target.copy_(w.t() if module.rsplit(".", 1)[-1] in transpose else w)
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
    torch.manual_seed(3)  # PEFT draws lora_A from the global generator
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
    torch.manual_seed(1)
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
    qs = layer.weight.quant_state
    q.save_pretrained(os.path.join(d, "bnb4"))
    with open(os.path.join(d, "bnb4", "quantized_modules.json"), "w") as f:
        json.dump({"linear4bit": quantized,
                   "modules_to_not_convert": sorted(q.hf_quantizer.modules_to_not_convert),
                   "c_attn_packed_weight": {"shape": list(layer.weight.data.shape),
                                            "dtype": str(layer.weight.data.dtype)},
                   "c_attn_absmax": {"shape": list(qs.absmax.shape), "dtype": str(qs.absmax.dtype)},
                   "c_attn_quant_state_shape": list(qs.shape),
                   "c_attn_dequantized_shape": list(deq.shape),
                   "conv1d_weight_shape": list(conv.shape),
                   "c_attn_max_abs_dequantized_minus_conv1d_transposed":
                       round(float((deq - conv.t()).abs().max()), 4),
                   "dequantized_equals_conv1d_transposed_within_0.05": transposed}, f, indent=2)

    decoded = decoded_4bit(build(), os.path.join(d, "bnb4"), transpose=TARGETS).eval()
    with torch.no_grad():
        logits_4bit_decoded = decoded(input_ids=ids).logits.float()
    save_reference(os.path.join(d, "reference.safetensors"), ids, logits, hidden,
                   {"logits_adapter": logits_adapter, "logits_merged": logits_merged,
                    "logits_4bit": logits_4bit, "logits_4bit_decoded": logits_4bit_decoded})
    train(d)


LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def init_bert(model, seed):
    """N(0, 0.1) for every parameter, 1 + N(0, 0.1) for LayerNorm weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if "LayerNorm.weight" in name else noise)


def bert_config():
    return BertConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, hidden_act="gelu", max_position_embeddings=64, type_vocab_size=2,
        layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=None, pad_token_id=0, num_labels=3, id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()}, problem_type="single_label_classification",
        attn_implementation="eager",
    )


def llama_cls_config():
    return LlamaConfig(**common(tie_word_embeddings=False), pad_token_id=0, num_labels=3,
                       id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def build_bert(seed=51):
    m = BertForSequenceClassification(bert_config()).eval()
    init_bert(m, seed)
    return m


def build_llama_cls(seed=61):
    m = LlamaForSequenceClassification(llama_cls_config()).eval()
    init_decoder(m, seed)
    return m


def padded(lengths, seed, first=None):
    """Sequences of `lengths` (ids in [3, 512), never the pad id 0), right-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros((len(lengths), t), dtype=torch.int64)
    mask = torch.zeros((len(lengths), t), dtype=torch.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(3, 512, (n,), generator=g)
        if first is not None:
            ids[r, 0] = first
        mask[r, :n] = 1
    return ids, mask


def quantize_4bit(cls, d):
    q = cls.from_pretrained(
        d,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32),
        dtype=torch.float32, device_map="cpu", attn_implementation="eager",
    ).eval()
    quantized = sorted(n for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    kept = sorted(n for n, m in q.named_modules()
                  if isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit))
    for m in q.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    q.save_pretrained(os.path.join(d, "bnb4"))
    with open(os.path.join(d, "bnb4", "quantized_modules.json"), "w") as f:
        json.dump({"linear4bit": quantized, "full_precision_linear": kept,
                   "modules_to_not_convert": sorted(q.hf_quantizer.modules_to_not_convert)},
                  f, indent=2)
    return q


def classifier_task(out, name, build_fn, cls, targets, head, extra_inputs):
    """Model, reference logits, a PEFT SEQ_CLS adapter with a changed head, its merge, the bnb
    4-bit model, and 20 training steps."""
    d = os.path.join(out, name)
    torch.manual_seed(2)
    model = build_fn()
    model.save_pretrained(d)
    if name == "llama-cls":
        for f in TOKENIZER_FILES:
            shutil.copy(os.path.join(TOKENIZER, f), os.path.join(d, f))
    ids, mask = padded([24, 17, 9], 71, first=1 if name == "bert-cls" else None)
    inputs = {"input_ids": ids, "attention_mask": mask, **extra_inputs(ids, mask)}
    with torch.no_grad():
        o = model(**inputs, output_hidden_states=True)
    tensors = {k: v.contiguous() for k, v in inputs.items()}
    tensors["logits"] = o.logits.float().contiguous()
    for i, h in enumerate(o.hidden_states):
        tensors[f"hidden_states.{i}"] = h.float().contiguous()
    if name == "bert-cls":
        with torch.no_grad():
            tensors["pooled"] = model.bert(**inputs).pooler_output.float().contiguous()
            tensors["logits_no_token_types"] = model(
                input_ids=ids, attention_mask=mask).logits.float().contiguous()

    lcfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets,
                           lora_dropout=0.0)
    pm = peft.get_peft_model(build_fn(), lcfg).eval()
    redraw_b(pm, 81, 0.05)
    g = torch.Generator().manual_seed(82)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(pm, os.path.join(d, "adapter"))
    with torch.no_grad():
        tensors["logits_adapter"] = pm(**inputs).logits.float().contiguous()
        merged = pm.merge_and_unload()
        tensors["logits_merged"] = merged(**inputs).logits.float().contiguous()
    merged.save_pretrained(os.path.join(d, "merged"))

    q = quantize_4bit(cls, d)
    decoded = decoded_4bit(build_fn(), os.path.join(d, "bnb4")).eval()
    with torch.no_grad():
        tensors["logits_4bit"] = q(**inputs).logits.float().contiguous()
        tensors["logits_4bit_decoded"] = decoded(**inputs).logits.float().contiguous()
    save_file(tensors, os.path.join(d, "reference.safetensors"))
    train_cls(d, build_fn, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                            target_modules=head, lora_dropout=0.0),
              first=1 if name == "bert-cls" else None)


def train_cls(d, build_fn, lcfg, first):
    """20 AdamW steps on the f32 base; batches of 4 in file order, right-padded with 0."""
    t = os.path.join(d, "train")
    os.makedirs(t)
    torch.manual_seed(4)  # PEFT draws lora_A from the global generator
    pm = peft.get_peft_model(build_fn(), lcfg)
    redraw_b(pm, 91, 0.02)
    save_adapter(pm, os.path.join(t, "adapter_init"))
    g = torch.Generator().manual_seed(92)
    lengths = torch.randint(6, 17, (8,), generator=g).tolist()
    labels = torch.randint(0, 3, (8,), generator=g).tolist()
    seqs = []
    for n in lengths:
        s = torch.randint(3, 512, (n,), generator=g).tolist()
        if first is not None:
            s[0] = first
        seqs.append(s)
    with open(os.path.join(t, "data.jsonl"), "w") as f:
        for s, y in zip(seqs, labels):
            f.write(json.dumps({"input_ids": s, "label": y}) + "\n")
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            foreach=False)
    pm.train()
    losses = []
    for step in range(20):
        k = 4 * (step % 2)
        width = max(len(s) for s in seqs[k:k + 4])
        ids = torch.zeros((4, width), dtype=torch.int64)
        mask = torch.zeros((4, width), dtype=torch.int64)
        for r, s in enumerate(seqs[k:k + 4]):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        y = torch.tensor(labels[k:k + 4])
        opt.zero_grad()
        loss = pm(input_ids=ids, attention_mask=mask, labels=y).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
    save_adapter(pm, os.path.join(t, "adapter_final"))
    with open(os.path.join(t, "losses.json"), "w") as f:
        json.dump({"losses": losses, "batch_size": 4, "lr": 1e-3}, f, indent=2)
    print(os.path.basename(d), "train: losses[0]", losses[0], "losses[19]", losses[19])


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/arch"
    for name in ["gpt2", "bert-cls", "llama-cls"]:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    torch.manual_seed(0)
    gpt2(out)

    def token_types(ids, mask):
        tt = torch.zeros_like(ids)
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            tt[r, n // 2:n] = 1
        return {"token_type_ids": tt}

    classifier_task(out, "bert-cls", build_bert, BertForSequenceClassification,
                    ["query", "key", "value", "dense"], ["query", "value"], token_types)
    classifier_task(out, "llama-cls", build_llama_cls, LlamaForSequenceClassification,
                    ["q_proj", "v_proj"], ["q_proj", "v_proj"], lambda ids, mask: {})


if __name__ == "__main__":
    main()
