"""Samples while training (``eval.samples: N``): the same N held-out prompts, completed
greedily at each evaluation.

Each evaluation's samples go to ``output_dir/samples.jsonl``, one line per prompt:
``{"step", "prompt", "completion", "answer"}``. The evaluation before the first step
(the adapter's B is still zero) gives the base's completions, which the final summary
shows beside the last ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data.text import with_bos
from ..models.generation import Sampling, generate
from .answers import heldout_records, match_rates


def has_heldout(cfg) -> bool:
    """Whether the config holds out data to complete: an eval file, or a val_split of train."""
    return bool(cfg.data.eval or cfg.data.val_split)


@dataclass
class Sampler:
    """N fixed prompts and where their completions are written."""

    prompts: list                     # PromptRecord
    tokenizer: object
    path: Path | None                 # samples.jsonl (None: a worker that writes nothing)
    max_new_tokens: int
    first: list[dict] = field(default_factory=list)   # the samples of the first evaluation (the base's at step 0)
    last: list[dict] = field(default_factory=list)
    first_step: int | None = None
    scored: list = field(default_factory=list)        # eval.exact_match: every held-out record, with answers
    first_scores: dict | None = None                  # their match rates before the first step (the base's)
    last_scores: dict | None = None                   # and after the last

    @classmethod
    def of(cls, cfg, tokenizer, out: Path | None) -> "Sampler | None":
        """The sampler ``cfg.eval`` asks for, or None (no samples, or not a causal LM)."""
        if not (cfg.eval.samples or cfg.eval.exact_match) or cfg.task != "causal_lm" or tokenizer is None:
            return None
        if not has_heldout(cfg):      # data.eval=null on the command line: skipped, with a note (see Run)
            return None
        records = heldout_records(cfg, None, tokenizer, answers=cfg.eval.exact_match)
        return cls(records[:cfg.eval.samples], tokenizer, out / "samples.jsonl" if out is not None else None,
                   cfg.eval.max_new_tokens, scored=records if cfg.eval.exact_match else [])

    def _complete(self, model, records, budget: int, autocast) -> list[str]:
        limit = getattr(model, "max_seq_len", None)
        prompts = [with_bos(self.tokenizer, list(self.tokenizer.encode(r.prompt))) for r in records]
        if limit is not None:
            prompts = [p[-(limit - 1):] for p in prompts]
        texts = []
        for start in range(0, len(prompts), 32):
            chunk = prompts[start:start + 32]
            room = budget if limit is None else max(1, min(budget, limit - max(len(p) for p in chunk)))
            with autocast():
                texts += [g.text for g in generate(model, chunk, eos_id=self.tokenizer.eos_id,
                                                   pad_id=self.tokenizer.pad_id, decode=self.tokenizer.decode,
                                                   sampling=Sampling(max_new_tokens=room))]
        return texts

    def score(self, model, autocast) -> dict:
        """Match rates of greedy completions of every held-out record (eval.exact_match)."""
        budget = max(len(self.tokenizer.encode(r.answer)) for r in self.scored) + 4
        return match_rates(self._complete(model, self.scored, budget, autocast), [r.answer for r in self.scored])

    def finish(self, model, autocast) -> None:
        """After the last step: the adapted model's match rates."""
        if self.scored:
            self.last_scores = self.score(model, autocast)

    def take(self, model, step: int, autocast) -> list[dict]:
        """Complete the prompts with ``model`` now; write and return the rows."""
        if self.scored and self.first_step is None:
            self.first_scores = self.score(model, autocast)
        out = self._complete(model, self.prompts, self.max_new_tokens, autocast) if self.prompts else []
        rows = [{"step": step, "prompt": r.prompt, "completion": text, "answer": r.answer}
                for r, text in zip(self.prompts, out)]
        if self.first_step is None:
            self.first, self.first_step = rows, step
        self.last = rows
        if self.path is not None and rows:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows))
        return rows
