"""No hidden state in the engine: a LoRA layer keeps no reference to the module it
wrapped (unloading rebuilds the plain module from the shared parameters), every tensor
it keeps alive is one of its own parameters or buffers, and nothing is left on the
user's model or in the engine's modules after a forward pass or a merge.

The walk (``conftest.reachable_tensors``) follows every Python reference, so a copy kept
in a plain attribute, a list or a hook closure is found; the first test proves it finds
exactly such a copy. The same walk runs under FSDP in tests/run/test_fsdp_memory.py.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from conftest import ids, perturb_lora, reachable_tensors, storage_bytes, tiny_lm
from lora_cli import apply_lora
from lora_cli.lora import kernel
from lora_cli.lora import layers as layers_module
from lora_cli.lora.inject import lora_layers
from lora_cli.lora.merge import merge_adapter


def own_tensors(module: nn.Module) -> set[int]:
    return {id(t) for t in (*module.parameters(), *module.buffers())}


def strangers(layer: nn.Module) -> list[str]:
    """Paths of the tensors ``layer`` keeps alive that are not its own parameters or buffers."""
    own = own_tensors(layer)
    return [path for path, t in reachable_tensors(layer) if id(t) not in own]


def test_the_walk_finds_a_copy_hidden_outside_the_module_tree():
    layer = lora_layers(apply_lora(tiny_lm(), rank=2, alpha=4, target_modules=["q_proj"]))["layers.0.self_attn.q_proj"]
    assert strangers(layer) == []
    hidden = nn.Linear(16, 16)
    object.__setattr__(layer, "_kept", [{"module": hidden}])           # what `_base_module` used to be
    assert {p for p in strangers(layer)} == {"._kept[0]['module']._parameters['weight']",
                                             "._kept[0]['module']._parameters['bias']"}
    layer.register_forward_hook(lambda m, i, o, _w=hidden.weight.detach().clone(): None)
    assert len(strangers(layer)) == 3                                    # a tensor bound into a hook too


def test_lora_layers_keep_only_their_own_tensors_even_after_training_steps():
    model = perturb_lora(apply_lora(tiny_lm(), rank=2, alpha=4, target_modules="all-linear", dropout=0.1))
    model.train()
    for shared in (False, True):
        with kernel.sharing_dropout(shared):
            model(ids()).sum().backward()
    for path, layer in lora_layers(model).items():
        assert strangers(layer) == [], path
    # nothing the forward passes made is kept by the engine (no module-level cache)
    assert kernel._SHARED.get() is None                                  # the sharing scope ended with its block
    for engine_module in (kernel, layers_module):
        state = {k: v for k, v in vars(engine_module).items()
                 if not callable(v) and not isinstance(v, (type, types.ModuleType))}
        assert [p for p, t in reachable_tensors(state) if storage_bytes(t)] == [], engine_module.__name__


def test_unload_rebuilds_the_plain_module_from_the_shared_parameters():
    base = tiny_lm()
    originals = {name: m for name, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    model = apply_lora(base, rank=2, alpha=4, target_modules="all-linear")
    for path, layer in lora_layers(model).items():
        plain = layer.unload()
        old = originals[path]
        assert type(plain) is type(old) and plain is not old
        assert plain.weight is layer.weight and plain.weight is old.weight       # the same Parameter, no copy
        assert (plain.bias is None) == (old.bias is None) and (plain.bias is None or plain.bias is old.bias)
        assert {k: v for k, v in vars(plain).items() if not k.startswith("_")} == \
               {k: v for k, v in vars(old).items() if not k.startswith("_")}
        x = torch.randn(3, old.in_features)
        torch.testing.assert_close(plain(x), old(x), rtol=0, atol=0)
        assert not any(v is old for _, v in reachable_objects(layer))


def test_a_lora_layer_takes_the_mode_of_the_module_it_replaces():
    """An eval-mode model stays in eval mode where it was adapted: no dropout on its LoRA
    branch until the caller asks for training."""
    model = perturb_lora(apply_lora(tiny_lm(), rank=2, alpha=4, target_modules="all-linear", dropout=0.5))
    assert not any(layer.training for layer in lora_layers(model).values())
    torch.testing.assert_close(model(ids()), model(ids()), rtol=0, atol=0)
    model.train()
    assert all(layer.training for layer in lora_layers(model).values())


def test_after_a_merge_the_model_holds_no_lora_state_and_no_extra_tensor():
    model = perturb_lora(apply_lora(tiny_lm(), rank=2, alpha=4, target_modules="all-linear"))
    expected = model(ids()).detach()
    before = {id(p) for p in model.parameters()}
    merge_adapter(model)
    assert lora_layers(model) == {} and not any("lora" in k for k in model.state_dict())
    assert {id(p) for p in model.parameters()} <= before                 # base Parameters reused, nothing new
    own = own_tensors(model)
    assert [p for p, t in reachable_tensors(model) if id(t) not in own] == []
    torch.testing.assert_close(model(ids()), expected, rtol=1e-5, atol=1e-5)


def reachable_objects(root):
    """(path, object) for the attributes of ``root`` one level down (modules included)."""
    return list(vars(root).items()) + [(k, m) for k, m in root._modules.items()]
