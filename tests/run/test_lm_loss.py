"""The causal LM loss with the head only on the target tokens, in chunks: the same loss
and gradients as cross entropy over the full logits, and no full logits tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lora_cli import apply_lora
from lora_cli.models.gpt import GPT
from lora_cli.run import lm_loss

VOCAB = 512


def _model(head_target: bool, tie: bool = False, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(vocab_size=VOCAB, max_seq_len=32, n_layer=2, n_head=2, d_model=32, tie_embeddings=tie)
    targets = ["q_proj", "v_proj", "down_proj"] + (["lm_head"] if head_target else [])
    apply_lora(model, rank=4, alpha=8, target_modules=targets)
    with torch.no_grad():                   # B != 0, so the adapter changes the output
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 20), generator=g)
    labels = torch.randint(0, VOCAB, (3, 20), generator=g)
    labels[0, :7] = lm_loss.IGNORE             # a prompt
    labels[1, 12:] = lm_loss.IGNORE            # padding
    labels[2, ::3] = lm_loss.IGNORE
    return ids, labels


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("head_target,tie", [(False, False), (True, False), (False, True)])
def test_head_only_loss_and_gradients_match_full_logits(head_target, tie, monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 4 * VOCAB * 5)   # 5 rows a chunk: many chunks
    ids, labels = _batch()
    full, part = _model(head_target, tie), _model(head_target, tie)
    logits = full(ids)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum")
    expected.backward()
    where = lm_loss.head_of(part)
    assert where is not None and where[2] is part.lm_head
    got = lm_loss.loss_sum(part, where, ids, labels, "cpu")
    got.backward()
    assert part.lm_head is where[2]             # the head is back in place
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    want, have = _grads(full), _grads(part)
    assert set(want) == set(have) and any(n.startswith("lm_head") for n in want) == head_target
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tally_matches_full_logits():
    ids, labels = _batch(seed=2)
    model = _model(False)
    with torch.no_grad():
        logits = model(ids).reshape(-1, VOCAB)
    keep = labels.reshape(-1) != -100
    loss, correct, n = lm_loss.tally(model, lm_loss.head_of(model), ids, labels, "cpu")
    assert n == int(keep.sum())
    assert abs(loss - float(F.cross_entropy(logits[keep], labels.reshape(-1)[keep], reduction="sum"))) < 1e-3
    assert correct == int((logits[keep].argmax(-1) == labels.reshape(-1)[keep]).sum())


class _LargestVocabTensor(TorchDispatchMode):
    """The most elements of any tensor an op allocates (not a view, not in place) whose
    last dimension is the vocabulary: the logits, their softmax and gradients."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab \
                    and t.untyped_storage().data_ptr() not in inputs:     # new memory, not a view or in place
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("head_target", [False, True])
def test_no_full_logits_are_ever_held(head_target, monkeypatch):
    rows = 8
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 4 * VOCAB * rows)
    ids, labels = _batch()
    model = _model(head_target)
    where = lm_loss.head_of(model)
    with _LargestVocabTensor(VOCAB) as today:
        F.cross_entropy(model(ids).reshape(-1, VOCAB), labels.reshape(-1), reduction="sum").backward()
    with _LargestVocabTensor(VOCAB) as chunked:
        lm_loss.loss_sum(model, where, ids, labels, "cpu").backward()
    assert today.largest >= ids.numel() * VOCAB          # the measure sees the full logits of today's path
    assert 0 < chunked.largest <= rows * VOCAB           # one chunk at most, forward and backward


def test_models_whose_forward_changes_logits_after_the_head_are_left_alone():
    class Capped(torch.nn.Module):
        config = type("C", (), {"model_type": "gemma2"})()

        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 8)

        def get_output_embeddings(self):
            return self.lm_head

    assert lm_loss.head_of(Capped()) is None
    assert lm_loss.head_of(torch.nn.Linear(3, 3)) is None


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hugging_face_head_only_matches_full_logits(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model, targets = transformers.LlamaForCausalLM(config), ["q_proj", "v_proj"]
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model, targets = transformers.GPT2LMHeadModel(config), ["c_attn"]
    apply_lora(model, rank=4, alpha=8, target_modules=targets)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    ids, labels = _batch(seed=4)
    where = lm_loss.head_of(model)
    assert where is not None
    got = lm_loss.loss_sum(model, where, ids, labels, "cpu")
    got.backward()
    have = _grads(model)
    model.zero_grad()
    expected = F.cross_entropy(model(ids).logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(have[name], grad, rtol=1e-5, atol=1e-6, msg=name)
