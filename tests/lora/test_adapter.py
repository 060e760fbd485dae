"""Tests for lora_cli.lora.adapter: PEFT key layout, adapter_config.json, fingerprint, strict loading.

Invariants: save then load into a fresh base reproduces outputs bit for bit; the saved
key set is exactly the LoRA keys (plus the biases and modules_to_save asked for) and no
base weight; the .safetensors file alone is a complete adapter; loading is strict and
refuses a different base; PEFT reads what lora-cli writes and the other way round.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import (DIM, N_LAYER, TinyLMWithInputEmbeddings, ids, perturb_lora, tiny_gpt2, tiny_lm)
from lora_cli import __version__, apply_lora, load_adapter, read_adapter, save_adapter
from lora_cli.lora.adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME, Adapter, adapter_tensors
from lora_cli.lora.fingerprint import SAMPLES, fingerprint, fingerprint_mismatches, sample_elements, sample_positions
from lora_cli.errors import AdapterError, TargetError
from lora_cli.lora.inject import get_spec, lora_layers
from lora_cli.lora.merge import merge_adapter

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests/fixtures/lora-cli-0.1.0"
TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
LINEAR = [f"layers.{i}.self_attn.{leaf}" for i in range(N_LAYER) for leaf in ("q_proj", "v_proj")] \
    + [f"layers.{i}.mlp.down_proj" for i in range(N_LAYER)]


def adapted(seed: int = 0, *, targets=TARGETS, bias="lora_only", modules_to_save=("lm_head",), lora_seed=3, **kw):
    """TinyLM with a trained-looking adapter (non-zero A and B, changed head and biases)."""
    model = tiny_lm(seed)
    apply_lora(model, rank=4, alpha=8, target_modules=targets, bias=bias, modules_to_save=list(modules_to_save), **kw)
    return perturb_lora(model, seed=lora_seed).eval()


def rewrite(directory, change) -> None:
    """Edit an adapter's tensors in place, keeping the config header."""
    path = directory / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=header)


def assert_no_lora(model: nn.Module) -> None:
    assert lora_layers(model) == {} and get_spec(model) is None


@pytest.fixture
def saved(tmp_path):
    model = adapted()
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


# --- round trip -----------------------------------------------------------------------

def test_save_then_load_into_a_fresh_base_reproduces_outputs_exactly(saved):
    model, directory = saved
    fresh = load_adapter(tiny_lm(0), directory).eval()
    x = ids()
    assert torch.equal(fresh(x), model(x))
    state, original = fresh.state_dict(), model.state_dict()
    assert set(state) == set(original)
    assert all(torch.equal(state[k], original[k]) for k in state)
    spec, want = get_spec(fresh), get_spec(model)
    assert (sorted(spec.targets), spec.modules_to_save, spec.bias, spec.rank, spec.alpha) == \
        (sorted(want.targets), want.modules_to_save, want.bias, want.rank, want.alpha)
    assert {p: m.scaling for p, m in lora_layers(fresh).items()} == {p: m.scaling for p, m in lora_layers(model).items()}


def test_loaded_adapter_trains_the_same_tensors(saved):
    model, directory = saved
    fresh = load_adapter(tiny_lm(0), directory)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kw", [dict(use_rslora=True), dict(dropout=0.3), dict(bias="all"), dict(bias="none")])
def test_round_trip_with_other_options(tmp_path, kw):
    model = adapted(**kw)
    save_adapter(model, tmp_path / "a")
    fresh = load_adapter(tiny_lm(0), tmp_path / "a").eval()
    assert torch.equal(fresh(ids()), model(ids()))
    assert all(m.dropout == kw.get("dropout", 0.0) for m in lora_layers(fresh).values() if hasattr(m, "dropout"))


def test_round_trip_of_a_conv1d_model(tmp_path):
    model = tiny_gpt2()
    apply_lora(model, rank=2, alpha=4, target_modules=["c_attn", "c_fc", "wte"], bias="lora_only")
    perturb_lora(model).eval()
    save_adapter(model, tmp_path / "g")
    config = json.loads((tmp_path / "g" / CONFIG_NAME).read_text())
    assert config["fan_in_fan_out"] is True
    assert config["lora_cli"]["modules"]["h.0.attn.c_attn"] == "conv1d"
    assert config["lora_cli"]["modules"]["wte"] == "embedding"
    fresh = load_adapter(tiny_gpt2(), tmp_path / "g").eval()
    assert torch.equal(fresh(ids()), model(ids()))


# --- the files ------------------------------------------------------------------------

def _expected_keys(bias: str) -> set[str]:
    keys = {f"{PREFIX}{p}.lora_{f}.weight" for p in LINEAR for f in "AB"}
    keys |= {f"{PREFIX}embed_tokens.lora_embedding_A", f"{PREFIX}embed_tokens.lora_embedding_B"}
    keys.add(f"{PREFIX}lm_head.weight")                                      # modules_to_save
    if bias in ("lora_only", "all"):                                         # q, v, down have biases
        keys |= {f"{PREFIX}{p}.base_layer.bias" for p in LINEAR}
    if bias == "all":                                                        # every other bias, PEFT's name
        keys |= {f"{PREFIX}layers.{i}.{m}.bias" for i in range(N_LAYER)
                 for m in ("input_layernorm", "self_attn.k_proj")}
        keys.add(f"{PREFIX}norm.bias")
    return keys


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_saved_keys_are_exactly_the_peft_keys_and_no_base_weight(tmp_path, bias):
    model = adapted(bias=bias)
    save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    tensors = load_file(tmp_path / "a" / WEIGHTS_NAME)
    assert set(tensors) == _expected_keys(bias)
    base_weights = {f"{PREFIX}{k}" for k in tiny_lm().state_dict() if k.endswith(".weight")} - {f"{PREFIX}lm_head.weight"}
    assert not base_weights & set(tensors)
    assert not any("base_layer.weight" in k for k in tensors)
    state = model.state_dict()
    for key, t in tensors.items():
        rest = key[len(PREFIX):]
        if rest.endswith(".lora_A.weight") or rest.endswith(".lora_B.weight"):
            ref = state[rest[: -len(".weight")]]
        else:
            ref = state[rest.replace(".base_layer.bias", ".bias")]
        assert torch.equal(t, ref), key
    assert tensors[f"{PREFIX}layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, DIM)      # (r, in)
    assert tensors[f"{PREFIX}layers.0.mlp.down_proj.lora_B.weight"].shape == (DIM, 4)        # (out, r)
    assert tensors[f"{PREFIX}embed_tokens.lora_embedding_A"].shape == (4, 32)                # (r, num)


def test_adapter_config_fields(saved):
    model, directory = saved
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    assert config["use_rslora"] is False and config["fan_in_fan_out"] is False
    assert config["bias"] == "lora_only" and config["modules_to_save"] == ["lm_head"]
    assert config["use_dora"] is False and config["rank_pattern"] == {}
    meta = config["lora_cli"]
    assert meta["version"] == __version__
    assert meta["modules"] == {"embed_tokens": "embedding", **{p: "linear" for p in LINEAR}}
    fp = meta["fingerprint"]
    assert set(fp) == {"scheme", "digest", "tensors"} and fp["scheme"] == 2
    assert set(fp["tensors"]) == set(tiny_lm().state_dict())           # base tensors only, no LoRA
    assert fp["tensors"]["lm_head.weight"].endswith("|-")              # trained: shape and dtype only
    assert fp["tensors"]["layers.0.self_attn.q_proj.bias"].endswith("|-")
    assert not fp["tensors"]["layers.0.self_attn.q_proj.weight"].endswith("|-")
    assert fp["tensors"]["layers.0.self_attn.q_proj.weight"].startswith(f"{DIM}x{DIM}|float32|")
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        assert json.loads(f.metadata()["adapter_config"]) == config    # the header holds the same config


def test_config_records_caller_metadata_and_names(tmp_path):
    save_adapter(adapted(), tmp_path / "a", metadata={"task": "lm", "labels": ["x"]},
                 base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == "tiny" and config["task_type"] == "CAUSAL_LM"
    assert config["lora_cli"]["task"] == "lm" and config["lora_cli"]["labels"] == ["x"]
    assert read_adapter(tmp_path / "a").meta["task"] == "lm"


def test_target_modules_are_full_paths_when_leaf_names_would_select_more(tmp_path):
    model = adapted(targets=r"layers\.0\.self_attn\.(q|v)_proj")
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"]


def test_the_safetensors_file_alone_is_a_complete_adapter(saved, tmp_path):
    model, directory = saved
    lone = tmp_path / "elsewhere" / "my-run.safetensors"
    lone.parent.mkdir()
    shutil.copy(directory / WEIGHTS_NAME, lone)
    assert sorted(p.name for p in lone.parent.iterdir()) == ["my-run.safetensors"]
    adapter = read_adapter(lone)
    assert adapter.config == json.loads((directory / CONFIG_NAME).read_text())
    assert set(adapter.updates) == set(get_spec(model).targets)
    assert set(adapter.replacements) == {"lm_head.weight", *(f"{p}.bias" for p in LINEAR)}
    fresh = load_adapter(tiny_lm(0), lone).eval()
    assert torch.equal(fresh(ids()), model(ids()))


def test_read_adapter_sorts_updates_by_layout(saved):
    model, directory = saved
    adapter = read_adapter(directory)
    assert isinstance(adapter, Adapter) and adapter.source == str(directory)
    assert adapter.updates["embed_tokens"].layout == "embedding"
    assert adapter.updates["embed_tokens"].weight_shape() == (32, DIM)
    up = adapter.updates["layers.0.mlp.down_proj"]
    assert up.layout == "linear" and up.rank == 4 and up.scaling == 2.0 and up.weight_shape() == (DIM, 24)
    layer = lora_layers(model)["layers.0.mlp.down_proj"]
    torch.testing.assert_close(up.delta(), layer.delta_weight(), rtol=0, atol=0)


# --- saving ---------------------------------------------------------------------------

def test_saving_over_an_adapter_replaces_it_whole_and_leaves_no_temp_dirs(tmp_path):
    directory = tmp_path / "runs" / "adapter"
    save_adapter(adapted(lora_seed=1), directory)
    (directory / "stale.txt").write_text("left over")
    (directory / "adapter_model.bin").write_bytes(b"old")
    second = adapted(lora_seed=2)
    assert save_adapter(second, directory) == directory
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert [p.name for p in directory.parent.iterdir()] == ["adapter"]        # no .tmp / .old left
    fresh = load_adapter(tiny_lm(0), directory).eval()
    assert torch.equal(fresh(ids()), second(ids()))


def test_a_failed_save_leaves_the_previous_adapter_and_no_temp_dirs(tmp_path):
    directory = tmp_path / "adapter"
    first = adapted(lora_seed=1)
    save_adapter(first, directory)
    before = (directory / WEIGHTS_NAME).read_bytes()
    with pytest.raises((TypeError, ValueError, AdapterError)):
        save_adapter(adapted(lora_seed=2), directory, metadata={"bad": object()})   # not JSON
    assert (directory / WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_saving_a_merged_or_plain_model_is_refused(tmp_path):
    model = adapted()
    lora_layers(model)["layers.0.self_attn.q_proj"].merge()
    with pytest.raises(AdapterError, match="merged"):
        save_adapter(model, tmp_path / "a")
    merge_adapter(model)
    with pytest.raises(AdapterError, match="no LoRA adapter"):
        save_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError, match="no LoRA adapter"):
        save_adapter(tiny_lm(), tmp_path / "a")
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []


def test_adapter_tensors_are_detached_cpu_copies_of_the_factors(saved):
    model, _ = saved
    tensors = adapter_tensors(model)
    layer = lora_layers(model)["layers.1.self_attn.v_proj"]
    t = tensors[f"{PREFIX}layers.1.self_attn.v_proj.lora_B.weight"]
    assert not t.requires_grad and t.device.type == "cpu" and t.is_contiguous()
    assert torch.equal(t, layer.lora_B)


# --- strict loading -------------------------------------------------------------------

def test_a_different_base_is_refused_by_the_fingerprint(saved):
    model, directory = saved
    other = tiny_lm(seed=1)
    with pytest.raises(AdapterError, match="different base") as err:
        load_adapter(other, directory)
    assert "values differ" in str(err.value) and str(directory) in str(err.value)
    assert_no_lora(other)
    load_adapter(other, directory, check_base=False)
    assert set(lora_layers(other)) == set(get_spec(model).targets)
    for path, layer in lora_layers(other).items():
        torch.testing.assert_close(layer.delta_weight(), lora_layers(model)[path].delta_weight(), rtol=0, atol=0)


def test_one_changed_frozen_weight_is_refused_but_changed_trained_tensors_are_not(saved):
    _, directory = saved
    base = tiny_lm(0)
    with torch.no_grad():
        base.lm_head.weight.add_(1.0)                       # modules_to_save: trained, not hashed
        base.layers[0].self_attn.q_proj.bias.add_(1.0)      # bias=lora_only: trained
    load_adapter(base, directory)
    base = tiny_lm(0)
    with torch.no_grad():
        base.layers[1].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(AdapterError, match="layers.1.mlp.up_proj.weight: values differ"):
        load_adapter(base, directory)


def test_the_same_base_in_another_float_dtype_is_accepted(saved):
    """A base saved in bfloat16 and loaded in float32 (or the other way) is the same base;
    a different base stays refused in any dtype."""
    _, directory = saved
    load_adapter(tiny_lm(0).to(torch.float64), directory)
    load_adapter(tiny_lm(0).to(torch.bfloat16), directory)
    with pytest.raises(AdapterError, match="values differ"):
        load_adapter(tiny_lm(1).to(torch.bfloat16), directory)


def test_an_integer_tensor_where_the_base_had_floats_is_refused():
    want = fingerprint([("w", torch.zeros(4))])
    problems = fingerprint_mismatches(want, [("w", torch.zeros(4, dtype=torch.int64))])
    assert problems and "dtype differ" in problems[0]


@pytest.mark.parametrize("numel", [1, 1023, 1024, 1025, 2**24 - 1, 2**24 + 1, 28311552, 2**31 + 7, 2**40 + 3])
def test_sampled_positions_are_exact_for_any_size(numel):
    pos = sample_positions(numel)
    assert len(pos) == min(numel, SAMPLES) and all(isinstance(p, int) for p in pos)
    assert pos[0] == 0 and pos[-1] == numel - 1
    assert all(a < b for a, b in zip(pos, pos[1:]))              # strictly increasing: inside the tensor


def test_sampling_a_huge_strided_tensor_reads_only_the_samples():
    """2**32 x 7 elements, none allocated (an expanded view): the samples are gathered
    at the right places without materialising a copy."""
    t = torch.arange(7, dtype=torch.bfloat16).expand(2**16, 2**16, 7)
    assert not t.is_contiguous() and t.numel() > 2**31
    pos = sample_positions(t.numel())
    got = sample_elements(t, pos)
    assert got.dtype == torch.bfloat16 and got.tolist() == [float(p % 7) for p in pos]
    assert fingerprint([("t", t)])["tensors"]["t"].startswith("65536x65536x7|bfloat16|")


def _sparse_safetensors(path, key, shape, dtype_code, fill=None):
    """A safetensors file whose data region is a sparse hole (reads as zeros), with
    optional bytes written at given offsets: a huge tensor on disk for free."""
    import struct
    itemsize = {"U8": 1, "BF16": 2, "F32": 4}[dtype_code]
    nbytes = itemsize
    for s in shape:
        nbytes *= s
    header = json.dumps({key: {"dtype": dtype_code, "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for offset, data in (fill or {}).items():
            f.seek(8 + len(header) + offset)
            f.write(data)
        f.truncate(8 + len(header) + nbytes)


def test_a_stored_tensor_over_2_31_elements_is_fingerprinted_from_a_bounded_read(tmp_path, monkeypatch):
    import lora_cli.lora.safetensors_io as streaming
    numel = 2**31 + 5
    last = numel - 1
    _sparse_safetensors(tmp_path / "big.safetensors", "w", (numel,), "U8", fill={last: b"\x07"})
    reader = streaming.SafetensorsReader(tmp_path / "big.safetensors")
    read = []
    real_pread = os.pread
    monkeypatch.setattr(streaming.os, "pread", lambda fd, n, off: read.append(n) or real_pread(fd, n, off))
    record = fingerprint(reader.stored())["tensors"]["w"]
    assert sum(read) == SAMPLES                                   # one byte per sampled element
    values = reader.read_elements("w", sample_positions(numel))
    assert values[-1].item() == 7 and values[:-1].eq(0).all()     # the very last element was read
    assert record.startswith(f"{numel}|uint8|")


def test_a_bfloat16_base_on_disk_matches_its_float32_load(tmp_path):
    """lora-train loads a bfloat16 model directory in float32; lora-merge reads the
    bfloat16 file: both must give the same fingerprint, also past 2**24 elements."""
    from safetensors.torch import save_file as save
    from lora_cli.lora.safetensors_io import SafetensorsReader
    big = torch.randn(4097, 4097, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)   # > 2**24
    small = torch.randn(3, 5).to(torch.bfloat16)
    save({"big": big, "small": small}, tmp_path / "b.safetensors")
    on_disk = fingerprint(SafetensorsReader(tmp_path / "b.safetensors").stored())
    in_memory = fingerprint([("big", big.float()), ("small", small.float())])
    assert fingerprint_mismatches(on_disk, [("big", big.float()), ("small", small.float())]) == []
    assert [r.split("|")[2] for r in on_disk["tensors"].values()] == \
        [r.split("|")[2] for r in in_memory["tensors"].values()]


def test_an_adapter_written_by_lora_cli_0_1_still_verifies_its_base():
    """Old fingerprints (scheme 1: float32 linspace positions, raw bytes) keep working."""
    from lora_cli.lora.safetensors_io import SafetensorsReader
    adapter = read_adapter(FIXTURES / "adapter")
    recorded = adapter.meta["fingerprint"]
    assert "scheme" not in recorded
    base = SafetensorsReader(ROOT / "data/quickstart/base.safetensors")
    assert fingerprint_mismatches(recorded, base.stored()) == []
    assert fingerprint_mismatches(recorded, base) == []              # the same from loaded tensors
    other = [(k, t + 1) for k, t in base]
    assert fingerprint_mismatches(recorded, other)


def test_loading_into_a_mis_shaped_module_is_refused(saved):
    _, directory = saved
    base = tiny_lm(0)
    base.layers[0].self_attn.q_proj = nn.Linear(DIM, DIM + 4)
    with pytest.raises(AdapterError, match=r"module 'layers.0.self_attn.q_proj' is \(20, 16\)"):
        load_adapter(base, directory, check_base=False)
    assert_no_lora(base)


def test_loading_into_a_model_without_the_module_is_refused(saved):
    _, directory = saved
    base = tiny_lm(0)
    base.layers = nn.ModuleList(list(base.layers)[:1])
    with pytest.raises(AdapterError, match="no module 'layers.1"):
        load_adapter(base, directory, check_base=False)
    assert_no_lora(base)


def test_loading_into_a_module_of_another_shape_for_a_saved_tensor_is_refused(saved):
    _, directory = saved
    base = tiny_lm(0)
    base.lm_head = nn.Linear(DIM, 40, bias=False)
    with pytest.raises(AdapterError, match="'lm_head.weight' is"):
        load_adapter(base, directory, check_base=False)
    assert_no_lora(base)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop(f"{PREFIX}layers.0.self_attn.q_proj.lora_B.weight"), "has lora_A but not its pair"),
    (lambda t: t.pop(f"{PREFIX}embed_tokens.lora_embedding_A"), "has lora_B but not its pair"),
    (lambda t: t.update({f"{PREFIX}layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(DIM)}),
     "DoRA lora_magnitude_vector but the config says use_dora=false"),
    (lambda t: t.update({f"{PREFIX}nowhere.weight": torch.ones(2)}), "the model does not have"),
    (lambda t: t.update({"layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, DIM)}), "unexpected tensor key"),
    (lambda t: t.update({f"{PREFIX}layers.0.self_attn.q_proj.lora_A.weight": torch.ones(3, DIM),
                         f"{PREFIX}layers.0.self_attn.q_proj.lora_B.weight": torch.ones(DIM, 3)}), "rank 3"),
    (lambda t: t.update({f"{PREFIX}layers.0.self_attn.q_proj.lora_B.weight": torch.ones(DIM, 5)}),
     "do not form a low-rank pair"),
    (lambda t: [t.pop(k) for k in list(t) if "lora" in k], "holds no LoRA tensors"),
], ids=["no-lora_B", "no-embedding-A", "unexpected-lora-key", "unexpected-base-key", "no-prefix",
        "rank-vs-config", "unpaired-shapes", "no-lora"])
def test_a_malformed_adapter_file_is_refused(saved, change, message):
    _, directory = saved
    rewrite(directory, change)
    base = tiny_lm(0)
    with pytest.raises(AdapterError, match=message):
        load_adapter(base, directory, check_base=False)
    assert_no_lora(base)


@pytest.mark.parametrize("key", [f"{PREFIX}lm_head.weight", f"{PREFIX}layers.1.mlp.down_proj.base_layer.bias"],
                         ids=["modules_to_save", "lora_only-bias"])
def test_an_adapter_missing_a_declared_trained_tensor_is_refused(saved, key):
    _, directory = saved
    rewrite(directory, lambda t: t.pop(key))
    base = tiny_lm(0)
    with pytest.raises(AdapterError, match=key.removeprefix(PREFIX).replace(".base_layer", "")):
        load_adapter(base, directory)


def test_missing_or_unreadable_adapters_are_user_errors(tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        read_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=f"no {WEIGHTS_NAME}"):
        read_adapter(tmp_path / "empty")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="PEFT .bin adapter"):
        read_adapter(tmp_path / "bin")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00not safetensors")
    with pytest.raises(AdapterError, match="cannot read"):
        read_adapter(tmp_path / "junk.safetensors")
    save_file({f"{PREFIX}x.lora_A.weight": torch.ones(1, 2)}, tmp_path / "bare.safetensors")
    with pytest.raises(AdapterError, match="no adapter config"):
        read_adapter(tmp_path / "bare.safetensors")


@pytest.mark.parametrize("field, value, message", [
    ("peft_type", "IA3", "not a LoRA adapter"), ("use_dora", True, "adapted with DoRA, which lora-cli does not support")])
def test_other_adapter_kinds_are_refused(saved, field, value, message):
    _, directory = saved
    path = directory / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    config = json.loads(header["adapter_config"])
    config[field] = value
    # a directory is read through its adapter_config.json (what PEFT reads too) ...
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=message):
        read_adapter(directory)
    # ... and the .safetensors file alone through the copy in its header
    save_file(load_file(path), path, metadata={**header, "adapter_config": json.dumps(config)})
    with pytest.raises(AdapterError, match=message):
        read_adapter(path)


def test_loading_into_an_adapted_model_is_refused(saved):
    _, directory = saved
    model = adapted()
    with pytest.raises(TargetError, match="already has LoRA"):
        load_adapter(model, directory)


def test_an_alpha_pattern_survives_load_then_save(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_lm(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       alpha_pattern={"v_proj": 32}))
        perturb_lora(pm).eval()
        pm.save_pretrained(tmp_path / "peft")
    model = load_adapter(tiny_lm(0), tmp_path / "peft", check_base=False).eval()
    assert torch.allclose(model(ids()), pm(ids()), atol=1e-6)
    save_adapter(model, tmp_path / "again")
    again = load_adapter(tiny_lm(0), tmp_path / "again").eval()
    assert torch.equal(again(ids()), model(ids()))


# --- PEFT interop ---------------------------------------------------------------------

def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("make", ["lm", "gpt2"])
def test_peft_loads_a_lora_cli_adapter_with_the_same_outputs(tmp_path, make):
    peft = pytest.importorskip("peft")
    if make == "lm":
        model, fresh = adapted(), tiny_lm(0)
    else:
        model, fresh = tiny_gpt2(), tiny_gpt2()
        apply_lora(model, rank=2, alpha=4, target_modules=["c_attn", "c_fc", "wte"], bias="lora_only",
                   modules_to_save=["lm_head"])
        perturb_lora(model).eval()
    save_adapter(model, tmp_path / "a")
    pm = _quiet(peft.PeftModel.from_pretrained, fresh, tmp_path / "a").eval()
    x = ids()
    torch.testing.assert_close(pm(x), model(x), rtol=0, atol=1e-6)
    assert any(isinstance(m, peft.tuners.lora.Embedding) for m in pm.modules())
    head = pm.base_model.model.lm_head
    assert torch.equal(head.modules_to_save["default"].weight, model.lm_head.weight)


def _peft_adapter(peft, tmp_path, base, **config):
    pm = _quiet(peft.get_peft_model, base, peft.LoraConfig(**config))
    perturb_lora(pm).eval()
    _quiet(pm.save_pretrained, tmp_path / "peft")
    return pm


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], bias="lora_only",
         modules_to_save=["lm_head"]),
    dict(r=4, lora_alpha=16, target_modules=["q_proj", "embed_tokens", "gate_proj"], use_rslora=True,
         rank_pattern={"gate_proj": 2}, alpha_pattern={"q_proj": 3}),
    dict(r=2, lora_alpha=4, target_modules="all-linear", bias="all"),
], ids=["bias-head", "embedding-rslora-patterns", "all-linear-bias-all"])
def test_lora_cli_loads_a_peft_adapter_with_the_same_outputs(tmp_path, config):
    peft = pytest.importorskip("peft")
    pm = _peft_adapter(peft, tmp_path, tiny_lm(0), **config)
    model = load_adapter(tiny_lm(0), tmp_path / "peft", check_base=False).eval()
    x = ids()
    torch.testing.assert_close(model(x), pm(x), rtol=0, atol=1e-6)
    peft_targets = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(lora_layers(model)) == peft_targets


def test_lora_cli_loads_a_peft_adapter_that_saved_its_embedding_layer(tmp_path):
    peft = pytest.importorskip("peft")
    pm = _peft_adapter(peft, tmp_path, tiny_lm(0, cls=TinyLMWithInputEmbeddings), r=4, lora_alpha=8,
                       target_modules=["q_proj", "embed_tokens"])
    assert f"{PREFIX}embed_tokens.base_layer.weight" in load_file(tmp_path / "peft" / WEIGHTS_NAME)
    model = load_adapter(tiny_lm(0, cls=TinyLMWithInputEmbeddings), tmp_path / "peft", check_base=False).eval()
    torch.testing.assert_close(model(ids()), pm(ids()), rtol=0, atol=1e-6)


def test_a_tied_weight_saved_once_in_another_dtype_is_not_missing(tmp_path):
    """Hugging Face saves a tied head once (under the embedding's name), often in bfloat16,
    while lora-train loaded both names in float32."""
    from safetensors.torch import save_file as save
    from lora_cli.lora.safetensors_io import SafetensorsReader
    table = torch.randn(40, 8).to(torch.bfloat16)
    recorded = fingerprint([("embed.weight", table.float()), ("head.weight", table.float())])
    save({"embed.weight": table}, tmp_path / "m.safetensors")
    assert fingerprint_mismatches(recorded, SafetensorsReader(tmp_path / "m.safetensors").stored()) == []
    save({"embed.weight": table + 1}, tmp_path / "other.safetensors")
    problems = fingerprint_mismatches(recorded, SafetensorsReader(tmp_path / "other.safetensors").stored())
    assert any("head.weight: missing" in p for p in problems) and any("embed.weight: values" in p for p in problems)


@pytest.mark.parametrize("scheme", ["2", 3, 1.5, True, None, [2]])
def test_a_fingerprint_of_an_unknown_scheme_is_refused(saved, scheme):
    model, directory = saved
    config = json.loads((directory / CONFIG_NAME).read_text())
    config["lora_cli"]["fingerprint"]["scheme"] = scheme
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="scheme: must be 1 or 2"):
        load_adapter(tiny_lm(0), directory)
