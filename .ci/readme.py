"""The README's command lines, as CI runs them, and the check of the quickstart's run.

    python3 .ci/readme.py show NAME          print the lines between <!-- ci:NAME:start -->
                                             and <!-- ci:NAME:end --> in README.md
    python3 .ci/readme.py run NAME           run them, one after the other, with bash
    python3 .ci/readme.py check RUN_DIR      the run's adapter exists and its eval loss fell

README.md is the one place the Quickstart and test commands are written: CI reads them
from it, so changing the README changes CI. ``run tests`` fails when pytest collected no
test (its exit code 5) or when a command that exited 0 reported no passed test. Standard
library only: it runs in a virtual environment that holds nothing yet. ``--readme FILE``
reads another file (the tests of this script use it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
PASSED = re.compile(r"\b\d+ passed\b")
NO_TESTS = 5     # pytest's exit code when it collected nothing


def commands(name: str, readme: Path = README) -> list[str]:
    """The command lines of block ``name``: code indentation removed, ``\\`` continuations joined."""
    text = readme.read_text(encoding="utf-8")
    start, end = f"<!-- ci:{name}:start -->", f"<!-- ci:{name}:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"error: {readme}: expected one {start} ... {end} block")
    lines, pending = [], ""
    for line in text[text.index(start) + len(start):text.index(end)].splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
        else:
            lines.append(pending)
            pending = ""
    if pending or not lines:
        raise SystemExit(f"error: {readme}: the {name} block holds no complete command line")
    return lines


def run(name: str, readme: Path = README) -> int:
    """Run the block's lines in order; the exit code CI should take."""
    for line in commands(name, readme):
        print(f"+ {line}", flush=True)
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", line], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        passed = False
        for out in proc.stdout:
            sys.stdout.write(out)
            passed = passed or bool(PASSED.search(out))
        sys.stdout.flush()
        code = proc.wait()
        if name == "tests" and code == NO_TESTS:
            print(f"error: the README's test command collected no tests (pytest exit code 5): {line}",
                  file=sys.stderr)
            return 1
        if code != 0:
            print(f"error: exit code {code} from the README's {name} command: {line}", file=sys.stderr)
            return code
        if name == "tests" and not passed:
            print(f"error: the README's test command ran no test: {line}", file=sys.stderr)
            return 1
    return 0


def check(run_dir: Path) -> int:
    """The run wrote its adapter, and the held-out loss of its last evaluation is below the base's."""
    adapter = run_dir / "adapter"
    missing = [f for f in ("adapter_model.safetensors", "adapter_config.json") if not (adapter / f).is_file()]
    if missing:
        print(f"error: {adapter}: no {', '.join(missing)}", file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if len(losses) < 2 or losses[0][0] != 0:
        print(f"error: {run_dir}/metrics.jsonl: expected the base's eval loss (step 0) and later ones",
              file=sys.stderr)
        return 1
    (_, base), (step, final) = losses[0], losses[-1]
    print(f"{run_dir}: adapter written; eval loss {base:.4g} (base) -> {final:.4g} at step {step}")
    if not final < base:
        print("error: the eval loss did not fall", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    readme = README
    if argv[:1] == ["--readme"]:
        readme, argv = Path(argv[1]), argv[2:]
    if len(argv) == 2 and argv[0] == "show":
        print("\n".join(commands(argv[1], readme)))
        return 0
    if len(argv) == 2 and argv[0] == "run":
        return run(argv[1], readme)
    if len(argv) == 2 and argv[0] == "check":
        return check(Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
