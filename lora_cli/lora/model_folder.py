"""A Hugging Face model folder on disk, as files: its config.json and its shards.

Everything is read from inside the folder the user named: a shard index entry that leaves
it (``../x``, an absolute path) or a symlink pointing out of it is refused, and
config.json must be a UTF-8 JSON object (its model is transformers' to check).
"""

from __future__ import annotations

import os
from pathlib import Path

from .checks import parse_json, show
from .errors import ModelError
from .files import inside

INDEX_NAME = "model.safetensors.index.json"


def index_files(directory: str | os.PathLike, name: str = INDEX_NAME) -> list[Path]:
    """The files a shard index in ``directory`` names (its ``weight_map`` values), checked:
    each must be a plain file name in the directory, not a path that leaves it (``../x``,
    an absolute path, a symlink pointing out), and must exist."""
    directory = Path(directory)
    index = directory / name
    names = set(read_index(index)["weight_map"].values())       # types checked there
    for f in sorted(names):
        if not isinstance(f, str) or not f or Path(f).name != f or f in (".", ".."):
            raise ModelError(f"the index names the shard {f!r}, which is not a file name in this folder",
                             where=str(index), fix="shard entries are plain file names beside the index")
        if (directory / f).is_symlink() and not inside(directory, directory / f):
            raise ModelError(f"the shard {f!r} is a symlink to {os.path.realpath(directory / f)}, outside the "
                             "model folder", where=str(index), fix=RESOLVE_LINKS)
        if not (directory / f).is_file():
            raise ModelError(f"shard {f} named by the index is missing", where=str(index))
    return [directory / f for f in sorted(names)]


RESOLVE_LINKS = ("lora-cli reads nothing from outside the folder you name; if the links are yours (a Hugging Face "
                  "cache snapshot, say), copy the folder with its links resolved (cp -rL) and use the copy")


def shard_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory: the shards its index names, or the
    single ``model.safetensors``; none of them may lie outside the directory."""
    directory = Path(directory)
    if (directory / INDEX_NAME).exists():
        return index_files(directory)
    files = sorted(directory.glob("*.safetensors"))
    if len(files) == 1:
        if not inside(directory, files[0]):
            raise ModelError(f"{files[0].name} is a symlink to {os.path.realpath(files[0])}, outside the model "
                             "folder", where=str(directory), fix=RESOLVE_LINKS)
        return files
    raise ModelError("no model.safetensors (or shard index) in this directory" if not files else
                     f"{len(files)} safetensors files but no {INDEX_NAME}", where=str(directory),
                     fix="point to a .safetensors/.pt file, or a model directory saved with save_pretrained")


def read_index(path: str | os.PathLike) -> dict:
    """A model directory's shard index (model.safetensors.index.json), validated: a JSON
    object whose ``weight_map`` is a non-empty object mapping tensor names to shard file
    names, and whose ``metadata``, if present, is an object."""
    path = Path(path)
    fix = "the index is corrupt; save the model again with save_pretrained"
    try:
        data = parse_json(path.read_bytes(), "the file")
    except OSError as exc:
        raise ModelError(f"cannot read the shard index: {exc.strerror or exc}", where=str(path), fix=fix) from None
    except ValueError as exc:
        raise ModelError(f"invalid shard index: {exc}", where=str(path), fix=fix) from None
    if not isinstance(data, dict):
        raise ModelError(f"invalid shard index: a JSON {type(data).__name__}, not an object", where=str(path), fix=fix)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"invalid shard index: weight_map must be a non-empty object, got {show(weight_map)}",
                         where=str(path), fix=fix)
    bad = [f for f in weight_map.values() if not isinstance(f, str) or not f]
    if bad:
        raise ModelError(f"invalid shard index: weight_map values must be shard file names, got {show(bad[0])}",
                         where=str(path), fix=fix)
    if not isinstance(data.get("metadata", {}), dict):
        raise ModelError("invalid shard index: metadata must be an object", where=str(path), fix=fix)
    return data


INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


MAX_MODEL_CONFIG_BYTES = 16 * 1024 * 1024


def read_model_config(directory: str | os.PathLike) -> dict:
    """A model directory's config.json, validated: a UTF-8 JSON object (at most 16 MB)
    whose ``architectures``, if present, is a list of class names. The rest is
    transformers' to check when it builds the model."""

    path = Path(directory) / "config.json"
    fix = "the model directory is damaged; save the model again with save_pretrained"
    try:
        if not path.is_file():
            raise ModelError("config.json is not a file", where=str(path), fix=fix)
        if path.stat().st_size > MAX_MODEL_CONFIG_BYTES:
            raise ModelError(f"config.json is {path.stat().st_size / 2**20:.0f} MB, more than a model config can be",
                             where=str(path), fix=fix)
        config = parse_json(path.read_bytes(), "config.json")
    except OSError as exc:
        raise ModelError(f"cannot read config.json: {exc.strerror or exc}", where=str(path)) from None
    except ValueError as exc:
        raise ModelError(str(exc), where=str(path), fix=fix) from None
    if not isinstance(config, dict):
        raise ModelError(f"config.json holds a JSON {type(config).__name__}, not an object", where=str(path), fix=fix)
    arch = config.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise ModelError("config.json: architectures must be a list of class names", where=str(path), fix=fix)
    return config
