"""The package's layout holds: the engine stands alone, nothing imports upward.

    level 0   lora/ (the engine: torch and safetensors only), errors, choices
    level 1   models/, data/
    level 2   run/
    level 3   console, examples, cli, __main__

A module may import its own level and the levels below, never above; the engine imports
nothing of lora-cli outside lora/ but the package's version string; run/ never talks to
the terminal. Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lora_cli"
LEVELS = {"lora": 0, "errors": 0, "choices": 0, "models": 1, "data": 1, "run": 2, "cli_generate": 3, "command": 3,
          "console": 3, "examples": 3, "cli": 3, "__main__": 3, "__init__": 3}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    """Every lora_cli module ``path`` imports (absolute names; ``from X import y`` counts
    as X.y when y is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("lora_cli")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("lora_cli"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append(sub if module_exists(sub) else target)
    return found


def module_exists(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def part_of(name: str) -> str:
    """The top-level part of lora_cli a module belongs to: lora, run, models, cli, ..."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "_configs" not in p.parts and "_data" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_nothing_imports_upward(path: Path):
    here = part_of(module_name(path))
    for target in imports(path):
        there = part_of(target)
        if there == "__init__" and target == "lora_cli":
            continue        # `from .. import __version__`: the version string, which imports nothing
        assert LEVELS[there] <= LEVELS[here], f"{module_name(path)} imports {target} (level {LEVELS[there]} > " \
                                              f"{LEVELS[here]})"


@pytest.mark.parametrize("path", [p for p in MODULES if part_of(module_name(p)) == "lora"],
                         ids=lambda p: module_name(p))
def test_the_engine_imports_nothing_of_lora_cli_outside_it(path: Path):
    for target in imports(path):
        assert target == "lora_cli" or target.startswith("lora_cli.lora"), f"{module_name(path)} imports {target}"


@pytest.mark.parametrize("path", [p for p in MODULES if part_of(module_name(p)) == "run"],
                         ids=lambda p: module_name(p))
def test_the_run_never_talks_to_the_terminal(path: Path):
    bad = [t for t in imports(path) if part_of(t) in ("cli", "console")]
    assert not bad, f"{module_name(path)} imports {bad}"
    assert "import rich" not in path.read_text() and "from rich" not in path.read_text()


def test_the_engine_runs_with_torch_and_safetensors_alone():
    """Importing every engine module pulls in no other lora_cli part, nor yaml, typer or rich."""
    engine = [module_name(p) for p in MODULES if part_of(module_name(p)) == "lora"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in engine) +
            "bad = sorted(m for m in sys.modules if (m.startswith('lora_cli.') and not m.startswith('lora_cli.lora'))"
            " or m.split('.')[0] in ('yaml', 'typer', 'rich', 'transformers'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


def test_no_module_is_much_over_400_lines():
    long = {module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > 460}
    assert not long, long
