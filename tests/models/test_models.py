"""Tests for lora_cli.models: built-in architectures, build_model, infer_args, weight files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lora_cli.errors import ModelError
from lora_cli.lora.layers import LoraLayer, wrap
from lora_cli.models import (
    ARCHS, GPT, MLP, LinearModel, build_model, infer_args, load_base_weights, read_state_dict,
    save_state_dict,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_GPT = {"vocab_size": 257, "max_seq_len": 32, "n_layer": 2, "n_head": 2, "d_model": 32}


# ----------------------------------------------------------------------------- architectures

def test_registry_names_the_builtins():
    assert ARCHS == {"linear": LinearModel, "mlp": MLP, "gpt": GPT}


def test_linear_shapes_and_names():
    model = build_model(arch="linear", args={"in_features": 10, "out_features": 3})
    assert model(torch.randn(4, 10)).shape == (4, 3)
    assert set(model.state_dict()) == {"linear.weight", "linear.bias"}
    no_bias = build_model(arch="linear", args={"in_features": 10, "bias": False})
    assert set(no_bias.state_dict()) == {"linear.weight"}
    assert no_bias(torch.randn(2, 10)).shape == (2, 1)


def test_mlp_shapes_and_names():
    model = build_model(arch="mlp", args={"in_features": 5, "out_features": 2, "hidden": 16, "layers": 2})
    assert model(torch.randn(7, 5)).shape == (7, 2)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears == ["layers.0", "layers.1", "head"]
    assert model.head.in_features == 16


def test_mlp_without_hidden_layers_and_bad_activation():
    model = MLP(3, 1, layers=0)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["head"]
    assert model(torch.randn(2, 3)).shape == (2, 1)
    with pytest.raises(ModelError, match="unknown activation 'swish'"):
        MLP(3, activation="swish")


def test_gpt_shapes_names_and_head():
    model = GPT(**TINY_GPT)
    ids = torch.randint(0, 257, (3, 11))
    assert model(ids).shape == (3, 11, 257)
    assert model.get_output_embeddings() is model.lm_head
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for proj in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
        assert f"layers.1.{proj}" in linears
        assert getattr(model.layers[1].get_submodule(proj), "bias") is None
    assert "lm_head" in linears and model.lm_head.bias is None
    keys = set(model.state_dict())
    assert {"embed_tokens.weight", "norm.weight", "layers.0.input_layernorm.weight",
            "layers.0.post_attention_layernorm.weight"} <= keys
    assert not any("rope" in k for k in keys)  # rotary tables are derived, not stored


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = GPT(**TINY_GPT).eval()
    ids = torch.randint(0, 256, (1, 12))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gpt_tied_embeddings_and_too_long_input():
    model = GPT(**TINY_GPT, tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    with pytest.raises(ModelError, match="longer than the model's max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ModelError, match="multiple of n_head"):
        build_model(arch="gpt", args={"d_model": 30, "n_head": 4})


# ----------------------------------------------------------------------------- build_model

def test_unknown_arch_suggests_the_closest():
    with pytest.raises(ModelError) as e:
        build_model(arch="gtp")
    assert e.value.where == "model.arch"
    assert "did you mean 'gpt'" in e.value.fix and "linear, mlp, gpt" in e.value.fix


def test_exactly_one_model_source():
    with pytest.raises(ModelError, match="exactly one"):
        build_model()
    with pytest.raises(ModelError, match="exactly one"):
        build_model(arch="linear", class_path="x:Y")


def test_bad_kwargs_name_the_argument_and_the_signature():
    with pytest.raises(ModelError) as e:
        build_model(arch="gpt", args={"d_modle": 64})
    assert "unexpected argument 'd_modle'" in e.value.what and "did you mean 'd_model'" in e.value.what
    assert "GPT(vocab_size=257" in e.value.fix and "d_model=128" in e.value.fix
    with pytest.raises(ModelError) as e:
        build_model(arch="linear", args={})
    assert "missing required argument 'in_features'" in e.value.what
    with pytest.raises(ModelError, match="n_layer: must be an integer >= 0, got 'four'"):
        build_model(arch="gpt", args={"n_layer": "four"})
    with pytest.raises(ModelError, match="hidden: must be an integer >= 1, got -1"):
        build_model(arch="mlp", args={"in_features": 3, "hidden": -1})
    with pytest.raises(ModelError, match="n_head: must be an integer >= 1, got 0"):
        build_model(arch="gpt", args={"n_head": 0})


def test_class_path_imports_from_search_path(tmp_path):
    (tmp_path / "qs_user_models.py").write_text(
        "import torch.nn as nn\n"
        "class TinyNet(nn.Module):\n"
        "    def __init__(self, width, depth=1):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(width, width)\n"
        "def make_net(width):\n"
        "    return TinyNet(width)\n"
        "class NotAModule:\n"
        "    pass\n"
        "def not_a_factory():\n"
        "    return 3\n"
        "def exploding(size):\n"
        "    raise RuntimeError('negative dimension')\n"
    )
    model = build_model(class_path="qs_user_models:TinyNet", args={"width": 4}, search_path=tmp_path)
    assert type(model).__name__ == "TinyNet" and model.fc.in_features == 4
    assert build_model(class_path="qs_user_models:make_net", args={"width": 2}, search_path=tmp_path).fc.out_features == 2
    assert str(tmp_path) not in __import__("sys").path  # search path is removed again

    with pytest.raises(ModelError) as e:
        build_model(class_path="qs_user_models:TinyNte", args={"width": 4}, search_path=tmp_path)
    assert "has no attribute 'TinyNte'" in e.value.what and "did you mean 'TinyNet'" in e.value.fix
    with pytest.raises(ModelError, match="not a torch.nn.Module subclass"):
        build_model(class_path="qs_user_models:NotAModule", search_path=tmp_path)
    with pytest.raises(ModelError, match="returned int"):
        build_model(class_path="qs_user_models:not_a_factory", search_path=tmp_path)
    with pytest.raises(ModelError, match="could not be built from model.args: RuntimeError: negative dimension"):
        build_model(class_path="qs_user_models:exploding", args={"size": -1}, search_path=tmp_path)
    with pytest.raises(ModelError) as e:
        build_model(class_path="qs_user_models:TinyNet", args={"widht": 4}, search_path=tmp_path)
    assert "unexpected argument 'widht'" in e.value.what and "missing required argument 'width'" in e.value.what
    assert "TinyNet(width, depth=1)" in e.value.fix


def test_class_path_errors(tmp_path):
    with pytest.raises(ModelError, match="no module named 'qs_no_such_module'"):
        build_model(class_path="qs_no_such_module:Net", search_path=tmp_path)
    with pytest.raises(ModelError, match="not of the form 'module:ClassName'"):
        build_model(class_path="torch.nn.Linear")
    (tmp_path / "qs_needs_dep.py").write_text("import qs_missing_dependency\n")
    with pytest.raises(ModelError, match="imports 'qs_missing_dependency', which is not installed"):
        build_model(class_path="qs_needs_dep:Net", search_path=tmp_path)
    (tmp_path / "qs_broken.py").write_text("def oops(:\n")
    with pytest.raises(ModelError, match="importing module 'qs_broken' failed: SyntaxError"):
        build_model(class_path="qs_broken:Net", search_path=tmp_path)


# ----------------------------------------------------------------------------- infer_args

def test_infer_args_fills_and_checks():
    assert infer_args("linear", {}, n_features=10, n_outputs=1) == {"in_features": 10, "out_features": 1}
    assert infer_args("mlp", {"hidden": 8}, n_features=3) == {"hidden": 8, "in_features": 3}
    assert infer_args("gpt", {"d_model": 64}, vocab_size=257) == {"d_model": 64, "vocab_size": 257}
    assert infer_args("gpt", {"vocab_size": 300}, vocab_size=257)["vocab_size"] == 300
    assert infer_args("custom", {"a": 1}, n_features=4) == {"a": 1}
    with pytest.raises(ModelError) as e:
        infer_args("linear", {"in_features": 8}, n_features=10)
    assert e.value.what == "model.args.in_features is 8 but the data has 10 feature columns"
    with pytest.raises(ModelError, match="vocab_size is 100"):
        infer_args("gpt", {"vocab_size": 100}, vocab_size=257)
    assert infer_args("gpt", {"max_seq_len": 64}, max_seq_len=64) == {"max_seq_len": 64}
    with pytest.raises(ModelError, match="data.max_seq_len is 100 but the model takes at most 32"):
        infer_args("gpt", {"max_seq_len": 32}, vocab_size=257, max_seq_len=100)
    with pytest.raises(ModelError, match="at most 256"):  # GPT's default
        infer_args("gpt", {}, max_seq_len=512)


# ----------------------------------------------------------------------------- weight files

@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip_exactly(tmp_path, suffix):
    model = GPT(**TINY_GPT, tie_embeddings=True)
    sd = model.state_dict()
    sd["extra.half"] = torch.randn(3, 4).to(torch.bfloat16)
    sd["extra.view"] = torch.arange(12.0).view(3, 4).t()  # non-contiguous
    path = tmp_path / f"w{suffix}"
    save_state_dict(sd, path)
    back = read_state_dict(path)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="not found") as e:
        read_state_dict(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in e.value.where
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ModelError, match="unknown weights file type '.ckpt'"):
        read_state_dict(tmp_path / "w.ckpt")


def test_truncated_files_are_refused(tmp_path):
    for suffix in (".safetensors", ".pt"):
        path = tmp_path / f"w{suffix}"
        save_state_dict({"a": torch.randn(64, 64)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelError, match="truncated or corrupt") as e:
            read_state_dict(path)
        assert str(path) == e.value.where


class _Evil:
    """A pickle payload that writes a marker file when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    for i, payload in enumerate([{"w": _Evil(str(marker))}, _Evil(str(marker))]):
        path = tmp_path / f"evil{i}.pt"
        if i == 0:
            torch.save(payload, path)
        else:
            path.write_bytes(pickle.dumps(payload))
        with pytest.raises(ModelError) as e:
            read_state_dict(path)
        assert "would run code" in e.value.what and "never unpickles" in e.value.what
        assert "safetensors" in e.value.fix and "ONLY if you trust" in e.value.fix
        assert not marker.exists()


def test_non_state_dict_pt_files(tmp_path):
    cases = {
        "model.pt": (nn.Linear(2, 2), "whole pickled model"),
        "list.pt": ([torch.ones(2)], "holds a list with 1 entries"),
        "ckpt.pt": ({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, "key 'state_dict' holds a dict"),
        "mixed.pt": ({"w": torch.ones(2), "step": 3}, "key 'step' holds an int"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ModelError, match=message):
            read_state_dict(tmp_path / name)
    with pytest.raises(ModelError) as e:
        read_state_dict(tmp_path / "ckpt.pt")
    assert "torch.save(ckpt['state_dict']" in e.value.fix


# ----------------------------------------------------------------------------- load_base_weights

def _wrapped_linear_model() -> LinearModel:
    model = LinearModel(10, 1, bias=False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.linear = wrap(model.linear, rank=2, alpha=2)
    return model


def test_wrapping_keeps_base_keys_and_base_loads(tmp_path):
    base = LinearModel(10, 1, bias=False)
    path = tmp_path / "base.safetensors"
    save_state_dict(base.state_dict(), path)
    model = _wrapped_linear_model()
    assert isinstance(model.linear, LoraLayer)
    assert set(model.state_dict()) == {"linear.weight", "linear.lora_A", "linear.lora_B"}
    lora_a = model.linear.lora_A.detach().clone()
    load_base_weights(model, path)
    assert torch.equal(model.linear.weight, base.linear.weight)
    assert torch.equal(model.linear.lora_A, lora_a)  # LoRA tensors untouched
    x = torch.randn(4, 10)
    assert torch.equal(model(x), base(x))  # fresh adapter: B = 0


def test_load_base_weights_strict_errors_leave_model_unchanged(tmp_path):
    model = GPT(**TINY_GPT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = GPT(**TINY_GPT).state_dict()
    del sd["layers.1.mlp.up_proj.weight"]
    sd["layers.0.self_attn.q_proj.weight"] = torch.zeros(5, 5)
    sd["bogus.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_state_dict(sd, path)
    with pytest.raises(ModelError) as e:
        load_base_weights(model, path)
    text = e.value.what
    assert "1 model keys missing from the file" in text and "layers.1.mlp.up_proj.weight" in text
    assert "1 file keys the model does not have" in text and "bogus.weight" in text
    assert "layers.0.self_attn.q_proj.weight: file (5, 5), model (32, 32)" in text
    assert e.value.where == str(path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded

    wide = GPT(**{**TINY_GPT, "n_layer": 4})
    save_state_dict(wide.state_dict(), path)
    with pytest.raises(ModelError, match=r"file keys the model does not have:(.|\n)*and 8 more"):
        load_base_weights(model, path)


def test_tied_head_may_be_absent(tmp_path):
    model = GPT(**TINY_GPT, tie_embeddings=True)
    sd = GPT(**TINY_GPT, tie_embeddings=True).state_dict()
    del sd["lm_head.weight"]
    save_state_dict(sd, tmp_path / "tied.safetensors")
    load_base_weights(model, tmp_path / "tied.safetensors")
    assert torch.equal(model.lm_head.weight, sd["embed_tokens.weight"])


# ----------------------------------------------------------------------------- shipped assets

def test_shipped_quickstart_base_fits_the_quickstart_config():
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    model_cfg = config["model"]
    model = build_model(arch=model_cfg["arch"], args=model_cfg["args"])
    for name, module in list(model.named_modules()):  # as LoRA injection would
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not model.lm_head:
                setattr(module, child_name, wrap(child, rank=8, alpha=16))
    load_base_weights(model, ROOT / model_cfg["base"])
    assert config["data"]["max_seq_len"] <= model_cfg["args"]["max_seq_len"]


def test_shipped_seed_linear_base_fits_its_config():
    config = yaml.safe_load((ROOT / "configs" / "seed_linear.yaml").read_text())
    model = build_model(arch=config["model"]["arch"], args=config["model"]["args"])
    load_base_weights(model, ROOT / config["model"]["base"])
    header = (ROOT / config["data"]["train"]).read_text().splitlines()[0]
    assert header == ",".join([f"x{i}" for i in range(10)] + ["y"])
