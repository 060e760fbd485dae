"""Tokenized causal LM data kept on disk by content hash, so a repeated or resumed run
does not tokenize again.

    key  = sha256(format version, the data file's bytes, the tokenizer's identity,
                  text_field, max_seq_len, train_on_prompt)
    file = <cache dir>/<key>.safetensors: ids (int64), mask (uint8), the examples'
           offsets, was_truncated and inexact_join flags (int64, uint8, uint8)

The cache dir is ``$LORA_CLI_CACHE/tokenized``, else ``$XDG_CACHE_HOME/lora-cli/tokenized``
(``~/.cache``). Files are written whole (a temporary file, then renamed) and read with
safetensors (no pickle); a file that cannot be read is ignored and the data tokenized
again. Anything that changes the tokens (the file, the tokenizer's files, the settings)
changes the key, so an entry is never stale; ``LORA_CLI_CACHE=off`` turns it off.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .text import TextData

VERSION = "lora-cli/tokenized/1"


def cache_dir() -> Path | None:
    """Where tokenized files go; None when ``LORA_CLI_CACHE`` is ``off``."""
    root = os.environ.get("LORA_CLI_CACHE")
    if root == "off":
        return None
    if root:
        return Path(root) / "tokenized"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-cli" / "tokenized"


def key(path: str | os.PathLike, tokenizer_id: str, **settings) -> str:
    """The content hash naming the tokenized form of ``path`` (see the module docstring)."""
    h = hashlib.sha256(VERSION.encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(b"\0" + tokenizer_id.encode())
    for name in sorted(settings):
        h.update(f"\0{name}={settings[name]!r}".encode())
    return h.hexdigest()


def _to_tensors(data: TextData) -> dict[str, torch.Tensor]:
    sizes = [len(ids) for ids, _ in data.examples]
    return {
        "ids": torch.tensor([t for ids, _ in data.examples for t in ids], dtype=torch.int64),
        "mask": torch.tensor([m for _, mask in data.examples for m in mask], dtype=torch.uint8),
        "offsets": torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0),
        "was_truncated": torch.tensor(data.was_truncated or [False] * len(sizes), dtype=torch.uint8),
        "inexact_join": torch.tensor(data.inexact_join or [False] * len(sizes), dtype=torch.uint8),
    }


def _from_tensors(t: dict[str, torch.Tensor], source: str) -> TextData:
    ids, mask, offsets = t["ids"].tolist(), t["mask"].tolist(), t["offsets"].tolist()
    examples = [(ids[a:b], mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    cut = [bool(x) for x in t["was_truncated"].tolist()]
    inexact = [bool(x) for x in t["inexact_join"].tolist()]
    return TextData(examples, sum(cut), source, cut, inexact)


def cached(path: str | os.PathLike, tokenizer_id: str, load: Callable[[], TextData], **settings) -> TextData:
    """``load()``'s result for ``path``, from the cache when the same content was
    tokenized the same way before; stored there otherwise."""
    folder = cache_dir()
    try:
        name = key(path, tokenizer_id, **settings) if folder is not None else None
    except OSError:             # missing or unreadable: load() says so, with where and how to fix it
        name = None
    if name is None:
        return load()
    from safetensors.torch import load_file, save_file

    file = folder / f"{name}.safetensors"
    if file.is_file():
        try:
            return _from_tensors(load_file(str(file)), str(path))
        except Exception:       # damaged or foreign: tokenize again and replace it
            pass
    data = load()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file(_to_tensors(data), tmp)
            os.replace(tmp, file)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError:             # a read-only or full disk: the run goes on uncached
        pass
    return data
