"""Everything the terminal shows: progress, tables, errors. The only module using rich.

Library code returns values; the CLI hands them to the ``show_*`` functions here. When
stdout is not a terminal (CI, a log file) progress becomes plain log lines. Every string
that comes from the user or a file (paths, module and column names, notes) is printed
literally: markup escaped, control characters shown as ``\\x1b`` (a file name cannot send
the terminal commands), emoji codes such as ``:cat:`` left alone.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)


# Control characters (an ESC starts a terminal command) are shown as \x.. escapes.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7f, *range(0x80, 0xa0)] if chr(c) not in "\n\t"}


def _literal(text: str) -> str:
    """``text`` as it is: rich markup escaped, control characters made visible."""
    return escape(text.translate(_CONTROL))


def _size(n: int | None) -> str:
    """Bytes in binary units: 1 KiB = 1024 B, 1 MiB = 1024 KiB."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.4g}"


def _line(text, console: Console | None = None, **kwargs) -> None:
    """One line of output: word-wrapped on a terminal, never broken in a log file or pipe
    (where rich would otherwise wrap at 80 columns)."""
    console = console or out
    console.print(text, soft_wrap=not console.is_terminal, **kwargs)


def show_error(exc: Exception, prefix: str = "") -> None:
    """One red message: what, where, and how to fix it. No traceback. ``prefix`` names
    the worker that says it, when there are several."""
    what = getattr(exc, "what", str(exc))
    where = getattr(exc, "where", None)
    fix = getattr(exc, "fix", None)
    err.print(f"{_literal(prefix)}[bold red]error:[/] {_literal(where + ': ') if where else ''}{_literal(what)}",
              markup=True, soft_wrap=True)
    if fix:
        err.print(f"[yellow]  fix:[/] {_literal(fix)}", soft_wrap=True)


def show_note(text: str) -> None:
    err.print(f"[yellow]note:[/] {_literal(text)}", soft_wrap=True)


def show_model_code(code) -> None:
    """What an adapter's model imports, as the user allowed it, said before it is imported."""
    args = repr(code.args) if len(repr(code.args)) <= 200 else repr(code.args)[:197] + "..."
    err.print(f"[yellow]note:[/] importing {_literal(code.class_path)} ({_literal(code.via)}) from "
              f"{_literal(code.origin)}, and calling it with {_literal(args)}", soft_wrap=True)


def show_summary(summary, title: str = "LoRA adapters") -> None:
    """The adapted-modules table and trainable / total parameters."""
    table = Table(title=title, title_justify="left")
    for col, just in (("module", "left"), ("kind", "left"), ("shape", "right"), ("rank", "right"),
                      ("scale", "right"), ("trainable", "right")):
        table.add_column(col, justify=just)
    rows = summary.modules
    shown = rows if len(rows) <= 24 else rows[:20]
    for m in shown:
        scale = f"{m.scale:.4g}" if getattr(m, "scale", None) is not None else "-"
        table.add_row(_literal(m.name), _literal(m.kind), "x".join(map(str, m.shape)), _num(m.rank), scale,
                      _num(m.trainable))
    if len(shown) < len(rows):
        table.add_row(f"... {len(rows) - len(shown)} more", "", "", "", "", "")
    out.print(table)
    _line(f"trainable parameters: [bold]{summary.trainable:,}[/] of {summary.total:,} "
          f"([bold]{summary.percent:.3f}%[/])")


def show_plan(plan) -> None:
    """What --dry-run prints: adapters, parameters, data sizes, steps."""
    from . import data as datalib

    for note in plan.built.notes:
        show_note(note)
    show_summary(plan.summary)
    d = plan.built.data
    table = Table(title="data", title_justify="left")
    table.add_column("split")
    table.add_column("source")
    table.add_column("size", justify="right")
    for name, part in (("train", d.train), ("eval", d.eval)):
        if part is not None:
            desc = datalib.describe(part)
            sizes = ", ".join(f"{k} {_num(v)}" for k, v in desc.items())
            table.add_row(name, _literal(str(part.source)), _literal(sizes))
    out.print(table)
    if isinstance(d.train, datalib.TextData) and d.tokenizer is not None and hasattr(d.tokenizer, "decode"):
        show_example(d.train, d.tokenizer)
    workers = f"{plan.world.size} workers ({plan.world.strategy}), " if plan.world.distributed else ""
    _line(f"{workers}device {_literal(str(plan.device))}{_threads(plan)}, dtype {plan.cfg.dtype}; {describe_batch(plan)}; "
          f"{plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps in all "
          f"({_epochs(plan.total_steps / plan.steps_per_epoch)})")


def _threads(plan) -> str:
    """', 2 threads' on a CPU (per worker when there are several)."""
    if plan.device.type != "cpu":
        return ""
    return f", {plan.threads} thread{'s' if plan.threads != 1 else ''}{' each' if plan.world.distributed else ''}"


def _epochs(n: float) -> str:
    """'1 epoch', '6 epochs', '2.4 epochs': never rounded up."""
    text = f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}" if n >= 0.01 else f"{n:.2g}"
    return f"{text} epoch{'' if text == '1' else 's'}"


def describe_batch(plan) -> str:
    """The batch a step sees: 'batch 8 x grad_accum 2', or with several workers
    'global batch 32 = batch 8 x grad_accum 2 x 2 workers'."""
    t, world = plan.cfg.train, plan.world
    if not world.distributed:
        return f"batch {t.batch_size} x grad_accum {t.grad_accum}"
    return (f"global batch {plan.global_batch} = batch {t.batch_size} x grad_accum {t.grad_accum} "
            f"x {world.size} workers")


def show_example(data, tokenizer) -> None:
    """The first training example as the model sees it: the trained part between ⟦ ⟧,
    then its token ids where it starts, where the trained part starts, and where it ends."""
    from rich.text import Text

    from . import data as datalib

    ids, mask = data.examples[0]
    text = Text()
    start = 0
    for i in range(1, len(ids) + 1):   # runs of equal mask
        if i == len(ids) or mask[i] != mask[start]:
            piece = tokenizer.decode(ids[start:i])
            piece = piece.translate(_CONTROL)
            text.append(f"⟦{piece}⟧" if mask[start] else piece, style="bold green" if mask[start] else "dim")
            start = i
    out.print("first training example (loss on the part in ⟦ ⟧):")
    out.print(text, soft_wrap=True)
    b = datalib.boundaries(ids, mask)
    join = f" ... {b['prompt_end']} ⟦{b['completion_start']}" if "completion_start" in b else " ⟦"
    out.print(f"token ids: {b['start']}{join} ... {b['end']}⟧ ({len(ids)} tokens)", soft_wrap=True,
              markup=False, highlight=False)


class ProgressReporter:
    """Draws training progress: a live bar on a terminal, plain log lines elsewhere."""

    def __init__(self, console: Console = out):
        self.console = console
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.task = None
        self.unit = "samples"
        self.last = ""

    def start(self, plan) -> None:
        self.unit = plan.unit
        self.epochs = plan.epochs
        for note in plan.built.notes:
            show_note(note)
        where = f"{plan.world.size} workers ({plan.world.strategy}, rank 0 on {plan.device}{_threads(plan)})" \
            if plan.world.distributed else f"{plan.device}{_threads(plan)}"
        _line(f"training {plan.total_steps} steps on {_literal(where)}, {describe_batch(plan)} "
              f"({plan.summary.trainable:,} trainable parameters, {plan.summary.percent:.3f}%)", self.console)
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("train", total=plan.total_steps, epoch=1, epochs=plan.epochs,
                                               stats="")

    def step(self, step: int, epoch: int, row: dict | None) -> None:
        if row is not None:
            rate = row.get(f"{self.unit}_per_s")
            self.last = (f"loss {row['loss']:.4f}  lr {row['lr']:.2e}"
                         + (f"  {rate:,.0f} {self.unit}/s" if rate else ""))
            if not self.live:
                _line(f"step {step}  epoch {row['epoch']:.2f}  {self.last}  grad_norm {row['grad_norm']:.3g}",
                      self.console)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, epoch=min(epoch + 1, self.epochs), stats=self.last)

    def evaluated(self, row: dict) -> None:
        metrics = "  ".join(f"{k.removeprefix('eval_')} {_num(v)}" for k, v in row.items()
                            if k.startswith("eval_"))
        text = _literal(f"eval @ step {row['step']}: {metrics}")
        _line(text, self.progress.console if self.progress else self.console)

    def sampled(self, rows: list[dict]) -> None:
        for row in rows:
            _line(f"  [dim]{_literal(row['prompt'].rstrip())}[/] -> {_literal(repr(row['completion']))}",
                  self.progress.console if self.progress else self.console)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def show_train_result(result) -> None:
    """The final summary table of a training run."""
    table = Table(title="run summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    s = result.summary
    table.add_row("trainable", f"{s.trainable:,} of {s.total:,} parameters ({s.percent:.3f}%)")
    table.add_row("adapter", f"{_literal(str(result.adapter_dir))} ({_size(result.adapter_bytes)}; base {_size(result.base_bytes)})")
    aside = [f"evaluation {result.eval_seconds:.1f} s"] if result.eval_seconds else []
    aside += [f"checkpoints {result.checkpoint_seconds:.1f} s"] if result.checkpoint_seconds else []
    table.add_row("steps", f"{result.steps} ({result.epochs:.2f} epochs) in {result.seconds:.1f} s: training "
                  f"{result.train_seconds:.1f} s" + "".join(f", {a}" for a in aside))
    if result.world.distributed:
        traffic = f"{_size(result.gradient_bytes)} of adapter gradients per step"
        if result.world.strategy == "fsdp":
            traffic += f", and the {_size(result.weight_bytes)} of sharded weights gathered in forward and backward"
        table.add_row("workers", f"{result.world.size} ({result.world.strategy}), global batch "
                      f"{result.global_batch}; each exchanges {traffic}")
    table.add_row("final train loss", _num(result.train_loss))
    if result.eval_final is not None:
        base, final = result.eval_base["loss"], result.eval_final["loss"]
        table.add_row("eval loss", f"{_num(final)} (base {_num(base)}, {100 * (final - base) / base:+.1f}%)"
                      if base else _num(final))
    if len(result.losses) > 1:
        from .run.curves import sparkline
        table.add_row("loss curve", f"{sparkline(result.losses)} {_num(result.losses[0])} -> {_num(result.losses[-1])}")
    if result.exact_final is not None:
        e, b = result.exact_final, result.exact_base
        table.add_row("exact match", f"{100 * e['exact_match']:.1f} % of {e['n']:,} held-out answers"
                      + (f" (base {100 * b['exact_match']:.1f} %)" if b else ""))
    if result.curves is not None:
        table.add_row("curves", _literal(str(result.curves)))
    out.print(table)
    if result.samples_last:
        samples = Table(title="samples (first evaluation / last)", title_justify="left", show_lines=True)
        for name in ("prompt", f"step {result.samples_first[0]['step']}", f"step {result.samples_last[0]['step']}"):
            samples.add_column(name, overflow="fold")
        for first, last in zip(result.samples_first, result.samples_last):
            samples.add_row(*(_literal(t) for t in (first["prompt"].rstrip(), first["completion"], last["completion"])))
        out.print(samples)


def show_json(data) -> None:
    """Machine-readable output: one JSON object on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def show_merge(report, adapters=()) -> None:
    """What lora-merge did (and, for an adapter trained on a quantized base, into what)."""
    for adapter in adapters:
        saved = adapter.meta.get("config") if isinstance(adapter.meta, dict) else None
        kind = ((saved or {}).get("model") or {}).get("quantize") if isinstance(saved, dict) else None
        if kind:
            show_note(f"{_literal(str(adapter.source))} was trained on a {kind}-quantized copy of the base: it is "
                      "merged into the original float weights of the base file given, never into the "
                      "quantized copy (lora-eval shows both)")
    _line(f"merged {len(report.changed)} of {report.tensors} tensors into [bold]{_literal(str(report.output))}[/] "
          f"({report.format}, {_size(report.bytes)})")
    if report.added:
        _line(f"added {len(report.added)} tensors the base did not have (new modules): "
              f"{_literal(', '.join(report.added[:6]))}{' ...' if len(report.added) > 6 else ''}")
    _line(f"largest |delta W|: {report.max_delta:.4g}")


def show_verification(result) -> None:
    """The outcome of lora-merge --verify."""
    verdict = "[green]ok[/]" if result.ok else "[bold red]FAILED[/]"
    _line(f"verify: max |merged - (base+adapter)| = {result.max_abs_diff:.3g} over {result.batches} "
          f"batches (tolerance {result.tolerance:.3g}): {verdict}")


def show_comparison(result) -> None:
    """Base and adapted metrics side by side, with the difference."""
    table = Table(title=f"{result.task} on {_literal(str(result.data))}", title_justify="left")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column(result.adapted_label, justify="right")
    table.add_column("delta", justify="right")
    delta = result.delta()
    for key, value in result.base.items():
        if key in delta:
            table.add_row(_literal(key), _num(value), _num(result.adapted[key]), f"{delta[key]:+.4g}")
    out.print(table)
    out.print(f"{result.base.get('n', 0):,} {'target tokens' if result.task == 'causal_lm' else 'examples'}")
    confusion = result.adapted.get("confusion")
    if confusion and len(confusion) <= 10:
        cm = Table(title=f"confusion ({result.adapted_label}; rows true, columns predicted)", title_justify="left")
        cm.add_column("")
        for j in range(len(confusion)):
            cm.add_column(str(j), justify="right")
        for i, row in enumerate(confusion):
            cm.add_row(str(i), *(str(v) for v in row))
        out.print(cm)


def show_interrupted(stop, resume_command: str) -> None:
    """The line a stopped run leaves: where its checkpoint is and how to go on."""
    _line(f"[yellow]stopped[/] after step {stop.step} (signal {stop.signum}); checkpoint: "
          f"{_literal(str(stop.checkpoint))}", err)
    err.print(f"resume with: [bold]{_literal(resume_command)}[/]", soft_wrap=True)


def show_examples(examples) -> None:
    """lora-train --list-configs: one line per example config, then how to copy one."""
    width = max((len(e.name) for e in examples), default=0) + 2
    for e in examples:
        if e.needs:
            yours = [s for s in ("model", "data") if any(k.startswith(s + ".") for k in e.needs)]
            what = f" (needs your {' and '.join(yours)})"
        else:
            what = " (ships its base and data)" if e.ships else ""
        out.print(f"{e.name:<{width}}{e.summary}{what}", markup=False, soft_wrap=True)
    out.print("copy one to edit and run: lora-train --init NAME [DIR]", markup=False, soft_wrap=True)


def show_init(result) -> None:
    """What lora-train --init wrote, and the command that trains the copy."""
    import shlex

    ex = result.example
    files = len(ex.ships)
    sizes = f" and the {files} file{'s' if files != 1 else ''} it reads ({_size(result.bytes)})" if files else ""
    if result.written or result.replaced:
        out.print(f"copied example {ex.name} to {result.config}{sizes}", markup=False, soft_wrap=True)
    else:
        out.print(f"example {ex.name} is already in {result.config}{sizes}, unchanged", markup=False,
                  soft_wrap=True)
    for label, paths in (("replaced", result.replaced), ("kept (identical)", result.unchanged)):
        if paths:
            out.print(f"{label}: {', '.join(str(p) for p in paths)}", markup=False, soft_wrap=True)
    if result.needs:
        keys = ", ".join(f"{k} ({v})" for k, v in result.needs.items())
        out.print(f"before training, edit {result.config} to name your own files: {keys}",
                  markup=False, soft_wrap=True)
    out.print(f"train it with: lora-train {shlex.quote(str(result.config))}", markup=False, soft_wrap=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def show_memory(est, limit_gb: float | None = None) -> None:
    """The plan's memory estimate by part, per worker, and the batch that fits ``limit_gb``."""
    who = f"per worker ({est.workers} workers, {est.strategy})" if est.workers > 1 else "one process"
    table = Table(title=f"memory estimate, {who}", title_justify="left")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    for name, n in est.parts():
        table.add_row(name, _mb(n))
    table.add_row("[bold]peak[/] (tensors; not the torch runtime)", f"[bold]{_mb(est.total())}[/]")
    out.print(table)
    if est.per_example is None:
        show_note(f"activations not measured: one forward pass of the longest example failed ({est.why})")
        return
    other = not est.checkpointing
    _line(f"activations per example: {_mb(est.activations(1, False))}, with gradient checkpointing "
          f"{_mb(est.activations(1, True))}; {'train.gradient_checkpointing=true' if other else 'without it'}: "
          f"peak {_mb(est.total(checkpointing=other))}")
    if limit_gb is not None:
        fits = {ck: est.largest_batch(limit_gb * 1e9, ck) for ck in (False, True)}
        if fits[est.checkpointing]:
            _line(f"--memory-limit {limit_gb:g} GB: batch_size up to [bold]{fits[est.checkpointing]}[/] fits "
                  f"(with gradient checkpointing {fits[True]}, without {fits[False]})")
        else:
            _line(f"--memory-limit {limit_gb:g} GB: no batch fits (the weights, gradients and optimizer alone "
                  f"take {_mb(est.fixed)}); try model.quantize, train.strategy=fsdp or a smaller model")


class StreamPrinter:
    """lora-generate's output as it is made: each prompt dimmed, its completion after it."""

    def __init__(self, prompts: list[str]):
        self.prompts, self.current = prompts, -1

    def _start(self, i: int) -> None:
        if self.current >= 0:
            out.file.write("\n")
        self.current = i
        out.print(_literal(self.prompts[i]), style="dim", end="", soft_wrap=True)

    def piece(self, i: int, text: str) -> None:
        while self.current < i:
            self._start(self.current + 1)
        out.file.write(text.translate(_CONTROL))
        out.file.flush()

    def finish(self) -> None:
        while self.current < len(self.prompts) - 1:
            self._start(self.current + 1)
        out.file.write("\n")
        out.file.flush()


def show_completions(completions, label: str = "adapted") -> None:
    """lora-generate --compare: the base's and the adapted model's completions side by side."""
    table = Table(show_lines=True)
    for name in ("prompt", "base", label) + (("expected",) if any(c.answer is not None for c in completions) else ()):
        table.add_column(name, overflow="fold")
    for c in completions:
        row = [c.prompt.rstrip("\n"), c.base or "", c.completion]
        table.add_row(*(_literal(t) for t in row + ([c.answer or ""] if len(table.columns) == 4 else [])))
    out.print(table)


def show_json_lines(rows) -> None:
    """One JSON object per line on stdout."""
    for row in rows:
        sys.stdout.write(json.dumps(row) + "\n")


def show_generation_scores(scores, label: str = "adapted") -> None:
    """lora-eval --generate: match rates of greedy answers, base and adapted, and the worst misses."""
    table = Table(title=f"greedy answers ({scores.adapted['n']:,} prompts, up to {scores.max_new_tokens} new tokens)",
                  title_justify="left")
    for name, justify in (("match", "left"), ("base", "right"), (label, "right")):
        table.add_column(name, justify=justify)
    for key in ("exact_match", "normalized_match"):
        table.add_row(key, f"{100 * scores.base[key]:.1f} %", f"{100 * scores.adapted[key]:.1f} %")
    out.print(table)
    for w in scores.worst:
        _line(f"[dim]{_literal(w['prompt'].rstrip())}[/] expected {_literal(repr(w['answer']))}, got "
              f"{_literal(repr(w['adapted']))}")
