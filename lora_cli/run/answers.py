"""Generated answers scored against the data's (``lora-eval --generate``).

Each held-out prompt is decoded greedily (batched, left-padded) by the base and by the
adapted (or merged) model, and its completion compared with the record's answer:

    exact_match        completion == answer
    normalized_match   the same after collapsing every run of whitespace to one space
                       and stripping both ends

The worst examples are the adapted model's misses that are least like their answer.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

import torch

from ..data.prompts import PromptRecord, read_prompts
from ..errors import UserError
from ..models.generation import Sampling
from .generate import Generator, open_base, open_generator


def normalize(text: str) -> str:
    """``text`` with each run of whitespace one space, and none at either end."""
    return " ".join(text.split())


def match_rates(completions: list[str], answers: list[str]) -> dict:
    """Exact and normalized-whitespace match rates of ``completions`` against ``answers``."""
    if len(completions) != len(answers):
        raise ValueError(f"match_rates: {len(completions)} completions for {len(answers)} answers")
    n = len(answers)
    exact = sum(c == a for c, a in zip(completions, answers))
    loose = sum(normalize(c) == normalize(a) for c, a in zip(completions, answers))
    return {"exact_match": exact / n if n else 0.0, "normalized_match": loose / n if n else 0.0,
            "exact": exact, "normalized": loose, "n": n}


def worst(records: list[PromptRecord], base: list[str], adapted: list[str], k: int = 3) -> list[dict]:
    """The ``k`` adapted completions that miss their answer by most (least similar first)."""
    misses = [(difflib.SequenceMatcher(None, c, r.answer).ratio(), i) for i, (r, c) in enumerate(zip(records, adapted))
              if normalize(c) != normalize(r.answer)]
    return [{"prompt": records[i].prompt, "answer": records[i].answer, "base": base[i], "adapted": adapted[i],
             "similarity": round(ratio, 3)} for ratio, i in sorted(misses)[:k]]


@dataclass
class GenerationScores:
    """Match rates of the base and the adapted model's greedy completions, and examples."""

    base: dict
    adapted: dict
    worst: list[dict] = field(default_factory=list)
    max_new_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def heldout_records(cfg, data: str | None, tokenizer, *, answers: bool = True) -> list[PromptRecord]:
    """The held-out prompts with answers: ``data``, else the config's eval file, else
    the rows of its training file that data.val_split held out (the same rows, drawn as
    :func:`lora_cli.data.batches.split` draws them). With ``answers`` every record must
    have one."""
    d = cfg.data
    if data or (d.eval and os.path.isfile(d.eval)):
        records = read_prompts(data or d.eval, tokenizer, text_field=d.text_field)
    elif d.val_split and d.train and os.path.isfile(d.train):
        rows = read_prompts(d.train, tokenizer, text_field=d.text_field)
        n_val = int(len(rows) * d.val_split + 0.5)
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed))
        records = [rows[i] for i in perm[:n_val].sort().values.tolist()]
    else:
        raise UserError("no held-out data to generate from", fix="pass --data FILE with prompts and answers")
    if answers and any(r.answer is None for r in records):
        raise UserError("--generate compares each completion with the record's answer, and some records have "
                        "none", where=data or d.eval or d.train,
                        fix="use prompt/completion, instruction/output or messages records ending with the answer")
    return records


def _answer_budget(gen: Generator, records: list[PromptRecord]) -> int:
    """Enough new tokens for the longest answer, and a few to spare to show overruns."""
    return max(len(gen.tokenizer.encode(r.answer)) for r in records) + 4


def score_generation(source: str | os.PathLike, *, data: str | None = None, merged: str | None = None,
                     base: str | None = None, batch_size: int = 16, code=None, check_base: bool = True,
                     max_new_tokens: int | None = None) -> GenerationScores:
    """Greedy completions of the held-out prompts by the base and by base+adapter (or
    ``merged``), scored against their answers."""
    gen = open_generator(source, merged=merged, base=base, code=code, check_base=check_base, adapter_now=False)
    records = heldout_records(gen.cfg, data, gen.tokenizer)
    sampling = Sampling(max_new_tokens=max_new_tokens or _answer_budget(gen, records))
    prompts = [r.prompt for r in records]
    base_gen = open_base(source, base=base, code=code) if merged else gen
    base_out = [g.text for g in base_gen.complete(prompts, sampling, batch_size=batch_size)]
    gen.load()
    adapted = [g.text for g in gen.complete(prompts, sampling, batch_size=batch_size)]
    answers = [r.answer for r in records]
    return GenerationScores(base=match_rates(base_out, answers), adapted=match_rates(adapted, answers),
                            worst=worst(records, base_out, adapted), max_new_tokens=sampling.max_new_tokens)
