"""``lora-generate``: complete prompts with a trained adapter (registered by :mod:`lora_cli.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .command import _CODE, _CODE_PATH, _TRUST, _examples, _user_errors, _version_option

GENERATE_COMMANDS = (
    "lora-generate runs/quickstart/adapter --prompt 'name=alice age=31\\n'",
    "lora-generate runs/quickstart/adapter --prompts data/quickstart/eval.jsonl --compare",
    "lora-generate runs/quickstart/adapter --merged merged.safetensors --prompt 'name=bob\\n'",
    "lora-generate runs/chat/adapter --chat --prompt 'Hello!' --temperature 0.7 --top-p 0.9 --seed 1",
    "lora-generate runs/quickstart/adapter --prompts prompts.jsonl --json > out.jsonl",
)
GENERATE_EXAMPLES = _examples(*GENERATE_COMMANDS)


@_user_errors
def generate_command(
    source: Path = typer.Argument(..., help="An adapter directory, or the training config.", show_default=False),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The text to continue (\\n is a newline).",
                                         show_default=False),
    prompts: Optional[str] = typer.Option(None, "--prompts", metavar="FILE.jsonl", show_default=False,
                                          help="One prompt per line, in any of the training data's formats."),
    merged: Optional[str] = typer.Option(None, "--merged", help="Generate with this merged checkpoint instead "
                                         "of base+adapter."),
    base: Optional[str] = typer.Option(None, "--base", help="The base weights (or model directory), when they "
                                       "are no longer where the adapter says."),
    compare: bool = typer.Option(False, "--compare", help="Show the base's completion beside the adapter's."),
    chat: bool = typer.Option(False, "--chat", help="Treat each prompt as a user message: the tokenizer's chat "
                              "template, else the training data's prompt format."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; above 0: sample."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sample among the most likely tokens covering p."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop at this text (repeatable).",
                                             show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per prompt, one per line."),
    ignore_fingerprint: bool = typer.Option(False, "--ignore-fingerprint",
                                            help="Load the adapter even if the base differs from its own."),
    model_code: Optional[str] = _CODE,
    model_path: Optional[str] = _CODE_PATH,
    trust_adapter_code: bool = _TRUST,
    version: bool = _version_option(),
) -> None:
    """Complete prompts with base+adapter (or a merged checkpoint); greedy unless --temperature."""
    from .console import StreamPrinter, show_completions, show_json_lines, show_model_code
    from .models.generation import Sampling
    from .run.compare import model_code_for
    from .run.generate import generate_completions
    from .run.meta import CodeChoice

    choice = CodeChoice(model_code=model_code, model_path=model_path, trust_adapter_code=trust_adapter_code)
    code = model_code_for(source, choice)
    if code is not None and not as_json:
        show_model_code(code)
    if prompt is not None:
        prompt = prompt.replace("\\n", "\n")
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop=tuple(s.replace("\\n", "\n") for s in stop or ()))
    printer = [None]

    def stream(i: int, piece: str) -> None:
        printer[0].piece(i, piece)

    streaming = not (as_json or compare)
    results = generate_completions(source, prompt=prompt, prompts_file=prompts, merged=merged, base=base,
                                   compare=compare, chat=chat, sampling=sampling, code=code,
                                   check_base=not ignore_fingerprint,
                                   on_text=stream if streaming else None, on_prompts=(
                                       (lambda texts: printer.__setitem__(0, StreamPrinter(texts)))
                                       if streaming else None))
    if as_json:
        show_json_lines(r.as_dict() for r in results)
    elif compare:
        show_completions(results, "merged" if merged else "adapted")
    else:
        printer[0].finish()


def eval_generation(result, source, as_json: bool, **options) -> None:
    """lora-eval --generate: the comparison, then the generation scores (JSON: one object)."""
    from .console import show_comparison, show_generation_scores, show_json
    from .run.answers import score_generation

    scores = score_generation(source, **options)
    if as_json:
        show_json({**result.as_dict(), "generation": scores.as_dict()})
    else:
        show_comparison(result)
        show_generation_scores(scores, result.adapted_label)


def plot_runs(output: Path, runs: List[Path]) -> None:
    """lora-eval --plot RUN_DIR ... OUTPUT.png: the runs' curves overlaid."""
    from .console import show_note
    from .run.curves import plot_runs as draw

    show_note(f"wrote {draw(runs, output)}")
