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
from .answers import heldout_records


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

    @classmethod
    def of(cls, cfg, tokenizer, out: Path | None) -> "Sampler | None":
        """The sampler ``cfg.eval`` asks for, or None (no samples, or not a causal LM)."""
        if not cfg.eval.samples or cfg.task != "causal_lm" or tokenizer is None:
            return None
        records = heldout_records(cfg, None, tokenizer, answers=False)[:cfg.eval.samples]
        return cls(records, tokenizer, out / "samples.jsonl" if out is not None else None, cfg.eval.max_new_tokens)

    def take(self, model, step: int, autocast) -> list[dict]:
        """Complete the prompts with ``model`` now; write and return the rows."""
        limit = getattr(model, "max_seq_len", None)
        prompts = [with_bos(self.tokenizer, list(self.tokenizer.encode(r.prompt))) for r in self.prompts]
        budget = self.max_new_tokens
        if limit is not None:
            prompts = [p[-(limit - 1):] for p in prompts]
            budget = max(1, min(budget, limit - max(len(p) for p in prompts)))
        with autocast():
            out = generate(model, prompts, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                           sampling=Sampling(max_new_tokens=budget), decode=self.tokenizer.decode)
        rows = [{"step": step, "prompt": r.prompt, "completion": g.text, "answer": r.answer}
                for r, g in zip(self.prompts, out)]
        if self.first_step is None:
            self.first, self.first_step = rows, step
        self.last = rows
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows))
        return rows
