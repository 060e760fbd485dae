"""What the adapter says now (``lora-generate``): completions of prompts by base+adapter,
a merged checkpoint, and the base beside either.

The model is rebuilt from the adapter alone (its :class:`~lora_cli.run.meta.RunMeta`),
or from a training config, as ``lora-eval`` does (:func:`lora_cli.run.compare._source`).
Decoding is :func:`lora_cli.models.generation.generate`: the built-in ``gpt`` over its
key/value cache, a Hugging Face model through its own ``generate``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..data.prompts import PromptRecord, chat_prompt, data_format, read_prompts
from ..data.text import with_bos
from ..errors import UserError
from ..lora.adapter import load_adapter
from ..models.generation import Generated, Sampling, generate
from .build import Datasets, build_base, make_tokenizer, resolve_device
from .compare import _source
from .meta import fingerprint_shapes


@dataclass
class Completion:
    """One prompt and what the model (and, with compare, the base) wrote after it."""

    prompt: str
    completion: str
    stop: str                       # why it ended: eos, stop or length
    tokens: int                     # new tokens
    base: str | None = None         # the base's completion (compare)
    answer: str | None = None       # the reference the prompts file gives, if any

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Generator:
    """A causal LM ready to complete prompts: its tokenizer and the format of its training data."""

    model: nn.Module
    tokenizer: object
    device: torch.device
    data_format: str | None         # of the training data: instruction, messages, prompt, text
    label: str                      # "adapted" or "merged"
    load: Callable[[], None] = field(default=lambda: None, repr=False)   # adds the adapter (if not yet)
    cfg: object = field(default=None, repr=False)                       # the run's config

    def encode(self, prompt: str) -> list[int]:
        return with_bos(self.tokenizer, list(self.tokenizer.encode(prompt)))

    def complete(self, prompts: list[str], sampling: Sampling, on_text=None, batch_size: int = 16) -> list[Generated]:
        """Continuations of ``prompts``, in batches (one at a time when streaming)."""
        size = 1 if on_text is not None else batch_size
        limit = getattr(self.model, "max_seq_len", None)      # the built-in gpt's positions
        out: list[Generated] = []
        for start in range(0, len(prompts), size):
            chunk = [self.encode(p) for p in prompts[start:start + size]]
            chunk_sampling = sampling
            if limit is not None:
                longest = max(len(c) for c in chunk)
                if longest >= limit:
                    raise UserError(f"a prompt of {longest} tokens leaves no room to generate: the model has "
                                    f"{limit} positions", where=f"prompt {start + 1 + [len(c) for c in chunk].index(longest)}",
                                    fix=f"use prompts shorter than {limit} tokens")
                chunk_sampling = replace(sampling, max_new_tokens=min(sampling.max_new_tokens, limit - longest))
            show = (lambda b, piece, s=start: on_text(s + b, piece)) if on_text is not None else None
            out += generate(self.model, chunk, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                            sampling=chunk_sampling, decode=self.tokenizer.decode, on_text=show)
        return out


def open_generator(source: str | os.PathLike, *, merged: str | None = None, base: str | None = None,
                   code=None, check_base: bool = True, adapter_now: bool = True) -> Generator:
    """The model of ``source`` (an adapter directory, or a training config) for generation.

    With ``merged`` the model is that merged checkpoint; otherwise base+adapter. With
    ``adapter_now=False`` the base comes first (to generate the base's completions) and
    ``Generator.load()`` adds the adapter; a merged model is ready as it is, and the
    base is then a second model (:func:`open_base`).
    """
    cfg, adapter, search = _source(source, code, base=base)
    if cfg.task != "causal_lm":
        raise UserError(f"this adapter's task is {cfg.task}, and only a causal_lm model generates text",
                        where=str(source), fix="use lora-eval for regression and classification adapters")
    tokenizer = make_tokenizer(cfg)
    data = Datasets(train=None, eval=None, tokenizer=tokenizer)
    device = resolve_device(cfg.device)
    fmt = data_format(cfg.data.train) if cfg.data.train and str(cfg.data.train).endswith(".jsonl") else None
    if merged:
        model, _, _ = build_base(cfg, data, search_path=search, weights=merged)
        return Generator(model.to(device), tokenizer, device, fmt, "merged", cfg=cfg)
    model, _, _ = build_base(cfg, data, search_path=search, expect=fingerprint_shapes(adapter), exact=check_base)
    gen = Generator(model.to(device), tokenizer, device, fmt, "adapted", cfg=cfg)

    def load() -> None:
        gen.model.to("cpu")
        load_adapter(gen.model, adapter, check_base=check_base)
        gen.model.to(device)
        gen.load = lambda: None
    gen.load = load
    if adapter_now:
        load()
    return gen


def open_base(source: str | os.PathLike, *, base: str | None = None, code=None) -> Generator:
    """The base model of ``source``, alone."""
    cfg, adapter, search = _source(source, code, base=base)
    tokenizer = make_tokenizer(cfg)
    model, _, _ = build_base(cfg, Datasets(train=None, eval=None, tokenizer=tokenizer), search_path=search,
                             expect=fingerprint_shapes(adapter), exact=False)
    device = resolve_device(cfg.device)
    return Generator(model.to(device), tokenizer, device, None, "base")


def prompts_of(gen: Generator, *, prompt: str | None, prompts_file: str | None, chat: bool) -> list[PromptRecord]:
    """The prompts the user gave: ``prompt`` (one text) or every line of ``prompts_file``;
    with ``chat`` a plain prompt becomes a user message rendered with the chat template
    (or the training data's prompt format)."""
    if (prompt is None) == (prompts_file is None):
        raise UserError("give one of --prompt TEXT and --prompts FILE.jsonl", where="lora-generate",
                        fix='e.g. lora-generate ADAPTER --prompt "name=alice age=31\\n"')
    if prompt is not None:
        if not prompt:
            raise UserError("the prompt is empty", where="--prompt", fix="give the text to continue")
        return [PromptRecord(chat_prompt(prompt, gen.tokenizer, gen.data_format) if chat else prompt)]
    records = read_prompts(prompts_file, gen.tokenizer)
    if chat:
        records = [PromptRecord(chat_prompt(r.prompt, gen.tokenizer, gen.data_format), r.answer) for r in records]
    return records


def check_sampling(s: Sampling) -> None:
    """The generation options, checked together (one message naming each problem's flag)."""
    problems = [(flag, text) for bad, flag, text in (
        (s.max_new_tokens < 1, "--max-new-tokens", f"must be >= 1, got {s.max_new_tokens}"),
        (not s.temperature >= 0, "--temperature", f"must be >= 0 (0 is greedy), got {s.temperature}"),
        (s.top_k < 0, "--top-k", f"must be >= 0 (0: no limit), got {s.top_k}"),
        (not 0 < s.top_p <= 1, "--top-p", f"must be > 0 and <= 1, got {s.top_p}"),
        (any(not stop for stop in s.stop), "--stop", "must not be empty"),
    ) if bad]
    if problems:
        raise UserError("; ".join(f"{flag} {text}" for flag, text in problems), where=problems[0][0],
                        fix="see lora-generate --help")


def generate_completions(source: str | os.PathLike, *, prompt: str | None = None, prompts_file: str | None = None,
                         merged: str | None = None, base: str | None = None, compare: bool = False,
                         chat: bool = False, sampling: Sampling = Sampling(), code=None, check_base: bool = True,
                         on_text: Callable[[int, str], None] | None = None,
                         on_prompts: Callable[[list[str]], None] | None = None) -> list[Completion]:
    """Complete each prompt with base+adapter (or ``merged``); with ``compare`` the base's
    completion comes too. ``on_text(i, piece)`` streams prompt i's text as it is made
    (not with ``compare``, whose two columns are shown together); ``on_prompts(texts)``
    first receives the prompts as the model will see them."""
    check_sampling(sampling)
    gen = open_generator(source, merged=merged, base=base, code=code, check_base=check_base,
                         adapter_now=not compare)
    records = prompts_of(gen, prompt=prompt, prompts_file=prompts_file, chat=chat)
    texts = [r.prompt for r in records]
    if on_prompts is not None:
        on_prompts(texts)
    base_out = None
    if compare:
        base_gen = open_base(source, base=base, code=code) if merged else gen
        base_out = base_gen.complete(texts, sampling)
        gen.load()
    out = gen.complete(texts, sampling, on_text=None if compare else on_text)
    return [Completion(prompt=r.prompt, completion=g.text, stop=g.stop, tokens=len(g.ids),
                       base=base_out[i].text if base_out else None, answer=r.answer)
            for i, (r, g) in enumerate(zip(records, out))]
