"""curves.png, the loss sparkline, samples.jsonl and TensorBoard files of a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_cli.errors import UserError
from lora_cli.run import curves


def write_metrics(folder: Path, losses: list[float], evals: dict[int, float]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"step": 5 * (i + 1), "loss": v, "lr": 0.01 * (1 - i / len(losses))} for i, v in enumerate(losses)]
    rows += [{"step": s, "eval_loss": v} for s, v in evals.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')
    return folder


def pixels(path: Path):
    image = pytest.importorskip("matplotlib.image")
    return image.imread(path)


def test_curves_png_is_valid_and_changes_with_the_data(tmp_path: Path):
    pytest.importorskip("matplotlib")
    a = write_metrics(tmp_path / "a", [3.0, 2.0, 1.5, 1.2, 1.1], {0: 3.2, 25: 1.3})
    b = write_metrics(tmp_path / "b", [3.0, 2.9, 2.7, 2.6, 2.5], {0: 3.2, 25: 2.6})
    pa, pb = curves.write_curves(a), curves.write_curves(b)
    assert pa == a / "curves.png" and pa.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ia, ib = pixels(pa), pixels(pb)
    assert ia.shape == ib.shape and ia.shape[0] > 100 and ia.shape[1] > 300
    assert (abs(ia - ib) > 0.1).any()                                   # the curves differ
    assert pa.read_bytes() != pb.read_bytes()
    curves.write_curves(a)
    assert (pixels(pa) == ia).all()                                     # same data, same picture


def test_plot_overlays_runs_and_refuses_what_it_cannot_draw(tmp_path: Path, monkeypatch):
    pytest.importorskip("matplotlib")
    a = write_metrics(tmp_path / "a", [3.0, 2.0, 1.0], {})
    b = write_metrics(tmp_path / "b", [3.0, 2.5, 2.0], {})
    one = curves.plot_runs([a], tmp_path / "one.png")
    both = curves.plot_runs([a, b], tmp_path / "both.png")
    assert (abs(pixels(one) - pixels(both)) > 0.1).any()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        curves.plot_runs([tmp_path], tmp_path / "x.png")
    with pytest.raises(UserError, match=".png"):
        curves.plot_runs([a], tmp_path / "x.txt")
    monkeypatch.setattr(curves, "_pyplot", lambda: None)
    assert curves.write_curves(a) is None
    with pytest.raises(UserError, match="matplotlib"):
        curves.plot_runs([a], tmp_path / "y.png")


def test_sparkline_spans_the_blocks_and_keeps_its_width():
    line = curves.sparkline([5.0, 4.0, 3.0, 2.0, 1.0])
    assert line[0] == "█" and line[-1] == "▁" and len(line) == 5
    assert len(curves.sparkline([float(i) for i in range(500)], width=40)) == 40
    assert curves.sparkline([]) == "" and curves.sparkline([2.0, 2.0]) == "▁▁"


@pytest.mark.slow
def test_a_run_writes_samples_curves_and_tensorboard(tmp_path: Path, monkeypatch):
    pytest.importorskip("tensorboard")
    import yaml
    from typer.testing import CliRunner

    from lora_cli.cli import app
    from conftest import write_lm_run
    root = write_lm_run(tmp_path, [(f"n={i}\n", f"{i}") for i in range(24)], eval_every_nth=6, seed=0, n_layer=1,
                        seq=24, dropout=0.0, train={"max_steps": 6, "batch_size": 8, "lr": 0.01, "log_every": 2,
                                                    "eval_every": 3})
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg.update({"eval": {"samples": 2, "max_new_tokens": 5, "exact_match": True}, "log": {"tensorboard": True}})
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["train", "config.yaml"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (root / "run" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 0, 3, 3, 6, 6]
    assert [r["prompt"] for r in rows[:2]] == ["n=0\n", "n=6\n"] and rows[0]["answer"] == "0"
    assert all(len(r["completion"]) <= 5 for r in rows)   # 5 bytes, each one character at most
    assert "step 0" in result.output and "step 6" in result.output and "loss curve" in result.output
    assert "exact match" in result.output and "of 4 held-out answers (base" in " ".join(result.output.split())
    assert list((root / "run" / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(root / "run" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]


def test_samples_need_a_causal_lm_and_held_out_prompts():
    from lora_cli.errors import ConfigError
    from lora_cli.run.config import config_from_dict
    with pytest.raises(ConfigError, match="only a causal_lm model generates text"):
        config_from_dict({"task": "regression", "model": {"arch": "linear", "base": None}, "data": {"train": "t.csv"},
                          "eval": {"samples": 2}}, check_files=False)
    from lora_cli.run.samples import Sampler
    cfg = config_from_dict({"task": "causal_lm", "model": {"arch": "gpt", "base": None}, "data": {"train": "t.jsonl"},
                            "eval": {"samples": 2, "exact_match": True}}, check_files=False)
    assert Sampler.of(cfg, tokenizer=object(), out=None) is None     # no held-out data: skipped (a note says so)
