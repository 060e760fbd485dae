"""The lora-cli benchmark: ours vs PEFT vs full fine-tuning vs the frozen floor.

    python bench/run.py --tier A,B,C --out bench/results.json --markdown bench/RESULTS.md
    python bench/run.py --quick --tier A,B --repeats 1          # a smoke run

One fresh process per (tool, configuration), tools alternated (floor, full, then PEFT,
ours for each LoRA setting) in every repeat, warm-up steps discarded, medians and spreads
reported, ratios taken inside one interleaved run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from spec import ADAMW, SIZES, TARGETS, ideal, llama_linears

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("worker.py")
PARITY_RTOL = 1e-5
DEFAULT_STEPS = {"A": (20, 5), "tiny": (5, 2), "S": (10, 3), "M": (5, 2)}   # (timed, warm-up)


# --- plan ------------------------------------------------------------------------------

def plan(args) -> list[dict]:
    """Groups of runs: one base setting (floor, full) with the LoRA settings on it."""
    groups = []
    if "A" in args.tier:
        Ns, shapes, ranks = ([256], [(768, 768)], [8]) if args.quick else \
            ([256, 1024, 4096], [(768, 768), (768, 3072), (3072, 768)], [8, 64])
        for N in Ns:
            for k, d in shapes:
                base = {"tier": "A", "N": N, "k": k, "d": d, **_steps(args, "A")}
                loras = [{"r": r, "alpha": 2 * r, "dropout": p} for r in ranks for p in args.dropouts]
                groups.append({"name": f"A N={N} {k}x{d}", "base": base, "loras": loras})
    if "B" in args.tier:
        for size in args.sizes:
            base = {"tier": "B", "size": size, **_steps(args, size)}
            loras = [{"targets": t, "r": 16, "alpha": 32, "dropout": p}
                     for t in (["all"] if args.quick else ["all", "qv"]) for p in args.dropouts]
            if args.dora:   # DoRA rows: ours DoRA against PEFT DoRA, and against ours LoRA (dora_over_lora)
                loras += [{"targets": "all", "r": 16, "alpha": 32, "dropout": p, "dora": True} for p in args.dropouts]
            groups.append({"name": f"B {size}", "base": base, "loras": loras})
    return groups


def _steps(args, key: str) -> dict:
    steps, warmup = DEFAULT_STEPS[key]
    return {"steps": args.steps or steps, "warmup": args.warmup if args.warmup is not None else warmup,
            "seed": args.seed, "threads": args.threads}


def lora_name(lora: dict) -> str:
    targets = f"{lora['targets']} " if "targets" in lora else ""
    return f"{targets}r={lora['r']} p={lora['dropout']:g}{' DoRA' if lora.get('dora') else ''}"


# --- processes ---------------------------------------------------------------------------

def run_process(cmd: list[str], env: dict) -> dict:
    """Wall time, peak RSS (this child alone, via wait4) and output of one command."""
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().decode(errors="replace")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "rc": proc.returncode, "output": output}


def run_worker(cfg: dict, env: dict) -> dict:
    done = run_process([sys.executable, str(WORKER), "--json-config", json.dumps(cfg)], env)
    for line in done["output"].splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "process_wall_s": done["wall_s"]}
    return {"config": cfg, "error": done["output"][-3000:], "rc": done["rc"]}


def subprocess_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}


# --- statistics and ratios ----------------------------------------------------------------

def stats(runs: list[dict]) -> dict | None:
    """Median and spread across repeats of the per-run median step time, and the rest."""
    runs = [r for r in runs if "error" not in r]
    if not runs:
        return None
    t = sorted(r["step_s"] for r in runs)
    q = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else [t[0]] * 3
    med = statistics.median
    return {
        "n": len(t), "median_s": q[1], "min_s": t[0], "max_s": t[-1], "q1_s": q[0], "q3_s": q[2],
        "tokens_per_s": med(r["tokens_per_s"] for r in runs),
        "peak_rss_mb": med(r["peak_rss_mb"] for r in runs),
        "trainable_params": runs[0]["trainable_params"],
        "adapter_bytes": runs[0]["adapter_bytes"],
        "final_loss": runs[0]["final_loss"],
        "losses": runs[0]["losses"],
    }


def parity(peft_runs: list[dict], ours_runs: list[dict], dropout: float) -> dict:
    """Losses over the timed steps must agree to PARITY_RTOL when dropout is 0 (with dropout
    the tools draw different masks: the losses are only shown side by side)."""
    if not peft_runs or not ours_runs:
        return {"checked": False, "ok": None, "reason": "PEFT or ours was not run (--variants)"}
    pairs = [(p, o) for p, o in zip(peft_runs, ours_runs) if "error" not in p and "error" not in o]
    if not pairs:
        return {"checked": False, "ok": None, "reason": "a run failed"}
    diff = max(abs(a - b) / max(abs(a), 1e-12) for p, o in pairs for a, b in zip(p["losses"], o["losses"]))
    same = all(p["trainable_params"] == o["trainable_params"] and p["base_checksum"] == o["base_checksum"]
               for p, o in pairs)
    if dropout:
        return {"checked": False, "ok": None, "max_rel_diff": diff, "same_base_and_params": same,
                "reason": "dropout > 0: the tools draw different masks"}
    return {"checked": True, "ok": diff <= PARITY_RTOL and same, "max_rel_diff": diff,
            "same_base_and_params": same, "rtol": PARITY_RTOL}


def ratio(a: dict | None, b: dict | None, key: str = "median_s") -> float | None:
    return a[key] / b[key] if a and b else None


def make_row(group: dict, lora: dict, runs: dict) -> dict:
    s = {v: stats(runs[v]) for v in ("floor", "full", "peft", "ours")}
    base = group["base"]
    if base["tier"] == "A":
        linears, adapted = [("linear", base["k"], base["d"])], ["linear"]
    else:
        linears, adapted = llama_linears(base["size"]), TARGETS[lora["targets"]]
    removed = None   # meaningless (noise) unless PEFT is slower than the floor
    if s["peft"] and s["ours"] and s["floor"] and s["peft"]["median_s"] > s["floor"]["median_s"]:
        removed = (s["peft"]["median_s"] - s["ours"]["median_s"]) / (s["peft"]["median_s"] - s["floor"]["median_s"])
    return {
        "tier": base["tier"], "name": f"{group['name']} {lora_name(lora)}", "config": {**base, **lora},
        "stats": s,
        "ratios": {"ours_over_peft_time": ratio(s["ours"], s["peft"]),
                   "ours_over_peft_rss": ratio(s["ours"], s["peft"], "peak_rss_mb"),
                   "ours_over_full": ratio(s["ours"], s["full"]),
                   "ours_over_floor": ratio(s["ours"], s["floor"]),
                   "peft_over_floor": ratio(s["peft"], s["floor"]),
                   "overhead_removed": removed},
        "ideal": ideal(linears, adapted, lora["r"]),
        "parity": parity(runs["peft"], runs["ours"], lora["dropout"]),
        "runs": runs,
    }


def add_dora_ratios(rows: list[dict]) -> None:
    """Each DoRA row also gets ours DoRA / ours LoRA (time and RSS) against the plain LoRA
    row of the same group, targets, rank and dropout (None when that row is absent)."""
    def same(r):
        return tuple(r["config"].get(k) for k in ("targets", "r", "alpha", "dropout"))
    plain = {same(r): r for r in rows if not r["config"].get("dora")}
    for r in rows:
        if r["config"].get("dora"):
            lora = plain.get(same(r))
            ours = lora["stats"]["ours"] if lora else None
            r["ratios"]["dora_over_lora_time"] = ratio(r["stats"]["ours"], ours)
            r["ratios"]["dora_over_lora_rss"] = ratio(r["stats"]["ours"], ours, "peak_rss_mb")


# --- tier C: the CLI ------------------------------------------------------------------------

def bench_cli(args, env: dict) -> dict:
    """Wall time and peak RSS of `lora-train CONFIG` and of `lora-train --help`, alternated."""
    exe = shutil.which("lora-train")
    cmd = [exe] if exe else [sys.executable, "-m", "lora_cli", "train"]
    config = args.cli_config if (ROOT / args.cli_config).exists() else "configs/seed_linear.yaml"
    if config != args.cli_config:
        print(f"  {args.cli_config} not found: timing {config} instead", flush=True)
    runs = {"help": [], "train": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            train = run_process(cmd + [config, f"output_dir={tmp}/run", "--overwrite"], env)
        runs["train"].append(train)
        runs["help"].append(run_process(cmd + ["--help"], env))
    out = {"command": cmd, "config": config, "requested_config": args.cli_config}
    for name, rs in runs.items():
        walls = sorted(r["wall_s"] for r in rs)
        out[name] = {"median_wall_s": statistics.median(walls), "min_wall_s": walls[0], "max_wall_s": walls[-1],
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                     "ok": all(r["rc"] == 0 for r in rs),
                     "runs": [{k: v for k, v in r.items() if k != "output"} for r in rs]}
        if not out[name]["ok"]:
            out[name]["error"] = next(r["output"][-2000:] for r in rs if r["rc"] != 0)
    return out


# --- output -----------------------------------------------------------------------------------

def machine(threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    versions = {}
    for pkg in ("torch", "transformers", "peft", "lora-cli"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _t(s: dict | None) -> str:
    return f"{s['median_s']:.4f} ({s['min_s']:.4f}-{s['max_s']:.4f})" if s else "-"


def _x(v: float | None, fmt: str = ".2f") -> str:
    return format(v, fmt) if v is not None else "-"


def _parity(p: dict) -> str:
    if p["checked"]:
        return f"{'ok' if p['ok'] else 'FAIL'} {p['max_rel_diff']:.1e}"
    return "side by side" if p.get("max_rel_diff") is not None else "-"


HEADERS = ["configuration", "floor s", "full s", "PEFT s", "ours s", "ours/PEFT t", "ours/PEFT RSS",
           "ours/full (ideal)", "ours/floor (ideal)", "overhead removed", "loss PEFT / ours", "parity"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        s, q, i = r["stats"], r["ratios"], r["ideal"]
        losses = f"{s['peft']['final_loss']:.6f} / {s['ours']['final_loss']:.6f}" if s["peft"] and s["ours"] else "-"
        removed = f"{q['overhead_removed']:.0%}" if q["overhead_removed"] is not None else "-"
        out.append([r["name"], _t(s["floor"]), _t(s["full"]), _t(s["peft"]), _t(s["ours"]),
                    _x(q["ours_over_peft_time"]), _x(q["ours_over_peft_rss"]),
                    f"{_x(q['ours_over_full'])} ({i['ours_over_full']:.2f})",
                    f"{_x(q['ours_over_floor'])} ({i['ours_over_floor']:.2f})", removed, losses,
                    _parity(r["parity"])])
    return out


DORA_HEADERS = ["configuration", "ours DoRA s", "PEFT DoRA s", "ours DoRA / ours LoRA t", "ours / PEFT DoRA t",
                "ours / PEFT DoRA RSS", "parity"]


def dora_rows(rows: list[dict]) -> list[list[str]]:
    return [[r["name"], _t(r["stats"]["ours"]), _t(r["stats"]["peft"]), _x(r["ratios"].get("dora_over_lora_time")),
             _x(r["ratios"]["ours_over_peft_time"]), _x(r["ratios"]["ours_over_peft_rss"]), _parity(r["parity"])]
            for r in rows]


def render(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [headers, ["---"] * len(headers), *rows]
        return "\n".join("| " + " | ".join(r) + " |" for r in lines)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [headers, *rows])


def cli_rows(cli: dict) -> list[list[str]]:
    return [[f"lora-train {cli['config']}" if name == "train" else "lora-train --help",
             f"{cli[name]['median_wall_s']:.2f} ({cli[name]['min_wall_s']:.2f}-{cli[name]['max_wall_s']:.2f})",
             f"{cli[name]['peak_rss_mb']:.0f}", "ok" if cli[name]["ok"] else "FAILED"] for name in ("train", "help")]


def header(result: dict) -> str:
    m, st = result["machine"], result["settings"]
    adamw = ", ".join(f"{k}={v}" for k, v in st["adamw"].items())
    return (f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['versions']['torch']}, "
            f"{m['threads']} threads, {m['date']}. fp32, AdamW({adamw}); "
            f"{st['repeats']} repeats; median step (min-max over repeats).")


def report(result: dict, markdown: bool) -> str:
    parts = [header(result)]
    for tier in ("A", "B"):
        rows = [r for r in result["rows"] if r["tier"] == tier]
        if rows:
            parts.append(f"\nTier {tier}\n\n" + render(HEADERS, table_rows(rows), markdown))
    dora = [r for r in result["rows"] if r["config"].get("dora")]
    if dora:
        parts.append("\nTier B, DoRA (goals: DoRA/LoRA <= 1.15, ours/PEFT DoRA time <= 0.6, RSS <= 0.8)\n\n" +
                     render(DORA_HEADERS, dora_rows(dora), markdown))
    if result.get("cli"):
        parts.append("\nTier C\n\n" + render(["command", "wall s", "peak RSS MB", "status"],
                                             cli_rows(result["cli"]), markdown))
    return "\n".join(parts) + "\n"


# --- main -------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tier", default="A,B,C", type=lambda s: s.upper().split(","), help="A, B, C, comma-separated")
    p.add_argument("--out", default="bench/results.json", help="raw numbers and ratios as JSON")
    p.add_argument("--markdown", default=None, help="also write the tables as markdown here")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per (tool, configuration)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: per tier/size)")
    p.add_argument("--warmup", type=int, default=None, help="discarded steps per run (default: per tier/size)")
    p.add_argument("--quick", action="store_true", help="a tiny subset: A N=256 768x768 r=8; B all-linear")
    p.add_argument("--sizes", default=None, type=lambda s: s.split(","),
                   help=f"tier B model sizes among {','.join(SIZES)} (default S,M; S with --quick)")
    p.add_argument("--dropouts", default="0,0.05", type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--variants", default="floor,full,peft,ours", type=lambda s: s.split(","))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads in every worker")
    p.add_argument("--independent-masks", action="store_true",
                   help="ours draws one dropout mask per layer (lora.dropout_shared: false); default: layers "
                        "reading one input share a mask, as lora-train does by default")
    p.add_argument("--dora", action=argparse.BooleanOptionalAction, default=None,
                   help="tier B DoRA rows (all-linear, r=16): ours and PEFT with use_dora; default: on, "
                        "off with --quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cli-config", default="configs/quickstart.yaml", help="tier C config (relative to the repo)")
    args = p.parse_args(argv)
    args.sizes = args.sizes or (["S"] if args.quick else ["S", "M"])
    args.dora = (not args.quick) if args.dora is None else args.dora
    for what, got, known in [("--tier", args.tier, "ABC"), ("--sizes", args.sizes, SIZES),
                             ("--variants", args.variants, ("floor", "full", "peft", "ours"))]:
        if set(got) - set(known):
            p.error(f"{what}: unknown {', '.join(sorted(set(got) - set(known)))}; choose from {', '.join(known)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env = subprocess_env(args.threads)
    result = {"machine": machine(args.threads),
              "settings": {"repeats": args.repeats, "threads": args.threads, "seed": args.seed, "dtype": "float32",
                           "device": "cpu", "adamw": ADAMW, "parity_rtol": PARITY_RTOL,
                           "tiers": args.tier, "quick": args.quick, "variants": args.variants,
                           "dropout_shared": not args.independent_masks},
              "rows": [], "cli": None}
    print(header(result), flush=True)
    all_runs = []
    for group in plan(args):
        # floor, full, then PEFT, ours for each LoRA setting (i indexes group["loras"])
        order = [("floor", None), ("full", None)] + \
            [(v, i) for i in range(len(group["loras"])) for v in ("peft", "ours")]
        runs = {key: [] for key in order}
        for rep in range(args.repeats):
            for variant, i in order:
                if variant not in args.variants:
                    continue
                cfg = {**group["base"], **(group["loras"][i] if i is not None else {}), "variant": variant,
                       "dropout_shared": not args.independent_masks}
                r = run_worker(cfg, env)
                runs[variant, i].append(r)
                all_runs.append(r)
                label = lora_name(group["loras"][i]) if i is not None else ""
                print(f"  {group['name']} {label} {variant} #{rep}: " +
                      (f"{r['step_s']:.4f} s/step, {r['peak_rss_mb']:.0f} MB, loss {r['final_loss']:.6f}"
                       if "error" not in r else "FAILED\n" + r["error"]), flush=True)
        rows = [make_row(group, lora, {"floor": runs["floor", None], "full": runs["full", None],
                                       "peft": runs["peft", i], "ours": runs["ours", i]})
                for i, lora in enumerate(group["loras"])]
        add_dora_ratios(rows)
        result["rows"] += rows
    if "C" in args.tier:
        result["cli"] = bench_cli(args, env)
    text = report(result, markdown=False)
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(report(result, markdown=True))
    errors = sum("error" in r for r in all_runs)
    if result["cli"]:
        errors += sum(not result["cli"][name]["ok"] for name in ("train", "help"))
    failed = [r["name"] for r in result["rows"] if r["parity"]["checked"] and not r["parity"]["ok"]]
    if errors:
        print(f"{errors} runs FAILED (their errors are in {args.out})")
    if failed:
        print("PARITY FAILED: " + "; ".join(failed))
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
