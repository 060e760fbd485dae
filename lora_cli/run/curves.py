"""Training curves: ``output_dir/curves.png``, a terminal sparkline, ``lora-eval --plot``.

All are drawn from ``metrics.jsonl`` (one row per log step: step, loss, lr; one per
evaluation: step, eval_loss, ...), so a finished, resumed or copied run draws the same.
The PNG needs matplotlib (the ``plot`` extra); without it :func:`write_curves` returns
None and the run says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..lora.files import write_atomic

SPARKS = "▁▂▃▄▅▆▇█"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (a torn last line, from a crash, is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError("no metrics.jsonl in this folder", where=str(run_dir),
                        fix="pass a run's output_dir (the folder lora-train wrote)")
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have a finite number under ``key``."""
    points = [(r["step"], float(r[key])) for r in rows
              if isinstance(r.get(key), (int, float)) and float(r[key]) == float(r[key]) and abs(r[key]) != float("inf")]
    return [s for s, _ in points], [v for _, v in points]


def sparkline(values: list[float], width: int = 40) -> str:
    """``values`` as one line of block characters, resampled to at most ``width``."""
    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width - 1)] + [values[-1]]
    low, high = min(values), max(values)
    span = high - low or 1.0
    return "".join(SPARKS[min(int((v - low) / span * len(SPARKS)), len(SPARKS) - 1)] for v in values)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)          # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def draw(runs: dict[str, list[dict]], path: str | os.PathLike) -> Path | None:
    """Train loss, eval loss and learning rate over steps, one line per run, into the PNG
    ``path``; None when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    for label, rows in runs.items():
        for ax, key in zip(axes, ("loss", "eval_loss", "lr")):
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, label=label)
    for ax, title in zip(axes, ("train loss", "eval loss", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return path


def write_curves(output_dir: str | os.PathLike) -> Path | None:
    """``output_dir/curves.png`` from its metrics.jsonl; None without matplotlib."""
    return draw({Path(output_dir).name: read_metrics(output_dir)}, Path(output_dir) / "curves.png")


def plot_runs(runs: list[str | os.PathLike], output: str | os.PathLike) -> Path:
    """``lora-eval --plot``: the curves of ``runs`` overlaid in the PNG ``output``."""
    output = Path(output)
    if output.suffix.lower() != ".png" or output.is_dir():
        raise UserError("--plot draws into a .png file, given as the first argument", where=str(output),
                        fix="lora-eval curves.png --plot runs/a --plot runs/b")
    labels = [str(r) for r in runs]
    drawn = draw({label: read_metrics(r) for label, r in zip(labels, runs)}, output)
    if drawn is None:
        raise UserError("drawing curves needs matplotlib", where="--plot", fix='pip install "lora-cli[plot]"')
    return drawn
