"""Tests for lora_cli.lora.inject: target matching, injection, freezing, the adaptation report.

Invariants: a fresh adapter leaves the model's outputs bitwise unchanged; only LoRA
factors (plus the biases and modules_to_save the user asked for) require grad; training
leaves every base tensor bitwise unchanged; base state-dict keys never change.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import (DIM, N_LAYER, VOCAB, TinyLM, headed, ids, perturb_lora,
                      state_copy, tiny_gpt2, tiny_lm)
from lora_cli import apply_lora, summarize
from lora_cli.errors import TargetError, UserError
from lora_cli.lora.inject import get_spec, lora_layers
from lora_cli.lora.targets import output_head, resolve_targets
from lora_cli.lora.layers import LoraEmbedding, LoraLinear

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LORA_SUFFIXES = (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B")


def paths(*leaves: str, layers=range(N_LAYER)) -> list[str]:
    """Full paths of the given leaves in TinyLM, in module order."""
    out = []
    for i in layers:
        out += [f"layers.{i}.self_attn.{leaf}" for leaf in ATTN if leaf in leaves]
        out += [f"layers.{i}.mlp.{leaf}" for leaf in MLP if leaf in leaves]
    return out


ALL_LINEAR_LM = paths(*ATTN, *MLP)


# --- matching -------------------------------------------------------------------------

@pytest.mark.parametrize("targets, expected", [
    (["q_proj", "v_proj"], paths("q_proj", "v_proj")),
    (["v_proj", "q_proj", "q_proj"], paths("q_proj", "v_proj")),          # model order, no duplicates
    (["self_attn.q_proj"], paths("q_proj")),
    (["layers.1.mlp.up_proj"], ["layers.1.mlp.up_proj"]),
    (["embed_tokens", "lm_head"], ["embed_tokens", "lm_head"]),
])
def test_list_targets_match_the_path_or_a_dotted_suffix(lm, targets, expected):
    assert resolve_targets(lm, targets) == expected


@pytest.mark.parametrize("name", ["proj", "_proj", "q_pro", "roj", "self_attn.q", "0.self_attn.q_proj.x"])
def test_list_targets_never_match_a_substring(lm, name):
    with pytest.raises(TargetError, match="matches no module"):
        resolve_targets(lm, [name])


@pytest.mark.parametrize("pattern, expected", [
    (r"layers\.0\.self_attn\.(q|v)_proj", ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"]),
    (r".*\.(q|v)_proj", paths("q_proj", "v_proj")),
    (r"layers\.\d+\.mlp\.\w+", paths(*MLP)),
    (r"lm_head|embed_tokens", ["embed_tokens", "lm_head"]),
])
def test_regex_targets_match_the_whole_path(lm, pattern, expected):
    assert resolve_targets(lm, pattern) == expected


@pytest.mark.parametrize("pattern", ["q_proj", r"layers\.0\.self_attn\.q", r".*q_pro"])
def test_regex_that_matches_only_part_of_a_path_matches_nothing(lm, pattern):
    with pytest.raises(TargetError, match="whole dotted path"):
        resolve_targets(lm, pattern)


def test_invalid_regex_is_a_target_error(lm):
    with pytest.raises(TargetError, match="invalid regex") as err:
        resolve_targets(lm, "layers.(0")
    assert err.value.where == "lora.target_modules"


def test_all_linear_takes_every_linear_but_the_head_found_by_get_output_embeddings(lm):
    assert resolve_targets(lm, "all-linear") == ALL_LINEAR_LM
    assert output_head(lm) == "lm_head"


def test_all_linear_uses_the_getter_even_for_a_name_that_is_not_head_like():
    class Unembed(TinyLM):
        def __init__(self):
            super().__init__()
            self.unembed = self.lm_head
            del self.lm_head

        def get_output_embeddings(self):
            return self.unembed

    model = Unembed()
    assert output_head(model) == "unembed"
    assert resolve_targets(model, "all-linear") == ALL_LINEAR_LM


@pytest.mark.parametrize("head_name", ["lm_head", "head", "classifier", "score", "output"])
def test_all_linear_without_getter_skips_a_last_top_level_child_named_like_a_head(head_name):
    model = headed(head_name)
    assert not hasattr(model, "get_output_embeddings")
    assert output_head(model) == head_name
    assert resolve_targets(model, "all-linear") == ["body.0", "body.2"]


def test_all_linear_keeps_a_last_child_with_another_name():
    model = headed("proj_out")
    assert output_head(model) is None
    assert resolve_targets(model, "all-linear") == ["body.0", "body.2", "proj_out"]


def test_all_linear_keeps_a_head_named_child_that_is_not_last():
    model = headed("head")
    model.add_module("tail", nn.Identity())            # 'head' is no longer the last child
    assert output_head(model) is None
    assert "head" in resolve_targets(model, "all-linear")


def test_all_linear_on_gpt2_takes_the_conv1d_layers():
    model = tiny_gpt2()
    expected = [f"h.{i}.{p}" for i in range(N_LAYER) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert resolve_targets(model, "all-linear") == expected


def test_all_linear_with_only_a_head_is_an_error():
    model = nn.Module()
    model.lm_head = nn.Linear(4, 4)
    with pytest.raises(TargetError, match="all-linear"):
        resolve_targets(model, "all-linear")


def test_exclude_modules_removes_by_name_and_by_path(lm):
    got = resolve_targets(lm, "all-linear", exclude_modules=["o_proj", "layers.1.mlp.down_proj"])
    assert got == [p for p in ALL_LINEAR_LM if not p.endswith("o_proj") and p != "layers.1.mlp.down_proj"]


def test_exclude_that_matches_no_target_is_an_error(lm):
    with pytest.raises(TargetError, match="exclude 'lm_head'") as err:
        resolve_targets(lm, ["q_proj"], exclude_modules=["lm_head"])
    assert err.value.where == "lora.exclude_modules"


def test_exclude_that_removes_everything_is_an_error(lm):
    with pytest.raises(TargetError, match="removed every"):
        resolve_targets(lm, ["q_proj"], exclude_modules=["q_proj"])


def test_a_target_that_matches_nothing_lists_the_adaptable_modules(lm):
    with pytest.raises(TargetError) as err:
        resolve_targets(lm, ["q_proj", "query"])
    text = str(err.value)
    assert "'query' matches no module" in text
    for leaf in ("embed_tokens", "q_proj (x2)", "gate_proj (x2)", "lm_head"):
        assert leaf in text
    assert "LayerNorm" not in text and "input_layernorm" not in text   # only adaptable modules are listed
    assert isinstance(err.value, UserError) and err.value.where == "lora.target_modules"


@pytest.mark.parametrize("target", [["norm"], ["input_layernorm"], r"layers\.\d\.input_layernorm", ["self_attn"]])
def test_a_target_that_is_not_linear_or_embedding_is_refused(lm, target):
    with pytest.raises(TargetError, match="LoRA adapts Linear, Conv1D and Embedding") as err:
        resolve_targets(lm, target)
    assert "q_proj" in str(err.value)          # the fix lists what can be adapted


# --- injection ------------------------------------------------------------------------

def test_apply_lora_swaps_in_lora_layers_and_records_the_spec(lm):
    apply_lora(lm, rank=4, alpha=8, target_modules=["q_proj", "embed_tokens"], dropout=0.1)
    layers = lora_layers(lm)
    assert list(layers) == ["embed_tokens", *paths("q_proj")]
    assert isinstance(layers["embed_tokens"], LoraEmbedding)
    assert all(isinstance(layers[p], LoraLinear) and layers[p].rank == 4 for p in paths("q_proj"))
    assert all(layer.scaling == 2.0 for layer in layers.values())
    spec = get_spec(lm)
    assert spec.targets == ["embed_tokens", *paths("q_proj")] and spec.rank == 4 and spec.dropout == 0.1


def test_applying_lora_twice_is_refused(lm):
    apply_lora(lm, rank=2, alpha=2, target_modules=["q_proj"])
    with pytest.raises(TargetError, match="already has LoRA"):
        apply_lora(lm, rank=2, alpha=2, target_modules=["v_proj"])
    assert list(lora_layers(lm)) == paths("q_proj")


def test_rank_above_the_smallest_weight_dimension_is_refused(lm):
    with pytest.raises(TargetError, match=f"rank {DIM + 1} is larger") as err:
        apply_lora(lm, rank=DIM + 1, alpha=8, target_modules=["q_proj"])
    assert err.value.where == "lora.rank"
    apply_lora(tiny_lm(), rank=DIM, alpha=8, target_modules=["q_proj"])     # the limit itself is fine


def test_a_refused_rank_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("big", nn.Linear(32, 32))       # rank 10 fits
    model.add_module("small", nn.Linear(8, 8))       # rank 10 does not (whether the limit is min or max)
    before = state_copy(model)
    with pytest.raises(TargetError, match="rank 10"):
        apply_lora(model, rank=10, alpha=8, target_modules=["big", "small"])
    assert lora_layers(model) == {} and get_spec(model) is None
    assert set(model.state_dict()) == set(before)
    apply_lora(model, rank=8, alpha=8, target_modules=["big", "small"])    # a corrected retry works


def test_a_refused_target_leaves_the_model_untouched(lm):
    before = state_copy(lm)
    for bad in (dict(target_modules=["nope"]), dict(target_modules=["q_proj"], modules_to_save=["q_proj"]),
                dict(target_modules=["q_proj"], bias="some")):
        with pytest.raises(TargetError):
            apply_lora(lm, rank=2, alpha=2, **bad)
        assert lora_layers(lm) == {} and get_spec(lm) is None
        assert all(p.requires_grad for p in lm.parameters())
        assert set(lm.state_dict()) == set(before)


@pytest.mark.parametrize("targets, saved", [
    (["q_proj"], ["q_proj"]),
    (["q_proj"], ["layers.0.self_attn.q_proj"]),
    (["down_proj"], ["mlp"]),                       # a parent of a target
    (r"layers\.0\.mlp\.down_proj", ["layers.0.mlp"]),
])
def test_modules_to_save_overlapping_a_target_is_refused(lm, targets, saved):
    with pytest.raises(TargetError, match="both trained fully and adapted") as err:
        apply_lora(lm, rank=2, alpha=2, target_modules=targets, modules_to_save=saved)
    assert err.value.where == "lora.modules_to_save"


def test_modules_to_save_that_matches_nothing_is_refused(lm):
    with pytest.raises(TargetError, match="'head' not found"):
        apply_lora(lm, rank=2, alpha=2, target_modules=["q_proj"], modules_to_save=["head"])


def test_an_unknown_bias_mode_is_refused(lm):
    with pytest.raises(TargetError, match="bias must be one of"):
        apply_lora(lm, rank=2, alpha=2, target_modules=["q_proj"], bias="lora")


# --- what trains ----------------------------------------------------------------------

def _expected_trainable(model: nn.Module, bias: str) -> set[str]:
    """By hand: the LoRA factors, the biases ``bias`` selects, lm_head (a module to save)."""
    names = {n for n, _ in model.named_parameters() if n.endswith(LORA_SUFFIXES)}
    names.add("lm_head.weight")
    lora_paths = {n.rsplit(".", 1)[0] for n in names if n.endswith(LORA_SUFFIXES)}
    for n, _ in model.named_parameters():
        if n.endswith(".bias"):
            owner = n.rsplit(".", 1)[0]
            if bias == "all" or (bias == "lora_only" and owner in lora_paths):
                names.add(n)
    return names


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_only_lora_factors_chosen_biases_and_saved_modules_require_grad(lm, bias):
    apply_lora(lm, rank=4, alpha=8, target_modules=["q_proj", "o_proj", "down_proj", "embed_tokens"],
               bias=bias, modules_to_save=["lm_head"])
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable == _expected_trainable(lm, bias)
    biases = {n for n in trainable if n.endswith(".bias")}
    if bias == "none":
        assert biases == set()
    elif bias == "lora_only":    # q_proj and down_proj have a bias, o_proj has none
        assert biases == {f"{p}.bias" for p in paths("q_proj", "down_proj")}
    else:
        assert "norm.bias" in biases and "layers.0.input_layernorm.bias" in biases
        assert "layers.0.self_attn.k_proj.bias" in biases


def test_backward_gives_gradients_only_to_trainable_tensors(lm):
    apply_lora(lm, rank=4, alpha=8, target_modules="all-linear", bias="lora_only")
    perturb_lora(lm)
    lm.train()
    lm(ids()).logsumexp(-1).mean().backward()
    for name, p in lm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name


def test_summarize_counts_match_a_manual_count(lm):
    apply_lora(lm, rank=4, alpha=8, target_modules=["q_proj", "embed_tokens"], bias="lora_only",
               modules_to_save=["lm_head"])
    summary = summarize(lm)
    params = list(lm.parameters())
    assert summary.total == sum(p.numel() for p in params)
    assert summary.trainable == sum(p.numel() for p in params if p.requires_grad)
    base_total = sum(p.numel() for p in tiny_lm().parameters())
    lora = N_LAYER * 4 * (DIM + DIM) + 4 * (VOCAB + DIM)          # q_proj x2, embed_tokens
    assert summary.total == base_total + lora
    assert summary.trainable == lora + N_LAYER * DIM + VOCAB * DIM    # + q_proj biases + lm_head
    assert summary.percent == pytest.approx(100 * summary.trainable / summary.total)
    rows = {r.name: r for r in summary.modules}
    assert list(rows) == ["embed_tokens", *paths("q_proj"), "lm_head"]
    assert (rows["embed_tokens"].kind, rows["embed_tokens"].shape, rows["embed_tokens"].rank,
            rows["embed_tokens"].trainable) == ("embedding", (VOCAB, DIM), 4, 4 * (VOCAB + DIM))
    q = rows["layers.1.self_attn.q_proj"]
    assert (q.kind, q.shape, q.rank, q.trainable) == ("linear", (DIM, DIM), 4, 4 * (DIM + DIM))
    head = rows["lm_head"]
    assert (head.kind, head.shape, head.rank, head.trainable) == ("full", (VOCAB, DIM), None, VOCAB * DIM)


def test_summarize_reports_conv1d_rows_in_their_own_layout():
    model = tiny_gpt2()
    apply_lora(model, rank=2, alpha=4, target_modules=["c_attn"])
    rows = summarize(model).modules
    assert [(r.name, r.kind, r.shape, r.trainable) for r in rows] == [
        (f"h.{i}.attn.c_attn", "conv1d", (DIM, 3 * DIM), 2 * (DIM + 3 * DIM)) for i in range(N_LAYER)]


def test_summarize_a_plain_model_has_no_rows_and_everything_trainable(lm):
    summary = summarize(lm)
    assert summary.modules == [] and summary.trainable == summary.total > 0


# --- outputs and base tensors ---------------------------------------------------------

@pytest.mark.parametrize("make, targets", [
    (tiny_lm, "all-linear"),
    (tiny_lm, ["embed_tokens", "q_proj", "down_proj", "lm_head"]),
    (tiny_gpt2, ["wte", "c_attn", "c_proj", "c_fc"]),
], ids=["lm-all-linear", "lm-mixed", "gpt2"])
def test_a_fresh_adapter_leaves_model_outputs_bitwise_equal(make, targets):
    base = make()
    model = copy.deepcopy(base)
    apply_lora(model, rank=4, alpha=16, target_modules=targets, dropout=0.2).eval()
    x = ids()
    assert torch.equal(model(x), base(x))


def test_training_changes_lora_and_leaves_the_base_bitwise_unchanged(lm):
    base = copy.deepcopy(lm)
    apply_lora(lm, rank=4, alpha=8, target_modules="all-linear", dropout=0.1, bias="lora_only",
               modules_to_save=["norm"])
    trainable = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2, weight_decay=0.1)   # all params: frozen ones have no grad
    lm.train()
    for step in range(3):
        x = ids(seed=step)
        loss = nn.functional.cross_entropy(lm(x[:, :-1]).reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = lm.state_dict()
    for name, t in base.state_dict().items():
        if name in trainable:
            assert not torch.equal(after[name], trainable[name]), f"{name} did not train"
        else:
            assert torch.equal(after[name], t), f"base tensor {name} changed"
    for name, before in trainable.items():
        assert not torch.equal(after[name], before), f"{name} did not train"
    assert any(n.endswith(".lora_A") for n in trainable) and "norm.weight" in trainable


def test_base_checkpoint_keys_are_unchanged(lm):
    base_state = state_copy(lm)
    apply_lora(lm, rank=4, alpha=8, target_modules=["embed_tokens", "q_proj", "down_proj", "lm_head"])
    state = lm.state_dict()
    for key, t in base_state.items():
        assert key in state and torch.equal(state[key], t), key
    extra = set(state) - set(base_state)
    assert extra and all(k.endswith(LORA_SUFFIXES) for k in extra)
    linear = [*paths("q_proj", "down_proj"), "lm_head"]
    assert extra == {f"{p}{s}" for p in linear for s in (".lora_A", ".lora_B")} \
        | {"embed_tokens.lora_embedding_A", "embed_tokens.lora_embedding_B"}


def test_a_plain_base_state_dict_loads_with_only_lora_keys_missing(lm):
    apply_lora(lm, rank=4, alpha=8, target_modules="all-linear").eval()
    other = tiny_lm(seed=1)
    result = lm.load_state_dict(other.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.endswith(LORA_SUFFIXES) for k in result.missing_keys)
    assert len(result.missing_keys) == 2 * len(ALL_LINEAR_LM)
    assert torch.equal(lm(ids()), other(ids()))          # the loaded base took effect, no remapping
