"""Generation: the built-in gpt's key/value cache against full recomputation, batching
with left padding, sampling options and stop conditions."""

from __future__ import annotations

import pytest
import torch

from lora_cli.lora.inject import apply_lora
from lora_cli.models import GPT
from lora_cli.models.generation import Sampling, generate, pick
from lora_cli.models.kv_cache import KVCache, cached_forward
from lora_cli.models.tokenizers import ByteTokenizer

from conftest import perturb_lora

TOK = ByteTokenizer()


def adapted_gpt(seed: int = 0, n_layer: int = 2) -> GPT:
    torch.manual_seed(seed)
    model = GPT(vocab_size=257, max_seq_len=96, n_layer=n_layer, n_head=2, d_model=32)
    with torch.no_grad():
        for p in model.parameters():      # a sharper random model: greedy paths with few near-ties
            p.mul_(4.0)
    apply_lora(model, rank=4, alpha=8, target_modules="all-linear")
    return perturb_lora(model, seed=seed + 1).eval()


PROMPTS = ["name=alice age=31\n", "x", "a longer prompt that spans more tokens: "]


def test_cached_forward_gives_the_full_forward_logits():
    model = adapted_gpt()
    ids = torch.tensor([TOK.encode("hello there, general")])
    full = model(ids)                                                     # (1, T, V)
    cache = KVCache()
    first = cached_forward(model, ids[:, :7], cache)
    rest = [cached_forward(model, ids[:, t:t + 1], cache) for t in range(7, ids.shape[1])]
    stepped = torch.cat([first, *rest], dim=1)
    assert torch.allclose(stepped, full, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_with_the_cache_equals_greedy_without_it_token_for_token(seed: int):
    model = adapted_gpt(seed)
    prompts = [TOK.encode(p) for p in PROMPTS]
    s = Sampling(max_new_tokens=40)
    cached = generate(model, prompts, eos_id=TOK.eos_id, pad_id=TOK.pad_id, sampling=s, decode=TOK.decode)
    full = generate(model, prompts, eos_id=TOK.eos_id, pad_id=TOK.pad_id, sampling=s, decode=TOK.decode,
                    use_cache=False)
    assert [g.ids for g in cached] == [g.ids for g in full]
    assert all(len(g.ids) > 0 for g in cached)


def test_a_left_padded_batch_generates_what_each_prompt_does_alone():
    model = adapted_gpt()
    s = Sampling(max_new_tokens=30)
    batch = generate(model, [TOK.encode(p) for p in PROMPTS], eos_id=TOK.eos_id, pad_id=TOK.pad_id, sampling=s)
    alone = [generate(model, [TOK.encode(p)], eos_id=TOK.eos_id, pad_id=TOK.pad_id, sampling=s)[0] for p in PROMPTS]
    assert [g.ids for g in batch] == [g.ids for g in alone]


def test_sampling_is_reproducible_by_seed_and_top_k_1_is_greedy():
    model = adapted_gpt()
    prompt = [TOK.encode("name=")]
    run = lambda **kw: generate(model, prompt, eos_id=TOK.eos_id, pad_id=TOK.pad_id,   # noqa: E731
                                sampling=Sampling(max_new_tokens=25, **kw))[0].ids
    assert run(temperature=1.0, seed=3) == run(temperature=1.0, seed=3)
    assert run(temperature=5.0, seed=3) != run(temperature=5.0, seed=4)
    assert run(temperature=1.0, top_k=1, seed=7) == run()


def test_top_p_keeps_the_smallest_set_covering_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    drawn = {int(pick(logits, Sampling(temperature=1.0, top_p=0.7), g)) for _ in range(200)}
    assert drawn == {0, 1}


def test_stop_string_cuts_the_text_and_eos_ends_a_row():
    model = adapted_gpt()
    prompt = [TOK.encode(PROMPTS[0])]
    free = generate(model, prompt, eos_id=TOK.eos_id, pad_id=TOK.pad_id, sampling=Sampling(max_new_tokens=20),
                    decode=TOK.decode)[0]
    assert free.stop == "length" and len(free.ids) == 20
    stop = free.text[5:7]
    cut = generate(model, prompt, eos_id=TOK.eos_id, pad_id=TOK.pad_id, decode=TOK.decode,
                   sampling=Sampling(max_new_tokens=20, stop=(stop,)))[0]
    assert cut.stop == "stop" and cut.text == free.text[:free.text.find(stop)]
    eos_at = free.ids[3]
    ended = generate(model, prompt, eos_id=eos_at, pad_id=TOK.pad_id, decode=TOK.decode,
                     sampling=Sampling(max_new_tokens=20))[0]
    assert ended.stop == "eos" and ended.ids == free.ids[:free.ids.index(eos_at)]


def test_streamed_pieces_add_up_to_the_text():
    model = adapted_gpt()
    pieces: dict[int, str] = {}
    out = generate(model, [TOK.encode(p) for p in PROMPTS[:2]], eos_id=TOK.eos_id, pad_id=TOK.pad_id,
                   sampling=Sampling(max_new_tokens=15), decode=TOK.decode,
                   on_text=lambda b, piece: pieces.__setitem__(b, pieces.get(b, "") + piece))
    assert [pieces.get(b, "") for b in range(2)] == [g.text.rstrip("\ufffd") for g in out]
