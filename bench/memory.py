"""The memory tier: peak RSS, step time and loss of lora-train on Llama-shaped built-in
``gpt`` models, for a float32, an NF4 and an int8 base, each with and without gradient
checkpointing, next to the plan's estimate (``lora-train --dry-run``) of the same run.

Each variant runs in a fresh process: it warms torch up (kernels, autograd, AdamW), reads
its RSS, trains ``--steps`` steps through lora-cli's own ``train()``, and reports its peak
RSS (``ru_maxrss``) minus that baseline. glibc's mmap threshold is fixed
(``MALLOC_MMAP_THRESHOLD_``) so that freed blocks go back to the OS and RSS tracks what
the run holds; without it RSS also counts heap the run has freed. The base is random
(``model.base: null``) and the data synthetic: the losses compare variants of one run,
not models.

    python bench/memory.py --sizes S M L --steps 200 --out bench/results_memory.json
    python bench/memory.py --sizes tiny --steps 2               # a smoke run (seconds)

PEFT's own QLoRA path needs bitsandbytes' 4-bit kernels, which run on CUDA only: it is
not part of this CPU tier.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SIZES = {   # lora-cli's gpt (Llama-style); tiny is for the smoke test
    "tiny": dict(d_model=64, n_layer=2, n_head=4, vocab_size=257, batch=2, seq=32),
    "S": dict(d_model=512, n_layer=4, n_head=8, vocab_size=257, batch=8, seq=128),
    "M": dict(d_model=768, n_layer=12, n_head=12, vocab_size=257, batch=4, seq=256),
    "L": dict(d_model=1024, n_layer=16, n_head=16, vocab_size=257, batch=4, seq=256),
}
VARIANTS = [(q, ck) for q in (None, "nf4", "int8") for ck in (False, True)]

CHILD = r'''
import gc, json, os, resource, sys, time
import torch
from lora_cli.run.config import config_from_dict
from lora_cli.run.train import plan, train
from lora_cli.run.memory import estimate
cfg = config_from_dict(json.loads(sys.argv[1]))
if sys.argv[2] == "estimate":
    e = estimate(plan(cfg))
    print(json.dumps({"estimate_bytes": e.total(), "parts": dict(e.parts())}))
    raise SystemExit
m = torch.nn.Sequential(torch.nn.Embedding(300, 64), torch.nn.Linear(64, 300))
opt = torch.optim.AdamW(m.parameters(), foreach=True)
for _ in range(2):
    torch.nn.functional.cross_entropy(m(torch.randint(0, 300, (8, 64))).flatten(0, 1),
                                      torch.randint(0, 300, (8 * 64,))).backward()
    opt.step()
del m, opt
if cfg.model.quantize:                      # torchao's import is the runtime's, not the run's
    from lora_cli.models.quantize import _torchao
    _torchao()
gc.collect()
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
result = train(cfg)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss_bytes": peak - before, "seconds_per_step": result.train_seconds / result.steps,
                  "loss": result.train_loss}))
'''


def config(size: str, quantize: str | None, checkpointing: bool, steps: int, folder: Path) -> dict:
    s = SIZES[size]
    return {"seed": 0, "device": "cpu", "task": "causal_lm", "output_dir": str(folder / "run"),
            "model": {"arch": "gpt", "base": None, "quantize": quantize,
                      "args": {k: s[k] for k in ("d_model", "n_layer", "n_head", "vocab_size")}
                      | {"max_seq_len": s["seq"]}},
            "data": {"train": str(folder / "train.jsonl"), "max_seq_len": s["seq"]},
            "lora": {"rank": 8, "alpha": 16, "target_modules": "all-linear"},
            "train": {"max_steps": steps, "batch_size": s["batch"], "lr": 1e-3, "log_every": max(1, steps),
                      "gradient_checkpointing": checkpointing}}


def child(cfg: dict, mode: str, threads: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), mode], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"variant failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_size(size: str, steps: int, threads: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seq = SIZES[size]["seq"]
        text = "".join(json.dumps({"text": f"record {i}: " + ("abc xyz " * seq)[: seq - 16]}) + "\n"
                       for i in range(256))
        (folder / "train.jsonl").write_text(text)
        for quantize, ck in VARIANTS:
            cfg = config(size, quantize, ck, steps, folder)
            est = child(cfg, "estimate", threads)
            cfg["output_dir"] = str(folder / f"run-{quantize}-{ck}")
            got = child(cfg, "measure", threads)
            rows.append({"size": size, "base": quantize or "float32", "checkpointing": ck, "steps": steps,
                         **got, **est})
    ref = {r["checkpointing"]: r for r in rows if r["base"] == "float32"}
    for r in rows:
        plain = ref[r["checkpointing"]]
        r["rss_vs_float32"] = r["peak_rss_bytes"] / plain["peak_rss_bytes"]
        r["loss_vs_float32"] = r["loss"] / plain["loss"] if plain["loss"] else None
        r["estimate_vs_measured"] = r["estimate_bytes"] / r["peak_rss_bytes"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["S", "M", "L"], choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = [r for size in args.sizes for r in run_size(size, args.steps, args.threads)]
    print(f"{'size':5} {'base':8} {'ckpt':5} {'peak MB':>9} {'est MB':>9} {'est/meas':>8} {'s/step':>7} "
          f"{'loss':>7} {'rss/f32':>7}")
    for r in rows:
        print(f"{r['size']:5} {r['base']:8} {str(r['checkpointing']):5} {r['peak_rss_bytes'] / 1e6:9.1f} "
              f"{r['estimate_bytes'] / 1e6:9.1f} {r['estimate_vs_measured']:8.2f} {r['seconds_per_step']:7.3f} "
              f"{r['loss']:7.4f} {r['rss_vs_float32']:7.2f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
