"""From a config to a model ready to train (lora_cli/run/build.py): the adapted layers
are exactly the ones the config targets, with its rank and scale; everything else is
frozen and holds the base file's values; building is reproducible and leaves the
caller's random generator alone."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_loop import N_TRAIN, make_project

from lora_cli.lora.inject import lora_layers
from lora_cli.lora.layers import LoraLinear
from lora_cli.run.build import batches, build
from lora_cli.run.config import config_from_dict


@pytest.fixture
def proj(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_project(tmp_path)


def cfg(lora: dict | None = None, **top):
    return config_from_dict({
        "seed": 0, "device": "cpu", "task": "regression", "output_dir": "run",
        "model": {"arch": "mlp", "args": {"hidden": 8}, "base": "base.safetensors"},
        "data": {"train": "train.csv", "eval": "eval.csv"},
        "lora": {"rank": 3, "alpha": 6, **(lora or {})}, **top,
    })


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("targets, expected", [
    (["layers.0", "head"], {"layers.0", "head"}),
    ("all-linear", {"layers.0", "layers.1"}),              # the output head is left out
    (r"layers\.\d+", {"layers.0", "layers.1"}),
])
def test_the_adapted_layers_are_the_targeted_ones_with_the_configured_rank(proj, targets, expected):
    built = build(cfg({"target_modules": targets}))
    layers = lora_layers(built.model)
    assert set(layers) == expected
    for layer in layers.values():
        assert isinstance(layer, LoraLinear) and layer.rank == 3 and layer.scaling == 6 / 3
        assert layer.lora_A.shape == (3, layer.weight.shape[1]) and layer.lora_B.shape == (layer.weight.shape[0], 3)
    assert trainable(built.model) == {f"{p}.{f}" for p in expected for f in ("lora_A", "lora_B")}


def test_rslora_and_excluded_layers(proj):
    built = build(cfg({"target_modules": "all-linear", "exclude_modules": ["layers.1"], "use_rslora": True}))
    (layer,) = lora_layers(built.model).values()
    assert layer.scaling == pytest.approx(6 / 3 ** 0.5)
    assert set(lora_layers(built.model)) == {"layers.0"}


@pytest.mark.parametrize("lora, extra", [
    ({"bias": "lora_only"}, {"layers.0.bias", "layers.1.bias"}),
    ({"bias": "all"}, {"layers.0.bias", "layers.1.bias", "head.bias"}),
    ({"modules_to_save": ["head"]}, {"head.weight", "head.bias"}),
])
def test_only_what_the_config_names_trains(proj, lora, extra):
    built = build(cfg(lora))
    factors = {f"{p}.{f}" for p in lora_layers(built.model) for f in ("lora_A", "lora_B")}
    assert trainable(built.model) == factors | extra


def test_frozen_parameters_hold_the_base_and_get_no_gradient(proj):
    built = build(cfg())
    base = load_file(proj / "base.safetensors")
    state = built.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    x, y = next(batches(built.data.train, torch.arange(8), 8))
    for layer in lora_layers(built.model).values():            # a non-zero B, so every factor gets a gradient
        torch.nn.init.normal_(layer.lora_B)
    ((built.model(x).squeeze(-1) - y) ** 2).mean().backward()
    for name, p in built.model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, name


def test_a_lower_dtype_casts_the_frozen_base_only(proj):
    built = build(cfg(dtype="bfloat16"))
    for name, p in built.model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name


def test_building_is_reproducible_and_leaves_the_callers_generator_alone(proj):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = build(cfg()), build(cfg())
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    other = build(cfg(seed=1)).model.state_dict()
    assert not torch.equal(other["layers.0.lora_A"], sa["layers.0.lora_A"])


def test_data_and_batches_cover_every_row_once(proj):
    built = build(cfg())
    assert len(built.data.train) == N_TRAIN and built.data.features == ["a", "b", "c"]
    order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(0))
    seen = [x for x, _ in batches(built.data.train, order, 10)]
    assert [len(x) for x in seen] == [10] * 6 + [4]
    torch.testing.assert_close(torch.cat(seen), built.data.train.x[order])
    split = build(cfg(data={"train": "train.csv", "val_split": 0.25}))
    assert len(split.data.train) + len(split.data.eval) == N_TRAIN and len(split.data.eval) == N_TRAIN // 4
