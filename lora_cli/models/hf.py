"""Hugging Face transformer models from a local directory (the ``hf`` extra).

Only local files are read (``local_files_only=True``): nothing is downloaded. The
tokenizer comes from the same directory and is wrapped to the three members the data
loaders use (``encode``, ``eos_id``, ``pad_id``), plus chat rendering and decoding.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..errors import ModelError

TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS"}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelError("model.hf needs the transformers package", where="model.hf",
                         fix='install the extra: pip install -e ".[hf]"') from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def _check_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ModelError("model directory not found", where=str(path),
                         fix="point model.hf at a directory saved with save_pretrained (config.json, weights)")
    if not (path / "config.json").exists():
        raise ModelError("no config.json in this directory", where=str(path),
                         fix="point model.hf at a directory saved with save_pretrained")
    read_model_config(path)
    return path


MAX_MODEL_CONFIG_BYTES = 16 * 1024 * 1024


def read_model_config(directory: str | os.PathLike) -> dict:
    """A model directory's config.json, validated: a UTF-8 JSON object (at most 16 MB)
    whose ``architectures``, if present, is a list of class names. The rest is
    transformers' to check when it builds the model."""
    import json

    path = Path(directory) / "config.json"
    fix = "the model directory is damaged; save the model again with save_pretrained"
    try:
        if not path.is_file():
            raise ModelError("config.json is not a file", where=str(path), fix=fix)
        if path.stat().st_size > MAX_MODEL_CONFIG_BYTES:
            raise ModelError(f"config.json is {path.stat().st_size / 2**20:.0f} MB, more than a model config can be",
                             where=str(path), fix=fix)
        config = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ModelError(f"cannot read config.json: {exc.strerror or exc}", where=str(path)) from None
    except RecursionError:
        raise ModelError("config.json is not valid JSON: nested too deeply", where=str(path), fix=fix) from None
    except ValueError as exc:    # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
        raise ModelError(f"config.json is not valid JSON ({exc})", where=str(path), fix=fix) from None
    if not isinstance(config, dict):
        raise ModelError(f"config.json holds a JSON {type(config).__name__}, not an object", where=str(path), fix=fix)
    arch = config.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise ModelError("config.json: architectures must be a list of class names", where=str(path), fix=fix)
    return config


class HFTokenizer:
    """A transformers tokenizer seen through the data loaders' small interface."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ModelError("the tokenizer has no end-of-sequence token", where="model.hf",
                             fix="set eos_token in the directory's tokenizer_config.json")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str, *, eos: bool = False) -> list[int]:
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def render_chat(self, messages: list[dict]) -> tuple[str, str]:
        """(prompt, answer): the conversation up to the last assistant turn, rendered
        with the tokenizer's chat template (a plain 'role: text' layout without one)."""
        history, answer = messages[:-1], messages[-1]["content"]
        if getattr(self.tok, "chat_template", None):
            prompt = self.tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            return prompt, answer
        return "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant: ", answer


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    transformers = _transformers()
    path = _check_dir(path)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:   # a damaged directory fails in many ways inside transformers
        raise ModelError(f"cannot load the tokenizer: {exc}", where=str(path),
                         fix="the directory needs the tokenizer files saved with the model") from None
    return HFTokenizer(tok)


def load_model(path: str | os.PathLike, *, task: str, label_map: dict[str, int] | None = None,
               pad_id: int | None = None) -> nn.Module:
    """The causal LM, or the sequence classifier with ``len(label_map)`` labels, in float32."""
    transformers = _transformers()
    path = _check_dir(path)
    import torch
    kwargs = {"local_files_only": True, "dtype": torch.float32}
    try:
        if task == "causal_lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        elif task == "classification":
            labels = sorted(label_map, key=label_map.__getitem__)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id=dict(label_map), **kwargs)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = pad_id
        else:
            raise ModelError(f"task {task!r} is not available for Hugging Face models", where="task",
                             fix="use task: causal_lm or classification with model.hf")
    except ModelError:
        raise
    except Exception as exc:   # a damaged directory fails in many ways inside transformers
        raise ModelError(f"cannot load the model: {type(exc).__name__}: {str(exc)[:300]}", where=str(path),
                         fix="check that the directory holds a complete save_pretrained model") from None
    return model


def classification_head(model: nn.Module) -> str | None:
    """The freshly initialised head of a sequence classifier (score, classifier, ...)."""
    names = [n for n, _ in model.named_children()]
    for name in ("score", "classifier", "classification_head", "head"):
        if name in names:
            return name
    return None


def tied_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Targets whose weight is shared with another module (tied input/output embeddings)."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter):
            owners.setdefault(id(w), []).append(path)
    return [t for t in targets if len(owners.get(id(model.get_submodule(t).weight), [])) > 1]
