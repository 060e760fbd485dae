"""Training runs with data.packing and data.group_by_length: a run stopped at a
checkpoint and resumed ends exactly as an uninterrupted one; orders are seeded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import write_lm_run
from lora_cli.data import epoch_order, length_grouped_order
from test_checkpoint import adapter, lora_train


@pytest.fixture
def project(tmp_path: Path) -> Path:
    pairs = [(f"{a}+{b}=", str(a + b) * (1 + (a * b) % 5)) for a in range(12) for b in range(6)]
    return write_lm_run(tmp_path, pairs, eval_every_nth=7, seed=3, n_layer=1, seq=32, dropout=0.1,
                        train={"max_steps": 10, "batch_size": 4, "lr": 0.01, "log_every": 2, "eval_every": 5,
                               "save_every": 5, "keep_last": 4, "scheduler": "constant"})


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["data.packing=true", "data.group_by_length=true"])
def test_stopped_and_resumed_run_matches_uninterrupted(project: Path, flag: str):
    whole = lora_train(project, flag, "output_dir=whole")
    assert whole.returncode == 0, whole.stderr
    # the same run stopped after its checkpoint at step 5, then resumed to step 10
    first = lora_train(project, flag, "output_dir=parts", "train.max_steps=5")
    assert first.returncode == 0, first.stderr
    shutil.rmtree(project / "parts" / "adapter")
    resumed = lora_train(project, flag, "output_dir=parts", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    a, b = adapter(project / "whole"), adapter(project / "parts")
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    if flag.startswith("data.packing"):
        dry = lora_train(project, flag, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "packed_rows" in dry.stdout                  # the rows the run trained on were packed


def test_length_grouped_order_is_a_seeded_permutation_of_similar_lengths():
    sizes = [(i * 37) % 101 + 1 for i in range(400)]
    order = length_grouped_order(sizes, seed=5, epoch=2, group=8)
    assert sorted(order.tolist()) == list(range(400))
    assert order.tolist() == length_grouped_order(sizes, seed=5, epoch=2, group=8).tolist()
    assert order.tolist() != length_grouped_order(sizes, seed=5, epoch=3, group=8).tolist()

    def padding(o):
        groups = [o[g:g + 8] for g in range(0, len(o), 8)]
        return sum(max(sizes[i] for i in g) * len(g) - sum(sizes[i] for i in g) for g in groups)

    assert padding(order.tolist()) < 0.2 * padding(epoch_order(400, seed=5, epoch=2).tolist())


def test_packing_a_task_or_model_it_cannot_apply_to_is_a_config_error(project: Path, monkeypatch):
    from lora_cli.errors import ConfigError
    from lora_cli.run.config import load_config

    monkeypatch.chdir(project)
    for overrides, says in ((["data.packing=true", "task=regression"], "packs causal_lm sequences only"),
                            (["data.packing=true", "model.arch=null", "model.class_path=pkg.mod:Net"],
                             "needs a model that takes position_ids")):
        with pytest.raises(ConfigError) as err:
            load_config("config.yaml", overrides)
        assert says in str(err.value.problems if hasattr(err.value, "problems") else err.value)


def test_packed_rows_longer_than_the_model_takes_are_refused_before_training(project: Path, monkeypatch):
    from lora_cli.errors import ConfigError
    from lora_cli.run.build import build
    from lora_cli.run.config import load_config

    monkeypatch.chdir(project)
    # examples are short (under 16 positions), rows of 39 would not fit a 16-position model
    cfg = load_config("config.yaml", ["data.packing=true", "data.max_seq_len=40", "model.args.max_seq_len=16"])
    with pytest.raises(ConfigError) as err:
        build(cfg)
    assert "packed rows" in str(err.value.problems if hasattr(err.value, "problems") else err.value)
