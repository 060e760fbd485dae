"""Text generation from a causal LM: greedy by default, or sampled.

    generate(model, [prompt ids, ...], eos_id=..., pad_id=..., decode=tok.decode)
        -> [Generated(ids, text, stop), ...]     one per prompt, in order

The built-in ``gpt`` decodes here, one token per step over its key/value cache
(:mod:`.kv_cache`; ``use_cache=False`` recomputes the whole sequence each step, the
reference the cache is tested against). A Hugging Face model decodes with its own
``generate``. Prompts of different lengths are left-padded into one batch. A row stops at
the end-of-sequence token, at one of the ``stop`` strings (its text is cut before it), or
after ``max_new_tokens``. ``on_text(row, piece)`` receives each row's text as it grows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .gpt import GPT
from .kv_cache import KVCache, cached_forward


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen."""

    max_new_tokens: int = 64        # tokens generated at most per prompt
    temperature: float = 0.0        # 0: greedy (the most likely token); > 0: sample from softmax(logits / t)
    top_k: int = 0                  # sample among the k most likely tokens only (0: all)
    top_p: float = 1.0              # sample among the most likely tokens whose probabilities add up to p
    seed: int = 0                   # the sampling generator's seed
    stop: tuple[str, ...] = ()      # stop a row when its text contains one of these (cut before it)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Generated:
    """One prompt's continuation: its new token ids (eos excluded), their text (cut
    before a stop string) and why it ended: 'eos', 'stop' or 'length'."""

    ids: list[int]
    text: str
    stop: str


def pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """The next token (B,) from the last position's logits (B, V)."""
    if s.greedy:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[:, -1:]                     # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)            # (B, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p                              # keep the first token always
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class _Rows:
    """Each row's generated ids and text, and whether it has ended."""

    def __init__(self, n: int, eos_id: int, s: Sampling, decode, on_text):
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.ended: list[str | None] = [None] * n
        self.shown = [""] * n
        self.eos_id, self.s, self.decode, self.on_text = eos_id, s, decode, on_text

    def add(self, tokens: Sequence[int]) -> None:
        for b, token in enumerate(tokens):
            if self.ended[b]:
                continue
            if token == self.eos_id:
                self.ended[b] = "eos"
                continue
            self.ids[b].append(int(token))
            if self.decode is None or not (self.s.stop or self.on_text):   # the text is needed at the end only
                continue
            raw = self.decode(self.ids[b])
            text = self._cut(raw)
            if any(stop in raw for stop in self.s.stop):
                self.ended[b] = "stop"
            if self.on_text is not None and not text.endswith("\ufffd") and text.startswith(self.shown[b]):
                piece, self.shown[b] = text[len(self.shown[b]):], text
                if piece:
                    self.on_text(b, piece)
        for b in range(len(self.ids)):
            if not self.ended[b] and len(self.ids[b]) >= self.s.max_new_tokens:
                self.ended[b] = "length"

    def _cut(self, text: str) -> str:
        """``text`` up to the first stop string in it."""
        cuts = [text.find(stop) for stop in self.s.stop if stop in text]
        return text[:min(cuts)] if cuts else text

    def text(self, b: int) -> str:
        return self._cut(self.decode(self.ids[b])) if self.decode is not None else ""

    @property
    def done(self) -> bool:
        return all(self.ended)

    def results(self) -> list[Generated]:
        return [Generated(self.ids[b], self.text(b), self.ended[b] or "length") for b in range(len(self.ids))]


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), valid (B, T) bool): each prompt right-aligned, pads before it."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[b, width - len(p):] = True
    return ids.to(device), valid.to(device)


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], *, eos_id: int, pad_id: int,
             sampling: Sampling = Sampling(), decode: Callable[[list[int]], str] | None = None,
             on_text: Callable[[int, str], None] | None = None, use_cache: bool = True) -> list[Generated]:
    """Continue each prompt (a non-empty list of token ids); see the module docstring."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, GPT):
            if use_cache:
                return _gpt_cached(model, prompts, eos_id, pad_id, sampling, decode, on_text)
            out = []
            for b, p in enumerate(prompts):     # recomputed in full each step: one unpadded row at a time
                show = (lambda _, piece, b=b: on_text(b, piece)) if on_text else None
                out += _gpt_uncached(model, p, eos_id, sampling, decode, show)
            return out
        return _hf(model, prompts, eos_id, pad_id, sampling, decode, on_text)
    finally:
        model.train(was_training)


def _generator(s: Sampling, device) -> torch.Generator | None:
    return None if s.greedy else torch.Generator(device=device).manual_seed(s.seed)


def _gpt_cached(model: GPT, prompts, eos_id, pad_id, s: Sampling, decode, on_text) -> list[Generated]:
    device = _device(model)
    rows, gen = _Rows(len(prompts), eos_id, s, decode, on_text), _generator(s, device)
    ids, valid = _left_padded(prompts, pad_id, device)                     # (B, T)
    cache = KVCache()
    logits = cached_forward(model, ids, cache, valid)[:, -1]                 # (B, V)
    while True:
        token = pick(logits, s, gen)                                         # (B,)
        rows.add(token.tolist())
        if rows.done or s.max_new_tokens <= 0:
            return rows.results()
        logits = cached_forward(model, token[:, None], cache)[:, -1]        # (B, V)


def _gpt_uncached(model: GPT, prompt: list[int], eos_id, s: Sampling, decode, on_text) -> list[Generated]:
    device = _device(model)
    rows, gen = _Rows(1, eos_id, s, decode, on_text), _generator(s, device)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)            # (1, T)
    while True:
        token = pick(model(ids)[:, -1], s, gen)                              # (1,)
        rows.add(token.tolist())
        if rows.done:
            return rows.results()
        ids = torch.cat([ids, token[:, None]], dim=1)                        # (1, T + 1)


class _Streamer:
    """transformers' streamer interface (put, end) feeding :class:`_Rows`; batch of one."""

    def __init__(self, rows: _Rows):
        self.rows, self.prompt_seen = rows, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:             # generate() first puts the prompt itself
            self.prompt_seen = True
            return
        self.rows.add([int(v) for v in value.reshape(-1)[:1]])

    def end(self) -> None:
        pass


def _hf(model: nn.Module, prompts, eos_id, pad_id, s: Sampling, decode, on_text) -> list[Generated]:
    device = _device(model)
    ids, valid = _left_padded(prompts, pad_id, device)
    rows = _Rows(len(prompts), eos_id, s, decode, on_text if len(prompts) == 1 else None)
    options = {"do_sample": False} if s.greedy else {"do_sample": True, "temperature": s.temperature,
                                                    "top_k": s.top_k, "top_p": s.top_p}
    streamer = _Streamer(rows) if on_text is not None and len(prompts) == 1 else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(s.seed)
        out = model.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=max(s.max_new_tokens, 1),
                             eos_token_id=eos_id, pad_token_id=pad_id, streamer=streamer, **options)
    new = out[:, ids.shape[1]:].tolist()                                     # (B, new)
    if streamer is None:
        rows = _Rows(len(prompts), eos_id, s, decode, None)
        for step in zip(*new):
            rows.add(step)
            if rows.done:
                break
    return rows.results()
