"""LoRA variants through lora-train: a run killed mid-checkpoint and resumed ends exactly
as an uninterrupted one, with each variant."""

from __future__ import annotations

import json
import signal

import pytest
import yaml

from conftest import fault_env
from test_checkpoint import adapter, assert_same_run, lora_train, project  # noqa: F401 (fixture)

VARIANTS = {"dora": ["lora.use_dora=true"], "loraplus": ["train.loraplus_lr_ratio=4"],
            "dora+loraplus": ["lora.use_dora=true", "train.loraplus_lr_ratio=4"]}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigkill_then_resume_matches_with_each_variant(project, variant):  # noqa: F811
    args = VARIANTS[variant]
    done = lora_train(project, "output_dir=ref", *args)
    assert done.returncode == 0, done.stderr
    killed = lora_train(project, *args, env=fault_env("ckpt-write:8"))
    assert killed.returncode == -signal.SIGKILL
    resumed = lora_train(project, "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(project / "ref", project / "run")
    config = json.loads((project / "run" / "adapter" / "adapter_config.json").read_text())
    saved = yaml.safe_load((project / "run" / "config.yaml").read_text())       # the run's config records it
    assert saved["train"]["loraplus_lr_ratio"] == (4 if "loraplus" in variant else None)
    if "dora" in variant:
        assert config["use_dora"] is True
        assert any(k.endswith(".lora_magnitude_vector") for k in adapter(project / "run"))
