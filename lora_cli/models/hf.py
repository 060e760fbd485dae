"""Hugging Face transformer models from a local directory (the ``hf`` extra).

Only local files are read (``local_files_only=True``): nothing is downloaded. No code
from the directory is ever run: every load passes ``trust_remote_code=False`` (which
also keeps transformers from asking about it on the terminal), and a ``config.json``
whose model_type transformers does not know, which only the folder's own code could
build, is refused up front. A shard index naming files outside the directory is refused
before transformers reads it. The tokenizer comes from the same directory and is wrapped
to the three members the data loaders use (``encode``, ``eos_id``, ``pad_id``), plus
chat rendering and decoding.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path

from torch import nn

from ..errors import ModelError
from ..lora.model_folder import INDEX_NAMES, index_files, read_model_config
from ..lora.weight_files import check_finite

TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS"}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelError("model.hf needs the transformers package", where="model.hf",
                         fix='install the extra: pip install -e ".[hf]"') from None
    return transformers


@contextlib.contextmanager
def _quiet(transformers):
    """transformers' warnings and progress bars off while it loads (lora-cli says what
    matters itself), and as they were afterwards: a library leaves logging alone."""
    verbosity = transformers.logging.get_verbosity()
    bars = getattr(transformers.utils.logging, "is_progress_bar_enabled", lambda: True)()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


NO_REMOTE_CODE = {"local_files_only": True, "trust_remote_code": False}


def _check_dir(path: str | os.PathLike, transformers=None) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ModelError("model directory not found", where=str(path),
                         fix="point model.hf at a directory saved with save_pretrained (config.json, weights)")
    if not (path / "config.json").exists():
        raise ModelError("no config.json in this directory", where=str(path),
                         fix="point model.hf at a directory saved with save_pretrained")
    config = read_model_config(path)
    for name in INDEX_NAMES:
        if (path / name).exists():
            index_files(path, name)
    if transformers is not None:
        _check_no_custom_code(config, path, transformers)
    return path


def _check_no_custom_code(config: dict, path: Path, transformers) -> None:
    """Refuse a folder whose model only its own Python code could build (lora-cli never runs it)."""
    model_type = config.get("model_type")
    known = transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES
    if isinstance(model_type, str) and model_type in known:
        return   # built by transformers' own class; an auto_map in the folder is ignored, never run
    auto_map = config.get("auto_map")
    custom = f" its own Python code ({', '.join(map(str, auto_map.values()))})" if isinstance(auto_map, dict) \
        and auto_map else ""
    raise ModelError(f"config.json has model_type {model_type!r}, which transformers {transformers.__version__} "
                     f"does not know{': only' + custom + ' could build it' if custom else ''}; lora-cli never "
                     "runs code from a model folder", where=str(path / "config.json"),
                     fix="use a model whose architecture transformers has built in (or a transformers version "
                         "that has this one)")


def _custom_code_error(exc: Exception, path: Path) -> ModelError | None:
    """transformers' refusal of a folder's own code, said plainly (its fix, trust_remote_code=True, is not ours)."""
    if "custom code" not in str(exc) and "trust_remote_code" not in str(exc):
        return None
    return ModelError("this model folder needs its own Python code to load, and lora-cli never runs code from a "
                      "model folder", where=str(path),
                      fix="use a model whose architecture transformers has built in")


class HFTokenizer:
    """A transformers tokenizer seen through the data loaders' small interface.

    ``bos_ids`` are the special tokens the tokenizer puts before a text by default (the
    BOS of Llama, Mistral, Gemma; none for GPT-2 or SmolLM2): every example starts with
    them, in training, evaluation and generation alike, as the model saw in pretraining.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ModelError("the tokenizer has no end-of-sequence token", where="model.hf",
                             fix="set eos_token in the directory's tokenizer_config.json")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tokenizer)
        self.bos_ids = self._default_prefix()

    def _default_prefix(self) -> list[int]:
        """The ids the tokenizer adds in front of a text when asked for special tokens."""
        plain = self.encode("a")
        full = list(self.tok("a")["input_ids"])
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start]
        return []

    def encode(self, text: str, *, eos: bool = False) -> list[int]:
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return ids + [self.eos_id] if eos else ids

    def encode_pair(self, prompt: str, completion: str) -> tuple[list[int], list[int], bool]:
        """(prompt ids, completion ids, exact): the prompt tokenized alone, as the model
        will see it when asked to complete it, and the completion as the tokens that
        follow it in ``prompt + completion``.

        Tokenizers that merge across spaces (SentencePiece, Llama 2, Mistral) may join the
        prompt's last token with the completion's first, and add a dummy space to a
        completion tokenized on its own. So the completion is the first of these that
        spells exactly ``prompt + completion`` after the prompt's tokens: the rest of the
        joint tokenization (when it starts with the prompt's tokens); the completion
        tokenized after an anchor that does not merge with it (a newline, or a character
        no vocabulary has, which becomes byte tokens), the anchor's tokens dropped; the
        completion alone, with or without a leading lone space token. ``exact`` is False
        when none does; the completion is then tokenized on its own.
        """
        p, joint = self.encode(prompt), self.encode(prompt + completion)
        if joint[:len(p)] == p:
            return p, joint[len(p):], True
        text = self.decode(joint)
        alone = self.encode(completion)
        candidates = []
        for anchor in ("\n", "\u2063"):
            a, anchored = self.encode(anchor), self.encode(anchor + completion)
            if anchored[:len(a)] == a:
                candidates.append(anchored[len(a):])
        candidates += [alone, alone[1:]]
        for c in candidates:
            if c and self.decode(p + c) == text:
                return p, c, True
        return p, alone, False

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
    path = _check_dir(path, transformers)
    try:
        with _quiet(transformers):
            tok = transformers.AutoTokenizer.from_pretrained(str(path), **NO_REMOTE_CODE)
    except Exception as exc:   # a damaged directory fails in many ways inside transformers
        raise _custom_code_error(exc, path) or ModelError(
            f"cannot load the tokenizer: {exc}", where=str(path),
            fix="the directory needs the tokenizer files saved with the model") from None
    return HFTokenizer(tok)


def _from_pretrained(transformers, path: Path, task: str, label_map: dict[str, int] | None, pad_id: int | None,
                     kwargs: dict) -> nn.Module:
    """The model class the task needs, loaded from ``path``."""
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
    return model


def load_model(path: str | os.PathLike, *, task: str, label_map: dict[str, int] | None = None,
               pad_id: int | None = None) -> nn.Module:
    """The causal LM, or the sequence classifier with ``len(label_map)`` labels, in float32."""
    transformers = _transformers()
    path = _check_dir(path, transformers)
    import torch
    major, minor = (int(v) for v in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"     # renamed in 4.56
    kwargs = {**NO_REMOTE_CODE, dtype_key: torch.float32}
    try:
        with _quiet(transformers):
            model = _from_pretrained(transformers, path, task, label_map, pad_id, kwargs)
    except ModelError:
        raise
    except pickle.UnpicklingError:
        raise ModelError("a weights file in this folder is a pickle that would run code when loaded; lora-cli "
                         "never unpickles arbitrary objects", where=str(path),
                         fix="ONLY if you trust the folder, load it with transformers and save it again with "
                             "save_pretrained() (safetensors)") from None
    except Exception as exc:   # a damaged directory fails in many ways inside transformers
        raise _custom_code_error(exc, path) or ModelError(
            f"cannot load the model: {type(exc).__name__}: {str(exc)[:300]}", where=str(path),
            fix="check that the directory holds a complete save_pretrained model") from None
    check_finite(model.state_dict().items(), where=str(path))
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
