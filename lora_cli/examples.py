"""The example configs that ship with lora-cli, and copies of them to edit.

    list_examples()                     every shipped config: name, one-line summary, files
    init_example("quickstart", "my")    writes my/quickstart.yaml and the files it reads
                                        (my/data/quickstart/...), paths rewritten to match

There is one copy of each example, at the top of the source tree (``configs/``, and
``data/`` for the files they read); a built wheel carries them inside the package as
``lora_cli/_configs`` and ``lora_cli/_data`` (pyproject.toml maps the folders). Paths
in a config are read from the current directory, so a copy written to DIR names its
files as DIR/data/..., and its output_dir as DIR/runs/...: ``lora-train DIR/NAME.yaml``
runs it from where ``--init`` ran. Only the path values change in the copy; its comments
stay. Existing files are never replaced unless asked.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError, closest
from .lora.files import remove, write_atomic

# Config keys that name files, and the top-level output folder.
FILE_KEYS = (("model", "base"), ("model", "hf"), ("data", "train"), ("data", "eval"))
DATA_PREFIX = "data/"     # how the shipped configs name the files that ship with them


def _roots() -> tuple[Path, Path]:
    """(configs folder, data folder): inside the installed package, or, in a source
    checkout (an editable install), at the top of the tree."""
    here = Path(__file__).resolve().parent
    if (here / "_configs").is_dir():
        return here / "_configs", here / "_data"
    top = here.parent
    if (top / "pyproject.toml").is_file() and (top / "configs").is_dir():
        return top / "configs", top / "data"
    raise UserError("the example configs are not installed with this copy of lora-cli", where=str(here),
                    fix="reinstall lora-cli (pip install lora-cli, or pip install -e . in its source tree)")


@dataclass
class Example:
    """One shipped config."""

    name: str
    path: Path                      # the config file
    summary: str                    # its first sentence
    ships: dict[str, str]           # config key -> path of a file that ships with it
    needs: dict[str, str]           # config key -> path of a file the user supplies

    def source(self, relpath: str) -> Path:
        """Where a shipped file named ``relpath`` in the config lies in this install."""
        return _roots()[1] / relpath[len(DATA_PREFIX):]


def list_examples() -> list[Example]:
    """Every example config, by name."""
    configs, data = _roots()
    return [_example(p, data) for p in sorted(configs.glob("*.yaml"))]


def _example(path: Path, data_root: Path) -> Example:
    text = path.read_text(encoding="utf-8")
    values = yaml.safe_load(text) or {}
    ships, needs = {}, {}
    for section, key in FILE_KEYS:
        value = (values.get(section) or {}).get(key)
        if isinstance(value, str):
            shipped = value.startswith(DATA_PREFIX) and (data_root / value[len(DATA_PREFIX):]).exists()
            (ships if shipped else needs)[f"{section}.{key}"] = value
    return Example(name=path.stem, path=path, summary=_summary(text), ships=ships, needs=needs)


def _summary(text: str) -> str:
    """The first sentence of the comment block that opens a config."""
    words: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("#").strip())
        joined = " ".join(words)
        if re.search(r"\.(\s|$)", joined):
            return re.split(r"(?<=\.)\s", joined, maxsplit=1)[0]
    return " ".join(words)


def find_example(name: str) -> Example:
    examples = {e.name: e for e in list_examples()}
    if name in examples:
        return examples[name]
    guess = closest(name, examples) or closest(name.removesuffix(".yaml"), examples)
    raise UserError(f"no example config named {name!r}" + (f" (did you mean {guess!r}?)" if guess else ""),
                    where="--init", fix=f"use one of: {', '.join(examples)} (lora-train --list-configs "
                    "says what each is)")


@dataclass
class InitResult:
    """What ``init_example`` wrote."""

    example: Example
    config: Path                                            # the copy of the config
    written: list[Path] = field(default_factory=list)       # new files
    replaced: list[Path] = field(default_factory=list)      # files that were there and differed
    unchanged: list[Path] = field(default_factory=list)     # files that were there, identical
    bytes: int = 0                                          # size of the files it reads

    @property
    def needs(self) -> dict[str, str]:
        """Config keys naming files the user must supply (edit them in the copy)."""
        return self.example.needs


def init_example(name: str, dest: str | os.PathLike = ".", *, overwrite: bool = False) -> InitResult:
    """Copy example ``name`` into ``dest``: ``dest/<name>.yaml`` and, under ``dest/data/``,
    the files it reads. The copy's file paths and output_dir point into ``dest`` as seen
    from the current directory. Files already there and different are an error unless
    ``overwrite``; identical ones are left alone. Returns what was written."""
    example = find_example(name)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError("not a folder", where=str(dest), fix="give a folder to copy the example into")
    text = example.path.read_text(encoding="utf-8")
    moved = {key: _inside(dest, value) for key, value in example.ships.items()}
    output_dir = (yaml.safe_load(text) or {}).get("output_dir")
    if isinstance(output_dir, str):
        moved["output_dir"] = _inside(dest, output_dir)
    copy = _set_values(text, moved).replace(f"configs/{example.name}.yaml", _inside(dest, f"{example.name}.yaml"))
    plan = [(dest / value, example.source(value).read_bytes) for value in example.ships.values()]
    plan.append((dest / f"{example.name}.yaml", lambda: copy.encode()))

    result = InitResult(example=example, config=plan[-1][0])
    clashes = []
    for target, content in plan:
        if target.is_dir():
            raise UserError("a folder is in the way of a file the example needs", where=str(target),
                            fix="move it, or copy the example into another folder")
        if target.exists():
            same = target.read_bytes() == content()
            (result.unchanged if same else clashes).append(target)
    if clashes and not overwrite:
        shown = ", ".join(str(c) for c in clashes)
        raise UserError(f"{len(clashes)} file{'s' if len(clashes) > 1 else ''} already there and different: "
                        f"{shown}", where=str(dest), fix=f"pass --overwrite to replace "
                        f"{'them' if len(clashes) > 1 else 'it'}, or copy into another folder: "
                        f"lora-train --init {example.name} OTHER_FOLDER")
    made: list[Path] = []    # files and folders this call created, removed again if it fails
    try:
        for target, content in plan:
            if target in result.unchanged:
                continue
            for folder in reversed(target.parents):
                if not folder.exists():
                    folder.mkdir()
                    made.append(folder)
            new = not target.exists()
            data = content()
            write_atomic(target, lambda f: f.write(data))
            (result.written if new else result.replaced).append(target)
            if new:
                made.append(target)
    except OSError as exc:
        for path in reversed(made):
            remove(path)
        raise UserError(f"cannot write the example: {exc.strerror or exc}", where=str(exc.filename or dest),
                        fix="choose a folder you can write to, with room for the files") from None
    result.bytes = sum(example.source(v).stat().st_size for v in example.ships.values())
    return result


def _inside(dest: Path, relpath: str) -> str:
    """``relpath`` moved under ``dest``, written the way a config names a path."""
    return Path(os.path.normpath(dest / relpath)).as_posix()


def _set_values(text: str, values: dict[str, str]) -> str:
    """``text`` (YAML) with the scalar at each dotted key replaced, comments and layout kept."""
    root = yaml.compose(text)
    spans = []
    for dotted, value in values.items():
        node = root
        for part in dotted.split("."):
            node = next(v for k, v in node.value if k.value == part)
        spans.append((node.start_mark.index, node.end_mark.index, _scalar(value)))
    for start, end, scalar in sorted(spans, reverse=True):
        text = text[:start] + scalar + text[end:]
    check = yaml.safe_load(text)
    for dotted, value in values.items():   # internal invariant: the copy says what was meant
        node = check
        for part in dotted.split("."):
            node = node[part]
        assert node == value, (dotted, node, value)
    return text


def _scalar(value: str) -> str:
    """A YAML scalar for a path: plain when safe, else double-quoted."""
    if re.fullmatch(r"[A-Za-z0-9_./][A-Za-z0-9_./\-]*", value) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)      # a JSON string is a YAML double-quoted scalar
