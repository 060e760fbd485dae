"""Regenerate the example assets shipped in data/: ``python data/make_quickstart.py``.

Two examples, both deterministic (fixed seeds):

quickstart/   a tiny byte-level ``gpt`` base and a fine-tuning task it has never seen.
    The base is pretrained (on the CPU, in a few minutes) on records followed by an
    English description of them:

        name=alice age=31 city=paris
        alice is 31 and lives in paris.<eos>

    The fine-tuning task rewrites the same kind of record as JSON, a format the base
    never saw (no braces, no quotes anywhere in its pretraining text):

        prompt:     "name=alice age=31 city=paris\\n"
        completion: '{"name": "alice", "age": 31, "city": "paris"}'

    A model sees ``prompt + completion + <eos>`` (no separator; the prompt ends with its
    newline), and only completion tokens count in the loss.

seed_linear/  the textbook LoRA example: y = 3 * sum(x) + 2 + noise over 10 features,
    and a frozen random 10 -> 1 linear base (no bias) to adapt.

Writes (sizes printed at the end):
    data/quickstart/base.safetensors   pretrained gpt base (args in configs/quickstart.yaml)
    data/quickstart/train.jsonl        fine-tuning records {"prompt", "completion"}
    data/quickstart/eval.jsonl         held-out records
    data/seed_linear/train.csv, eval.csv, base.safetensors
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from lora_cli.models import LinearModel, build_model, save_state_dict  # noqa: E402
from lora_cli.models.tokenizers import ByteTokenizer  # noqa: E402

SEED = 0

# Must equal model.args in configs/quickstart.yaml.
GPT_ARGS = {"vocab_size": 257, "max_seq_len": 128, "n_layer": 4, "n_head": 4, "d_model": 128}

# Pretraining: about 2-3 minutes on 2 CPU cores.
PRETRAIN = {"steps": 700, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "warmup": 50, "n_docs": 20000}
N_TRAIN, N_EVAL = 1000, 200

# ----------------------------------------------------------------------------- records

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
         "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter",
         "yara", "zoe", "liam", "emma", "noah", "mia", "omar", "lena", "hugo", "ines", "kai"]
FIELDS = {
    "age": list(range(18, 90)),
    "city": ["paris", "london", "berlin", "madrid", "rome", "oslo", "vienna", "prague", "lisbon",
             "dublin", "tokyo", "seoul", "lima", "quito", "cairo", "nairobi", "delhi", "sydney",
             "austin", "boston", "denver", "toronto", "riga", "porto"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "black", "white",
              "gray", "teal", "brown"],
    "pet": ["cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "ferret", "horse",
            "snake"],
    "job": ["baker", "nurse", "pilot", "teacher", "farmer", "painter", "lawyer", "chef", "doctor",
            "plumber", "writer", "dentist"],
}
CLAUSES = {  # how the pretraining text describes each field
    "age": "is {}",
    "city": "lives in {}",
    "color": "likes {}",
    "pet": "has a {}",
    "job": "works as a {}",
}


def random_record(rng: random.Random) -> dict:
    """A name plus 1-2 other fields, in random order: {'age': 31, 'name': 'alice', ...}."""
    keys = ["name"] + rng.sample(sorted(FIELDS), rng.randint(1, 2))
    rng.shuffle(keys)
    return {k: rng.choice(NAMES) if k == "name" else rng.choice(FIELDS[k]) for k in keys}


def record_line(record: dict) -> str:
    """'name=alice age=31 city=paris'."""
    return " ".join(f"{k}={v}" for k, v in record.items())


def describe(record: dict) -> str:
    """'alice is 31 and lives in paris.': the pretraining target for a record."""
    clauses = [CLAUSES[k].format(v) for k, v in record.items() if k != "name"]
    text = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
    return f"{record['name']} {text}."


def chatter(rng: random.Random) -> str:
    """Other pretraining text, so the base knows every punctuation byte JSON uses
    (quotes, braces, colons, commas) without ever seeing JSON itself."""
    a, b = rng.sample(NAMES, 2)
    kind = rng.randrange(3)
    if kind == 0:
        return f'{a} says: "{b} {CLAUSES["pet"].format(rng.choice(FIELDS["pet"]))}, right?"'
    if kind == 1:
        colors = ", ".join(rng.sample(FIELDS["color"], rng.randint(2, 4)))
        return f"colors {a} likes: {{{colors}}}."
    return f'{a} asked {b}: "where do you live?" {b}: "in {rng.choice(FIELDS["city"])}."'


def as_json(record: dict) -> str:
    """'{"name": "alice", "age": 31, "city": "paris"}': the fine-tuning target (keys in order)."""
    return json.dumps(record)


# ----------------------------------------------------------------------------- pretraining

def pretraining_stream(rng: random.Random, n_docs: int, tok: ByteTokenizer) -> torch.Tensor:
    """Token ids of ``n_docs`` documents, each ending in eos, concatenated: (N,).

    Four in five are 'record\\ndescription', the rest :func:`chatter`.
    """
    ids: list[int] = []
    for _ in range(n_docs):
        if rng.random() < 0.8:
            record = random_record(rng)
            text = record_line(record) + "\n" + describe(record)
        else:
            text = chatter(rng)
        ids += tok.encode(text, eos=True)
    return torch.tensor(ids, dtype=torch.long)


def pretrain(model: torch.nn.Module, stream: torch.Tensor, *, steps: int, batch_size: int, seq_len: int,
             lr: float, warmup: int, seed: int) -> list[float]:
    """Next-token training on random windows of ``stream``; prints and returns the loss every 100 steps."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        # linear warmup, then cosine decay to 10% of lr
        frac = step / warmup if step < warmup else 0.55 + 0.45 * math.cos(math.pi * (step - warmup) / (steps - warmup))
        for group in opt.param_groups:
            group["lr"] = lr * frac
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=g)
        window = torch.stack([stream[s:s + seq_len + 1] for s in starts])   # (B, T+1)
        x, y = window[:, :-1], window[:, 1:]                                 # (B, T) each
        logits = model(x)                                                    # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
            print(f"  pretraining step {step:4d}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return losses


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_quickstart(out_dir: Path) -> list[Path]:
    """Pretrain the quickstart base and write it with the fine-tuning data; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    rng = random.Random(SEED)
    torch.manual_seed(SEED)

    # Fine-tuning data first: unique prompts, eval disjoint from train.
    seen: set[str] = set()
    rows = []
    while len(rows) < N_TRAIN + N_EVAL:
        record = random_record(rng)
        prompt = record_line(record) + "\n"
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "completion": as_json(record)})
    write_jsonl(out_dir / "train.jsonl", rows[:N_TRAIN])
    write_jsonl(out_dir / "eval.jsonl", rows[N_TRAIN:])

    model = build_model(arch="gpt", args=GPT_ARGS)
    stream = pretraining_stream(rng, PRETRAIN["n_docs"], tok)
    t0 = time.time()
    losses = pretrain(model, stream, steps=PRETRAIN["steps"], batch_size=PRETRAIN["batch_size"],
                      seq_len=PRETRAIN["seq_len"], lr=PRETRAIN["lr"], warmup=PRETRAIN["warmup"], seed=SEED)
    print(f"pretrained gpt {GPT_ARGS} on {len(stream):,} tokens in {time.time() - t0:.0f}s "
          f"(final loss {losses[-1]:.3f})")
    metadata = {"arch": "gpt", "args": json.dumps(GPT_ARGS), "made_by": "data/make_quickstart.py"}
    save_state_dict(model.state_dict(), out_dir / "base.safetensors", metadata=metadata)
    return [out_dir / "base.safetensors", out_dir / "train.jsonl", out_dir / "eval.jsonl"]


# ----------------------------------------------------------------------------- seed_linear

def make_seed_linear(out_dir: Path, n_train: int = 100, n_eval: int = 50) -> list[Path]:
    """y = 3 * sum(x) + 2 + 0.5 * noise over x ~ N(0, 1)^10, and a random bias-free 10 -> 1 base."""
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(SEED)
    for name, n in (("train.csv", n_train), ("eval.csv", n_eval)):
        x = torch.randn(n, 10, generator=g)                                   # (N, 10)
        y = 3 * x.sum(dim=1) + 2 + 0.5 * torch.randn(n, generator=g)          # (N,)
        with open(out_dir / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([f"x{i}" for i in range(10)] + ["y"])
            for xi, yi in zip(x.tolist(), y.tolist()):
                writer.writerow([f"{v:.6f}" for v in xi] + [f"{yi:.6f}"])
    torch.manual_seed(SEED)
    base = LinearModel(10, 1, bias=False)
    save_state_dict(base.state_dict(), out_dir / "base.safetensors",
                    metadata={"arch": "linear", "args": json.dumps({"in_features": 10, "out_features": 1,
                                                                     "bias": False})})
    return [out_dir / "train.csv", out_dir / "eval.csv", out_dir / "base.safetensors"]


def main() -> None:
    torch.set_num_threads(2)
    here = Path(__file__).resolve().parent
    written = make_seed_linear(here / "seed_linear") + make_quickstart(here / "quickstart")
    for path in written:
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1024:,.0f} KiB)")


if __name__ == "__main__":
    main()
