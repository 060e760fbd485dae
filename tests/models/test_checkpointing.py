"""Gradient checkpointing: the same loss and LoRA gradients as without it, and fewer
bytes held for backward (measured with the profiler's allocation record, not assumed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from lora_cli.errors import ModelError
from lora_cli.lora.inject import apply_lora
from lora_cli.models.checkpointing import enable_gradient_checkpointing
from lora_cli.models.gpt import GPT


def _peak_bytes(prof) -> int:
    """The highest running total of CPU bytes allocated minus freed, over the profiled region."""
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def _step(model, ids) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, LoRA gradients, and the peak bytes of one forward + backward."""
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logits = model(ids[:, :-1])                                              # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, _peak_bytes(prof)


def _gpt(dropout: float) -> GPT:
    torch.manual_seed(0)
    model = GPT(vocab_size=64, max_seq_len=64, n_layer=4, n_head=2, d_model=32)
    apply_lora(model, rank=4, alpha=8, target_modules="all-linear", dropout=dropout)
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpt_checkpointing_same_gradients_fewer_bytes(dropout):
    ids = torch.randint(0, 64, (4, 65), generator=torch.Generator().manual_seed(1))
    model = _gpt(dropout)
    torch.manual_seed(2)
    loss, grads, plain_bytes = _step(model, ids)
    assert enable_gradient_checkpointing(model) is None and model.gradient_checkpointing
    torch.manual_seed(2)            # the same dropout masks: the recomputation replays the RNG state
    loss_ck, grads_ck, ck_bytes = _step(model, ids)
    assert abs(loss - loss_ck) <= 1e-6
    assert grads.keys() == grads_ck.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], atol=1e-6, rtol=0, msg=name)
    assert ck_bytes < 0.6 * plain_bytes, (ck_bytes, plain_bytes)


def test_checkpointing_is_off_without_grad():
    model = _gpt(0.0)
    enable_gradient_checkpointing(model)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        out = model(ids)
    assert out.grad_fn is None


def test_hf_checkpointing_same_gradients():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)

    def fresh():
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(cfg)
        apply_lora(m, rank=4, alpha=8, target_modules="all-linear")
        m.train()
        return m

    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))

    def grads_of(model):
        out = model(input_ids=ids[:, :-1]).logits
        F.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain = grads_of(fresh())
    model = fresh()
    assert enable_gradient_checkpointing(model) is None
    assert any(getattr(m, 'gradient_checkpointing', False) for m in model.modules())
    ck = grads_of(model)
    assert plain.keys() == ck.keys() and plain
    for name in plain:
        torch.testing.assert_close(ck[name], plain[name], atol=1e-6, rtol=0, msg=name)


def test_models_without_a_switch():
    from lora_cli.models.builtin import MLP
    assert "changes nothing" in enable_gradient_checkpointing(MLP(in_features=3))
    with pytest.raises(ModelError, match="gradient_checkpointing_enable"):
        enable_gradient_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.slow
def test_a_run_with_checkpointing_trains_the_same_adapter(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from lora_cli.run.config import load_config
    from lora_cli.run.train import train

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    adapters = []
    for flag in ("false", "true"):
        cfg = load_config("configs/quickstart.yaml", [
            "device=cpu", f"output_dir={tmp_path / flag}", "train.max_steps=3", "train.batch_size=4",
            "data.max_seq_len=48", "data.eval=null", "eval.samples=0", "eval.exact_match=false", "model.args.max_seq_len=128", f"train.gradient_checkpointing={flag}"])
        result = train(cfg)
        adapters.append(load_file(result.adapter_dir / "adapter_model.safetensors"))
    plain, ck = adapters
    assert plain.keys() == ck.keys() and plain
    for name in plain:
        torch.testing.assert_close(ck[name], plain[name], atol=1e-6, rtol=0, msg=name)
    assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in ck.items() if "lora_B" in n)  # it trained
