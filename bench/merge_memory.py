"""Peak memory of `lora-merge` on a large safetensors base, against the base's size.

    python bench/merge_memory.py [--mb 400] [--out bench/merge_memory.json]

Builds a random base of about --mb megabytes (square float32 Linear layers named like a
transformer's), trains nothing but perturbs an adapter on every layer, then runs
`lora-merge` in a fresh process and reads its peak RSS (ru_maxrss of the child). The
same is measured for `python -c "import lora_cli.lora.merge_files"` alone: what importing torch
costs before any tensor is touched. A merge that held the base and the output in
memory together would peak near import + 2 x size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def child_peak_mb(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one command run in a fresh process."""
    script = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
              "r = subprocess.run(sys.argv[1:]); "
              "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
              "time.perf_counter() - t, r.returncode]))")
    done = subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True, text=True, check=True)
    peak, wall, code = json.loads(done.stdout.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}\n{done.stderr}")
    return peak, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=400, help="size of the base in MB")
    parser.add_argument("--dim", type=int, default=1024, help="side of each square layer")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args()

    from safetensors.torch import save_file

    from lora_cli import apply_lora, save_adapter

    layer_mb = args.dim * args.dim * 4 / 2**20
    n_layers = max(1, round(args.mb / layer_mb))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = nn.Sequential(*(nn.Linear(args.dim, args.dim, bias=False) for _ in range(n_layers)))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "base.safetensors")
        apply_lora(model, rank=16, alpha=32, target_modules="all-linear")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.01)
        save_adapter(model, tmp / "adapter")
        del model
        size_mb = (tmp / "base.safetensors").stat().st_size / 2**20
        env_python = [sys.executable, "-c", "import lora_cli.lora.merge_files, lora_cli.cli"]
        import_mb, _ = child_peak_mb(env_python)
        merge_cmd = [sys.executable, "-m", "lora_cli", "merge", str(tmp / "base.safetensors"),
                     str(tmp / "adapter"), "-o", str(tmp / "merged.safetensors")]
        peak_mb, wall = child_peak_mb(merge_cmd)
    result = {
        "base_mb": round(size_mb, 1), "layers": n_layers, "layer_shape": [args.dim, args.dim],
        "import_peak_mb": round(import_mb, 1), "merge_peak_mb": round(peak_mb, 1),
        "merge_above_import_mb": round(peak_mb - import_mb, 1),
        "peak_over_base": round(peak_mb / size_mb, 3),
        "above_import_over_base": round((peak_mb - import_mb) / size_mb, 3),
        "merge_wall_s": round(wall, 2), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    print(f"base {size_mb:.0f} MB ({n_layers} x {args.dim}x{args.dim} float32): lora-merge peak RSS "
          f"{peak_mb:.0f} MB = {peak_mb / size_mb:.2f} x the base; importing alone {import_mb:.0f} MB, so the "
          f"merge itself adds {peak_mb - import_mb:.0f} MB = {(peak_mb - import_mb) / size_mb:.2f} x the base "
          f"({wall:.1f} s)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    main()
