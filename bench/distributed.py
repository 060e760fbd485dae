"""Multi-worker training on CPU: gradient bytes exchanged, and throughput through the CLI.

    python bench/distributed.py                       # about 2-3 minutes on 2 cores
    python bench/distributed.py --quick               # a smoke run, well under a minute
    python bench/distributed.py --markdown /tmp/dist.md --out /tmp/dist.json

Part 1, gradient bytes (measured): two fresh gloo workers wrap a model the way
lora-cli does (``lora_cli.run.distributed.wrap``, DistributedDataParallel) once with only
the LoRA factors trainable and once as full fine-tuning (the same base model without
LoRA, every parameter trainable). A DDP comm hook adds up the bytes of every bucket
buffer it is handed, then does DDP's own allreduce (``default_hooks.allreduce_hook``).
Reported: bytes per optimizer step per worker, next to the analytic figure
(``lora_cli.run.distributed.gradient_bytes``: trainable numel x element size). A third
variant wraps the LoRA model with fsdp and counts FSDP2's all-gathers and
reduce-scatters (it has no comm hook).

Part 2, throughput (measured through the real CLI): ``lora-train CONFIG`` with
batch 2B against ``lora-train CONFIG --nproc-per-node 2`` with batch B per worker
(ddp and fsdp), so the global batch and the examples of every step are the same;
also the single process with OMP_NUM_THREADS=1, as a reference. One fresh run each,
order alternated per repeat. Startup is excluded: this script
timestamps the rows of output_dir/metrics.jsonl as they appear and takes the time
from the end of the first --skip-windows logging windows to the last row.

Fresh processes, side-by-side ratios from one run, medians and spreads, JSON + markdown. See bench/README.md ("Multi-worker").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                        # lora_cli from this checkout
from run import machine, render  # bench/ is sys.path[0]

CONFIG = "configs/quickstart.yaml"
# Part 1 models: the quickstart GPT as configured (its base file, LoRA r=8 on all-linear),
# and a larger GPT of the same family with random weights (cheap enough to build here).
COMM_MODELS = {
    "quickstart": [],
    "gpt-512x8": ["model.base=null",
                  "model.args={vocab_size: 257, max_seq_len: 128, n_layer: 8, n_head: 8, d_model: 512}"],
}
# Part 2 runs: one process (torch's default threads, then 1 thread as a reference), 2 workers.
KINDS = ("single", "single-1t", "ddp", "fsdp")
NAMES = {"single": "lora-train (1 process)", "single-1t": "lora-train, OMP_NUM_THREADS=1",
         "ddp": "--nproc-per-node 2, ddp", "fsdp": "--nproc-per-node 2, fsdp"}
LOSS_RTOL = 1e-4          # 1 worker vs 2 must train the same (only the summation order differs)
TIMEOUT_S = 600


# --- processes -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    """The environment a user would have: no thread counts forced, so the single process
    uses torch's default and lora-train's launcher picks the workers' (see the README)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    return env


def stop(proc: subprocess.Popen) -> None:
    """End a process this script started, with the workers it started (its own group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- memory of processes ---------------------------------------------------------------------

MEMORY_POLL_S = 0.05


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (one scan of /proc: parent ids from ``stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:                 # gone meanwhile
            continue
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])      # the name may hold spaces and parens
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def peak_rss(pid: int) -> tuple[int, int | None] | None:
    """(VmHWM in bytes: the process's peak resident set so far, its RANK or None), or None
    when it is gone. The kernel keeps VmHWM; reading it late loses nothing but the growth
    after the last read."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            hwm = next((int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:")), None)
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(v.split(b"=", 1) for v in fh.read().split(b"\0") if b"=" in v)
    except (OSError, StopIteration, ValueError):
        return None
    if hwm is None:
        return None
    rank = env.get(b"RANK")
    return hwm, int(rank) if rank is not None and rank.isdigit() else None


def watch_memory(root: int, done: threading.Event, peaks: dict[int, dict]) -> None:
    """Every MEMORY_POLL_S until ``done``: the peak RSS of ``root`` and each process below
    it, the last reading kept per pid (VmHWM only grows)."""
    while not done.is_set():
        for pid in descendants(root):
            got = peak_rss(pid)
            if got is not None:
                peaks[pid] = {"pid": pid, "rank": got[1], "peak_rss_bytes": got[0], "root": pid == root}
        done.wait(MEMORY_POLL_S)


def worker_memory(peaks: dict[int, dict], workers: int) -> tuple[list[dict], int | None]:
    """(per worker in rank order, the launcher's peak RSS or None). One process: the
    command's own process is the worker."""
    if workers == 1:
        root = [p for p in peaks.values() if p["root"]]
        return [{"rank": 0, "peak_rss_bytes": root[0]["peak_rss_bytes"]}] if root else [], None
    ranked = sorted((p for p in peaks.values() if p["rank"] is not None and not p["root"]), key=lambda p: p["rank"])
    launcher = next((p["peak_rss_bytes"] for p in peaks.values() if p["root"]), None)
    return [{"rank": p["rank"], "peak_rss_bytes": p["peak_rss_bytes"]} for p in ranked], launcher


def params_held(model) -> int:
    """Bytes of parameter storage this process holds for ``model`` right now: a sharded
    (DTensor) parameter counts its local shard, a gathered one its whole storage, each
    storage once."""
    seen, total = set(), 0
    for module in model.modules():
        for p in module._parameters.values():
            if p is None:
                continue
            t = p.to_local() if hasattr(p, "to_local") else p
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def track_params_held(model) -> dict:
    """Before each leaf module's forward (FSDP has gathered its unit by then), record the
    parameter bytes held; returns {"peak": bytes} updated as the model runs."""
    seen = {"peak": 0}

    def hook(module, args):
        seen["peak"] = max(seen["peak"], params_held(model))

    for module in model.modules():
        if not any(True for _ in module.children()) and module._parameters:
            module.register_forward_pre_hook(hook)
    return seen


# --- part 1: gradient bytes per step (worker side) -------------------------------------------

VARIANTS = ("adapter", "full", "adapter-fsdp")


def count_collectives(counter: dict):
    """Under fsdp there is no comm hook: count the tensors FSDP2 hands to torch.distributed's
    all_gather_single (the gathered output), reduce_scatter_single (the unsharded input) and
    all_reduce. Returns a function that puts the originals back."""
    import torch.distributed as tdist

    originals = {}
    for name, pos, key in (("all_gather_single", 0, "output_tensor"), ("reduce_scatter_single", 1, "input"),
                           ("all_reduce", 0, "tensor")):
        fn = originals[name] = getattr(tdist, name)

        def counted(*a, _fn=fn, _name=name, _pos=pos, _key=key, **kw):
            t = a[_pos] if len(a) > _pos else kw[_key]
            nbytes = t.numel() * t.element_size()
            counter["bytes"] += nbytes
            counter["ops"][_name] = counter["ops"].get(_name, 0) + nbytes
            return _fn(*a, **kw)
        setattr(tdist, name, counted)

    def restore():
        for name, fn in originals.items():
            setattr(tdist, name, fn)
    return restore


def comm_worker(spec: dict) -> None:
    """One rank of a 2-worker gloo group: for each variant, wrap with lora-cli's DDP, count
    the bytes its buckets hand to allreduce, run a few steps. Prints ``RESULT {json}``."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from lora_cli.run import distributed as dist
    from lora_cli.run import build as pipeline
    from lora_cli.run.config import load_config

    torch.set_num_threads(1)
    device = torch.device("cpu")
    cfg = load_config(ROOT / CONFIG, ["data.eval=null", *spec["overrides"]])
    world = dist.join("ddp", device)
    out = {"rank": world.rank, "world_size": world.size, "backend": torch.distributed.get_backend(),
           "variants": {}}
    for variant in VARIANTS:
        if variant in ("adapter", "adapter-fsdp"):
            built = pipeline.build(cfg)
            model, vocab = built.model, built.model_args["vocab_size"]
        else:                 # full fine-tuning: the base model alone, every parameter trained
            data = pipeline.load_data(cfg)
            model, args, _ = pipeline.build_base(cfg, data)
            vocab = args["vocab_size"]
            for p in model.parameters():
                p.requires_grad_(True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        own_sum = sum(p.numel() * p.element_size() for p in trainable)
        analytic = dist.gradient_bytes(model, world)
        counter = {"bytes": 0, "buckets": [], "ops": {}}
        if variant == "adapter-fsdp":
            engine = dist.wrap(model, dist.World(world.rank, world.size, world.local_rank, "fsdp"), device)
            restore = count_collectives(counter)
        else:
            engine = dist.wrap(model, world, device)
            if type(engine).__name__ != "DistributedDataParallel":
                raise SystemExit(f"lora_cli.run.distributed.wrap returned {type(engine).__name__}, not DDP")

            def count(state: dict, bucket):
                buf = bucket.buffer()
                state["bytes"] += buf.numel() * buf.element_size()
                state["buckets"].append(buf.numel() * buf.element_size())
                return default_hooks.allreduce_hook(None, bucket)   # DDP's own averaging

            engine.register_comm_hook(counter, count)
            restore = None
        optimizer = torch.optim.SGD([p for p in engine.parameters() if p.requires_grad], lr=1e-3)
        in_forward = track_params_held(dist.inner(engine))
        gen = torch.Generator().manual_seed(1000 + world.rank)   # each rank its own batch
        steps = []
        engine.train()
        for _ in range(spec["steps"]):
            ids = torch.randint(0, vocab, (spec["batch"], spec["seq"] + 1), generator=gen)   # (B, T+1)
            counter["bytes"], counter["buckets"], counter["ops"] = 0, [], {}
            t0 = time.perf_counter()
            logits = engine(ids[:, :-1])                                                # (B, T, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps.append({"bytes": counter["bytes"], "buckets": list(counter["buckets"]),
                          "ops": dict(counter["ops"]), "step_s": time.perf_counter() - t0})
        if restore:
            restore()
        out["variants"][variant] = {
            "param_bytes_held": params_held(dist.inner(engine)),             # between steps
            "param_bytes_held_in_forward": in_forward["peak"],               # the most while a layer runs
            "param_bytes_whole": dist.weight_bytes(model),
            "trainable_params": sum(p.numel() for p in trainable),
            "total_params": sum(p.numel() for p in model.parameters()),
            "trainable_tensors": len(trainable),
            "analytic_bytes": analytic, "analytic_own_sum_bytes": own_sum,
            "steps": steps,
        }
        del engine, model, optimizer
    torch.distributed.barrier()           # both ranks done before either tears down
    torch.distributed.destroy_process_group()
    print("RESULT " + json.dumps(out), flush=True)


# --- part 1: parent side ---------------------------------------------------------------------

def run_comm(name: str, overrides: list[str], args) -> dict:
    """Start ranks 0 and 1 in fresh processes (env:// rendezvous on 127.0.0.1) and collect them."""
    spec = {"name": name, "overrides": overrides, "steps": args.comm_steps, "batch": 4, "seq": 64}
    port = free_port()
    procs, texts = [], []
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(2)]
        for rank, log in enumerate(logs):
            env = {**clean_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen([sys.executable, __file__, "--comm-worker", json.dumps(spec)], cwd=ROOT,
                                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + TIMEOUT_S
        for proc in procs:
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p in procs:
                    stop(p)
        for log in logs:
            log.seek(0)
            texts.append(log.read().decode(errors="replace"))
    ranks, errors = [], []
    for rank, (proc, text) in enumerate(zip(procs, texts)):
        got = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not got:
            errors.append(f"rank {rank} exit {proc.returncode}:\n{text[-3000:]}")
        else:
            ranks.append(got[0])
    if errors:
        return {"name": name, "overrides": overrides, "error": "\n".join(errors)}
    row = {"name": name, "overrides": overrides, "setup": spec, "ranks": ranks, "variants": {}}
    for variant in VARIANTS:
        per_rank = [r["variants"][variant] for r in ranks]
        v = per_rank[0]
        measured = [s["bytes"] for r in per_rank for s in r["steps"]]
        ops = {}
        for op in v["steps"][-1]["ops"]:
            ops[op] = statistics.median(s["ops"].get(op, 0) for r in per_rank for s in r["steps"])
        row["variants"][variant] = {
            "trainable_params": v["trainable_params"], "total_params": v["total_params"],
            "analytic_bytes": v["analytic_bytes"],
            "measured_bytes_per_step": statistics.median(measured),
            "measured_min": min(measured), "measured_max": max(measured),
            "buckets_per_step": [len(s["buckets"]) for s in v["steps"]],
            "ops_bytes_per_step": ops,
            "param_bytes_whole": v["param_bytes_whole"],
            "param_bytes_held_per_rank": [r["param_bytes_held"] for r in per_rank],
            "param_bytes_held_in_forward_per_rank": [r["param_bytes_held_in_forward"] for r in per_rank],
            "same_every_step_and_rank": len(set(measured)) == 1,
            "matches_analytic": set(measured) == {v["analytic_bytes"]} == {v["analytic_own_sum_bytes"]},
        }
    a, f, fs = (row["variants"][v] for v in VARIANTS)
    row["full_over_adapter_measured"] = f["measured_bytes_per_step"] / a["measured_bytes_per_step"]
    row["full_over_adapter_analytic"] = f["analytic_bytes"] / a["analytic_bytes"]
    row["fsdp_over_ddp_adapter_measured"] = fs["measured_bytes_per_step"] / a["measured_bytes_per_step"]
    return row


# --- part 2: throughput through the CLI -------------------------------------------------------

def cli_command() -> list[str]:
    exe = shutil.which("lora-train")
    return [exe] if exe else [sys.executable, "-m", "lora_cli", "train"]


def run_cli(kind: str, args, out_dir: Path) -> dict:
    """One ``lora-train`` run; rows of metrics.jsonl timestamped as they are written."""
    workers = 1 if kind.startswith("single") else 2
    batch = args.batch * 2 if workers == 1 else args.batch
    overrides = [f"output_dir={out_dir}", f"train.max_steps={args.steps}", f"train.log_every={args.log_every}",
                 f"train.batch_size={batch}", "train.grad_accum=1", "data.eval=null", "train.eval_every=null",
                 "train.save_every=null"]
    if workers > 1:
        overrides.append(f"train.strategy={kind}")
    cmd = cli_command() + [args.config, *overrides, "--overwrite"] + \
        (["--nproc-per-node", str(workers)] if workers > 1 else [])
    metrics = out_dir / "metrics.jsonl"
    rows: list[dict] = []
    appeared: list[float] = []          # rank 0 creates metrics.jsonl as its training loop starts
    done = threading.Event()

    def watch():                        # a look every 2 ms; rows are flushed as written
        seen = b""
        while True:
            finished = done.is_set()
            try:
                data = metrics.read_bytes()
                if not appeared:
                    appeared.append(time.perf_counter())
            except OSError:
                data = b""
            if len(data) > len(seen):
                now = time.perf_counter()
                for line in data[len(seen):].split(b"\n")[:-1]:
                    rows.append({**json.loads(line), "_t": now})
                seen = data[:data.rfind(b"\n") + 1]
            if finished:
                return
            time.sleep(0.002)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        env = {**clean_env(), **({"OMP_NUM_THREADS": "1"} if kind == "single-1t" else {})}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        peaks: dict[int, dict] = {}
        memory = threading.Thread(target=watch_memory, args=(proc.pid, done, peaks), daemon=True)
        memory.start()
        try:
            proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop(proc)
        wall = time.perf_counter() - t0
        done.set()
        watcher.join()
        memory.join()
        log.seek(0)
        output = log.read().decode(errors="replace")
    for r in rows:
        r["_t"] -= t0
    run = {"kind": kind, "workers": workers, "batch_per_worker": batch, "global_batch": batch * workers,
           "command": cmd, "rc": proc.returncode, "wall_s": wall, "loadavg_1min": [load_before, os.getloadavg()[0]],
           "rows": rows}
    run["worker_memory"], run["launcher_peak_rss_bytes"] = worker_memory(peaks, workers)
    train_rows = [r for r in rows if "loss" in r]
    if proc.returncode != 0 or len(train_rows) <= args.skip_windows:
        run["error"] = output[-3000:]
        return run
    run["warnings"] = sorted({line.strip() for line in output.splitlines()
                              if "warn" in line.lower() or "deprecat" in line.lower()})[:20]
    run["first_row_s"] = train_rows[0]["_t"]
    run["loop_start_s"] = appeared[0] - t0 if appeared else None
    run["exit_s"] = wall - rows[-1]["_t"]
    run["final_loss"] = train_rows[-1]["loss"]
    return run


def steady(run: dict, args, tokens_of_step) -> None:
    """Steady-state figures of one run: from the row that ends window --skip-windows to the
    last row (so startup, the first steps and process exit are all left out)."""
    train_rows = [r for r in run["rows"] if "loss" in r]
    a, b = train_rows[args.skip_windows - 1], train_rows[-1]
    seconds, steps = b["_t"] - a["_t"], b["step"] - a["step"]
    tokens = sum(tokens_of_step(s)[1] for s in range(a["step"] + 1, b["step"] + 1))
    examples = sum(tokens_of_step(s)[0] for s in range(a["step"] + 1, b["step"] + 1))
    run["steady"] = {"from_step": a["step"], "to_step": b["step"], "steps": steps, "seconds": seconds,
                     "step_s": seconds / steps, "examples_per_s": examples / seconds,
                     "tokens_per_s": tokens / seconds,
                     "cli_tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_rows[args.skip_windows:]),
                     "startup_s": run["loop_start_s"]}


def step_tokens(args):
    """(examples, real input tokens) of optimizer step s (1-based), from the data and the
    epoch order lora-cli uses (every worker count sees the same G examples at step s).
    Real = no padding: the CLI's own tokens_per_s counts padded positions."""
    from lora_cli import data as datalib
    from lora_cli.run.config import load_config
    from lora_cli.run.build import load_data

    cfg = load_config(ROOT / args.config, ["data.eval=null"])
    train = load_data(cfg).train
    lengths = [len(ids) - 1 for ids, _ in train.examples]     # inputs are ids[:-1]
    n, G = len(lengths), args.batch * 2
    per_epoch = math.ceil(n / G)
    orders: dict[int, list[int]] = {}

    def of(step: int) -> tuple[int, int]:
        epoch, i = divmod(step - 1, per_epoch)
        if epoch not in orders:
            orders[epoch] = datalib.epoch_order(n, seed=cfg.seed, epoch=epoch).tolist()
        idx = orders[epoch][i * G:(i + 1) * G]
        return len(idx), sum(lengths[j] for j in idx)
    return of, {"examples": n, "mean_input_tokens": sum(lengths) / n, "steps_per_epoch": per_epoch}


def summarize_throughput(runs: dict[str, list[dict]], threads: dict[str, int]) -> dict:
    def spread(values):
        values = sorted(values)
        return {"median": statistics.median(values), "min": values[0], "max": values[-1], "n": len(values)}
    out = {}
    for kind, rs in runs.items():
        ok = [r for r in rs if "steady" in r]
        if not ok:
            out[kind] = None
            continue
        out[kind] = {k: spread(r["steady"][k] for r in ok)
                     for k in ("tokens_per_s", "examples_per_s", "step_s", "cli_tokens_per_s")}
        out[kind]["startup_s"] = spread(r["loop_start_s"] for r in ok)
        out[kind]["exit_s"] = spread(r["exit_s"] for r in ok)
        out[kind]["wall_s"] = spread(r["wall_s"] for r in ok)
        out[kind]["final_loss"] = ok[0]["final_loss"]
        ranks = [[w["peak_rss_bytes"] for w in r["worker_memory"]] for r in ok if r.get("worker_memory")]
        out[kind]["peak_rss_bytes_per_worker"] = [spread(col) for col in zip(*ranks)] if ranks else None
        out[kind]["workers"], out[kind]["global_batch"] = ok[0]["workers"], ok[0]["global_batch"]
        out[kind]["threads"] = threads[kind]
    single = out.get("single")
    for kind in ("single-1t", "ddp", "fsdp"):
        if out.get(kind) and single:
            s = out[kind]
            s["over_single"] = s["tokens_per_s"]["median"] / single["tokens_per_s"]["median"]
            # paired: repeat i of this strategy against repeat i of the single process
            pairs = [a["steady"]["tokens_per_s"] / b["steady"]["tokens_per_s"]
                     for a, b in zip(runs[kind], runs["single"]) if "steady" in a and "steady" in b]
            s["over_single_paired"] = spread(pairs) if pairs else None
            rel = abs(s["final_loss"] - single["final_loss"]) / max(abs(single["final_loss"]), 1e-12)
            s["loss_rel_diff"], s["same_loss"] = rel, rel <= LOSS_RTOL
    return out


# --- tables ----------------------------------------------------------------------------------

def _mb(b: float) -> str:
    return f"{b / 2**20:.3f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def comm_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "variant", "trainable params", "measured bytes/step/worker", "analytic (trainable bytes)",
               "buckets/step", "vs LoRA ddp (measured)", "vs LoRA ddp (analytic)",
               "params held/worker (in forward)"]
    names = {"adapter": "LoRA, ddp", "full": "full fine-tuning, ddp", "adapter-fsdp": "LoRA, fsdp"}
    short = {"all_gather_single": "all-gather", "reduce_scatter_single": "reduce-scatter", "all_reduce": "all-reduce"}
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["name"], "FAILED", "-", "-", "-", "-", "-", "-", "-"])
            continue
        for variant in VARIANTS:
            v = r["variants"][variant]
            measured = f"{v['measured_bytes_per_step']:,.0f} ({_mb(v['measured_bytes_per_step'])})"
            if variant == "adapter-fsdp":
                measured += ": " + " + ".join(f"{short.get(op, op)} {_mb(b)}" for op, b in v["ops_bytes_per_step"].items())
            elif not v["matches_analytic"]:
                measured += " (differs)"
            ratio = {"adapter": "1", "full": f"{r['full_over_adapter_measured']:.1f}x",
                     "adapter-fsdp": f"{r['fsdp_over_ddp_adapter_measured']:.1f}x"}[variant]
            out.append([r["name"], names[variant], f"{v['trainable_params']:,} of {v['total_params']:,}", measured,
                        f"{v['analytic_bytes']:,}",
                        "/".join(map(str, v["buckets_per_step"])) if variant != "adapter-fsdp" else "-", ratio,
                        f"{r['full_over_adapter_analytic']:.1f}x" if variant == "full" else
                        ("1" if variant == "adapter" else "-"), held_cell(v)])
    return headers, out


def held_cell(v: dict) -> str:
    """Parameter bytes held by the busiest worker, between steps and (in parentheses) at
    most while a layer runs, as a share of the whole model's."""
    if "param_bytes_held_per_rank" not in v:
        return "-"
    held, peak, whole = max(v["param_bytes_held_per_rank"]), max(v["param_bytes_held_in_forward_per_rank"]), \
        v["param_bytes_whole"]
    return f"{_mb(held)} = {held / whole:.2f} of {_mb(whole)} ({_mb(peak)} = {peak / whole:.2f})"


def rss_cell(s: dict) -> str:
    per = s.get("peak_rss_bytes_per_worker")
    return " / ".join(f"{w['median'] / 2**20:.0f}" for w in per) + " MiB" if per else "-"


def throughput_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["run", "workers x batch x threads", "tokens/s (min-max)", "examples/s", "step s", "vs single (paired min-max)",
               "CLI tokens/s (padded)", "startup s", "final loss", "peak RSS per worker"]
    out = []
    for kind in KINDS:
        if kind not in summary:
            continue
        s = summary[kind]
        if not s:
            out.append([NAMES[kind], "-", "FAILED", "-", "-", "-", "-", "-", "-", "-"])
            continue
        t = s["tokens_per_s"]
        vs = "1" if kind == "single" else (f"{s['over_single']:.2f}" if kind == "single-1t" else
            f"{s['over_single']:.2f} ({s['over_single_paired']['min']:.2f}-{s['over_single_paired']['max']:.2f})"
            + ("" if s["same_loss"] else " LOSS DIFFERS"))
        batch = s["global_batch"] // s["workers"]
        threads = s["threads"]
        out.append([NAMES[kind], f"{s['workers']} x {batch} x {threads}", f"{t['median']:,.0f} ({t['min']:,.0f}-{t['max']:,.0f})",
                    f"{s['examples_per_s']['median']:.1f}", f"{s['step_s']['median']:.4f}", vs,
                    f"{s['cli_tokens_per_s']['median']:,.0f}", f"{s['startup_s']['median']:.1f}",
                    f"{s['final_loss']:.6f}", rss_cell(s)])
    return headers, out


def report(result: dict, markdown: bool) -> str:
    m, st = result["machine"], result["settings"]
    parts = [(f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['versions']['torch']}, {m['date']}, "
              f"lora-cli {m.get('lora_cli_commit') or '?'}. "
              f"fp32, CPU, gloo. Load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} "
              f"at end. {'Quick run. ' if st['quick'] else ''}")]
    if result["comm"]:
        h, rows = comm_table(result["comm"])
        parts.append(f"\nBytes handed to collectives per optimizer step and worker, 2 gloo workers, the model "
                     f"wrapped by lora_cli.run.distributed.wrap (ddp: a comm hook on every bucket; fsdp: FSDP2's "
                     f"all-gathers and reduce-scatters counted); {st['comm_steps']} steps, every step and rank "
                     f"counted, batch 4 x 64 tokens\n\n"
                     + render(h, rows, markdown))
    if result["throughput"]:
        tp = result["throughput"]
        h, rows = throughput_table(tp["summary"])
        parts.append(f"\nThroughput through lora-train, {st['config']}, global batch {tp['global_batch']}, "
                     f"{st['steps']} steps, steady state = steps {tp['steady_steps']} "
                     f"(rows of metrics.jsonl timestamped as written); {st['repeats']} repeats, order alternated; "
                     f"median (min-max). Threads: torch's default for one process, lora-train's "
                     f"choice for workers\n\n" + render(h, rows, markdown))
    return "\n".join(parts) + "\n"


def git_state() -> str | None:
    """The checkout's commit, '+dirty' when lora_cli/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "lora_cli"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


# --- main ------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results_distributed.json", help="raw numbers as JSON")
    p.add_argument("--markdown", default=None, help="also write the tables as markdown here")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: quickstart model only, 1 repeat, 12 steps (well under a minute)")
    p.add_argument("--parts", default="comm,throughput", type=lambda s: s.split(","),
                   help="comm (gradient bytes), throughput (the CLI), comma-separated")
    p.add_argument("--comm-models", default=None, type=lambda s: s.split(","),
                   help=f"among {','.join(COMM_MODELS)} (default: all; quickstart with --quick)")
    p.add_argument("--comm-steps", type=int, default=None, help="steps per comm variant (default 3; 2 with --quick)")
    p.add_argument("--config", default=CONFIG, help="the throughput config (relative to the repo)")
    p.add_argument("--batch", type=int, default=16, help="batch per worker; the single process gets twice this")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per CLI run (default 40; 12 with --quick)")
    p.add_argument("--log-every", type=int, default=None, help="train.log_every (default 5; 3 with --quick)")
    p.add_argument("--skip-windows", type=int, default=None,
                   help="logging windows left out at the start (default 2; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="fresh runs per configuration (default 3; 1 with --quick)")
    p.add_argument("--kinds", default=None, type=lambda s: s.split(","),
                   help=f"throughput runs among {','.join(KINDS)} (default: all; without single-1t with --quick)")
    p.add_argument("--comm-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.comm_models = args.comm_models or (["quickstart"] if q else list(COMM_MODELS))
    args.comm_steps = args.comm_steps or (2 if q else 3)
    args.steps = args.steps or (12 if q else 40)
    args.log_every = args.log_every or (3 if q else 5)
    args.skip_windows = args.skip_windows if args.skip_windows is not None else (1 if q else 2)
    args.repeats = args.repeats or (1 if q else 3)
    args.kinds = args.kinds or [k for k in KINDS if not (q and k == "single-1t")]
    if set(args.kinds) - set(KINDS) or "single" not in args.kinds:
        p.error(f"--kinds: choose from {', '.join(KINDS)}; single (the reference) must be among them")
    args.kinds = [k for k in KINDS if k in args.kinds]
    if set(args.comm_models) - set(COMM_MODELS):
        p.error(f"--comm-models: choose from {', '.join(COMM_MODELS)}")
    if set(args.parts) - {"comm", "throughput"}:
        p.error("--parts: choose from comm, throughput")
    if args.skip_windows < 1 or args.steps < args.log_every * (args.skip_windows + 1):
        p.error("need --skip-windows >= 1 and --steps >= --log-every x (--skip-windows + 1)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.comm_worker:
        comm_worker(json.loads(args.comm_worker))
        # The result is printed and the group destroyed. Leave without the interpreter's
        # teardown: after DDP comm hooks and FSDP in one process it has aborted ("terminate
        # called without an active exception", 1 run in ~6), which would lose a measurement.
        sys.stdout.flush()
        os._exit(0)
    from lora_cli.run.launch import worker_threads
    result = {"machine": machine(os.cpu_count()),
              "settings": {"quick": args.quick, "parts": args.parts, "config": args.config, "batch": args.batch,
                           "steps": args.steps, "log_every": args.log_every, "skip_windows": args.skip_windows,
                           "repeats": args.repeats, "comm_models": args.comm_models, "comm_steps": args.comm_steps,
                           "loss_rtol": LOSS_RTOL},
              "comm": [], "throughput": None}
    result["machine"]["lora_cli_commit"] = git_state()
    result["machine"]["loadavg_start"] = os.getloadavg()
    if result["machine"]["loadavg_start"][0] > 0.5:
        print(f"note: load average {result['machine']['loadavg_start'][0]:.2f} at start: "
              "other work on this machine skews the throughput figures", flush=True)
    failures = 0
    if "comm" in args.parts:
        for name in args.comm_models:
            row = run_comm(name, COMM_MODELS[name], args)
            result["comm"].append(row)
            if "error" in row:
                failures += 1
                print(f"  comm {name}: FAILED\n{row['error']}", flush=True)
            else:
                print(f"  comm {name}: " + ", ".join(f"{v} {row['variants'][v]['measured_bytes_per_step']:,.0f} B/step"
                                                     for v in VARIANTS), flush=True)
    if "throughput" in args.parts:
        tokens_of_step, data_info = step_tokens(args)      # imports torch here
        import torch
        default = torch.get_num_threads() if "OMP_NUM_THREADS" not in os.environ else os.cpu_count()
        threads = {"single": default, "single-1t": 1, "ddp": worker_threads(2), "fsdp": worker_threads(2)}
        runs: dict[str, list[dict]] = {kind: [] for kind in args.kinds}
        for rep in range(args.repeats):
            order = list(args.kinds) if rep % 2 == 0 else list(reversed(args.kinds))
            for kind in order:
                with tempfile.TemporaryDirectory() as tmp:
                    run = run_cli(kind, args, Path(tmp) / "run")
                if "error" not in run:
                    steady(run, args, tokens_of_step)
                runs[kind].append(run)
                s = run.get("steady")
                print(f"  {kind} #{rep}: " + (f"{s['tokens_per_s']:,.0f} tokens/s, {s['step_s']:.4f} s/step, "
                                              f"wall {run['wall_s']:.1f} s" if s else "FAILED\n" + run["error"]),
                      flush=True)
        summary = summarize_throughput(runs, threads)
        skip_to = args.log_every * args.skip_windows
        result["throughput"] = {
            "global_batch": args.batch * 2, "data": data_info,
            "steady_steps": f"{skip_to + 1}-{args.steps}",
            "threads": {**threads, "note": "single: torch's default; workers: set by lora-train "
                                           "(cores / workers) as OMP_NUM_THREADS is not set"},
            "summary": summary, "runs": runs}
        failures += sum("error" in r for rs in runs.values() for r in rs)
        failures += sum(1 for k in ("single-1t", "ddp", "fsdp") if summary.get(k) and not summary[k]["same_loss"])
    result["machine"]["loadavg_end"] = os.getloadavg()
    print("\n" + report(result, markdown=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(report(result, markdown=True))
    if failures:
        print(f"{failures} runs FAILED or disagreed (details in {args.out})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
