"""Tier D's reference job: transformers Trainer + PEFT on the same model, data and
hyperparameters as lora-cli's job (bench/jobs.py runs it in a fresh process).

    python bench/trainer_peft.py --model DIR --train train.jsonl --eval eval.jsonl \
        --batch 8 --epochs 1 --lr 2e-4 --rank 8 --alpha 16 --threads 2 --seed 0

Each record is ``prompt`` + ``completion`` tokens + EOS, the loss on the completion and
EOS only (labels -100 on the prompt), batches padded to their longest example (the
default collation: no packing, no grouping by length); LoRA r / alpha on all linear
layers but the head; AdamW (torch), cosine schedule without warmup, gradient clipping at
1.0, float32 on CPU. After training, the held-out loss is the mean cross entropy over
every completion token of the eval file (summed, then divided, as lora-cli's). Prints
``RESULT {json}`` with the training seconds, loss tokens and the held-out loss.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def encode(tok, record: dict, max_len: int) -> dict:
    prompt = tok(record["prompt"], add_special_tokens=False)["input_ids"]
    answer = tok(record["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (prompt + answer)[:max_len]
    labels = ([-100] * len(prompt) + answer)[:max_len]
    # the model sees ids[:-1] and predicts ids[1:], as lora-cli does; the Trainer's model
    # shifts internally, so the labels are passed unshifted
    return {"input_ids": ids, "labels": labels}


def collate(pad_id: int):
    import torch

    def pad(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return pad


def heldout_loss(model, tok, rows: list[dict], batch: int) -> float:
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    pad = collate(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            b = pad(rows[start:start + batch])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / max(count, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    started = time.perf_counter()

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.set_seed(args.seed)
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    train = [encode(tok, r, args.max_len) for r in records(args.train)]
    held = [encode(tok, r, args.max_len) for r in records(args.eval)]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    targs = transformers.TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch, num_train_epochs=args.epochs,
        max_steps=args.max_steps, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=args.seed, data_seed=args.seed,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=train, data_collator=collate(pad_id))
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    steps = out.global_step
    seen = min(len(train), steps * args.batch) if args.max_steps > 0 else len(train) * args.epochs
    loss_tokens = sum(sum(1 for y in r["labels"][1:] if y != -100) for r in train)
    loss_tokens = loss_tokens * seen // len(train)
    result = {"tool": "trainer+peft", "train_s": train_s, "steps": steps, "loss_tokens": loss_tokens,
              "train_loss": out.training_loss, "heldout_loss": heldout_loss(model, tok, held, args.batch),
              "script_s": time.perf_counter() - started, "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
