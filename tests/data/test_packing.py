"""Packing: examples share rows but not attention; the summed loss and its gradient are
those of the same examples unpacked."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lora_cli import apply_lora
from lora_cli.data import TextData, text_batch
from lora_cli.data.packing import pack, packed_batch
from lora_cli.models.gpt import GPT, packed_mask
from lora_cli.run.lm_loss import model_output

VOCAB = 64


def _examples(n: int = 9, seed: int = 0) -> TextData:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(2, 14)
        ids = [rng.randrange(VOCAB) for _ in range(length)]
        prompt = rng.randint(0, length - 1)
        out.append((ids, [0] * prompt + [1] * (length - prompt)))
    return TextData(out)


def test_rows_hold_every_example_once_and_fit():
    data = _examples(40, seed=3)
    packed = pack(data, 16)
    placed = sorted(i for row in packed.rows for i in row)
    assert placed == list(range(len(data)))
    assert all(packed.row_length(j) <= 16 for j in range(len(packed)))
    assert len(packed) < len(data)                       # something was packed together
    assert pack(data, 16).rows == packed.rows            # deterministic
    inputs, labels = packed_batch(packed, torch.arange(len(packed)), pad_id=0)
    targets = sum(sum(m[1:]) for _, m in data.examples)
    assert int((labels != -100).sum()) == targets        # loss masks unchanged


def test_packed_mask_keeps_attention_inside_each_example():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    mask = packed_mask(positions)[0, 0]
    example = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    for i in range(9):
        for j in range(9):
            assert bool(mask[i, j]) == (j <= i and example[i] == example[j])


def _lora(model, targets):
    apply_lora(model, rank=4, alpha=8, target_modules=targets)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


def _grad_of(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    logits = model_output(model, inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _same_gradient(model):
    data = _examples()
    loss_u, grad_u = _grad_of(model, *text_batch(data, torch.arange(len(data)), pad_id=0))
    packed = pack(data, 20)
    assert len(packed) < len(data)
    loss_p, grad_p = _grad_of(model, *packed_batch(packed, torch.arange(len(packed)), pad_id=0))
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-5)
    for name in grad_u:
        torch.testing.assert_close(grad_p[name], grad_u[name], rtol=1e-5, atol=1e-6, msg=name)


def test_packed_and_unpacked_give_the_same_gradient_gpt():
    torch.manual_seed(0)
    _same_gradient(_lora(GPT(vocab_size=VOCAB, max_seq_len=32, n_layer=2, n_head=2, d_model=32), "all-linear"))


def test_packed_and_unpacked_give_the_same_gradient_hf_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation="sdpa")
    _same_gradient(_lora(transformers.LlamaForCausalLM(config), ["q_proj", "v_proj", "down_proj"]))
