"""The Shakespeare genre task with PEFT + transformers (+ bitsandbytes for the 4-bit base): the
same model, data, adapter and schedule as `scripts/classify-shakespeare.sh` gives `qlora train`,
measured the same way (tokens/s over the training steps, peak RSS, test accuracy and macro-F1).

    "$(scripts/peft-baseline.sh)" scripts/genre_peft.py MODEL_DIR DATA_DIR --quant nf4|none

Prints one JSON object.
"""

import argparse
import json
import math
import random
import resource
import time

import torch
import peft
from transformers import AutoTokenizer, BertForSequenceClassification, BitsAndBytesConfig


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def batches(rows, tok, labels, batch_size, seq_len):
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        enc = tok([r["text"] for r in chunk], truncation=True, max_length=seq_len,
                  padding=True, return_tensors="pt")
        y = torch.tensor([labels.index(r["label"]) for r in chunk])
        yield enc, y


@torch.no_grad()
def evaluate(model, rows, tok, labels, seq_len):
    model.eval()
    preds, gold = [], []
    for enc, y in batches(rows, tok, labels, 32, seq_len):
        preds += model(**enc).logits.argmax(-1).tolist()
        gold += y.tolist()
    acc = sum(p == g for p, g in zip(preds, gold)) / len(gold)
    f1s = []
    for k in range(len(labels)):
        tp = sum(p == k and g == k for p, g in zip(preds, gold))
        pred_k = sum(p == k for p in preds)
        gold_k = sum(g == k for g in gold)
        f1s.append(0.0 if pred_k + gold_k == 0 else 2 * tp / (pred_k + gold_k))
    return acc, sum(f1s) / len(f1s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--quant", choices=["nf4", "none"], default="nf4")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--val-split", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    labels = ["comedy", "tragedy"]
    tok = AutoTokenizer.from_pretrained(a.model)
    kw = dict(num_labels=2, id2label=dict(enumerate(labels)),
              label2id={l: i for i, l in enumerate(labels)}, dtype=torch.float32)
    if a.quant == "nf4":
        # The head is trained in full (modules_to_save), so it stays out of the 4-bit layers.
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"])
        kw["device_map"] = "cpu"
    model = BertForSequenceClassification.from_pretrained(a.model, **kw)
    # bitsandbytes repacks 4-bit weights for its AVX512-BF16 inference kernel on the first eval
    # forward, and that layout cannot be trained; keep the training layout throughout.
    import bitsandbytes as bnb
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    train_rows = records(f"{a.data}/train.jsonl")
    test_rows = records(f"{a.data}/test.jsonl")
    rng = random.Random(a.seed)
    rng.shuffle(train_rows)
    n_val = int(len(train_rows) * a.val_split)
    val_rows, train_rows = train_rows[:n_val], train_rows[n_val:]
    base_acc, base_f1 = evaluate(model, test_rows, tok, labels, a.seq_len)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, lora_dropout=0.05,
                          target_modules=["query", "key", "value", "dense"])
    if a.quant == "nf4":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    steps = a.epochs * math.ceil(len(train_rows) / a.batch_size)

    def lr_at(s):
        if s < a.warmup_steps:
            return (s + 1) / (a.warmup_steps + 1)
        t = (s - a.warmup_steps) / max(1, steps - a.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    tokens, train_secs, step, losses = 0, 0.0, 0, []
    for epoch in range(a.epochs):
        order = train_rows[:]
        random.Random(a.seed + epoch).shuffle(order)
        for enc, y in batches(order, tok, labels, a.batch_size, a.seq_len):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = model(**enc, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            train_secs += time.perf_counter() - t0
            tokens += int(enc["attention_mask"].sum())
            losses.append(loss.item())
            step += 1
    acc, f1 = evaluate(model, test_rows, tok, labels, a.seq_len)
    print(json.dumps({
        "quant": a.quant, "steps": step, "tokens_per_s": tokens / train_secs,
        "train_seconds": train_secs, "peak_rss_mib": resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 1024,
        "base_accuracy": base_acc, "base_macro_f1": base_f1,
        "accuracy": acc, "macro_f1": f1, "loss_first": losses[0], "loss_last": losses[-1],
    }))


if __name__ == "__main__":
    main()
