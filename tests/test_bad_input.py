"""Malformed and hostile input: every file lora-cli reads is checked when it is read.

The property tests take real files written by lora-train (an adapter, its checkpoints,
the safetensors base it was trained on), mutate them as a careless user or an attacker
would (values of the wrong type, missing and extra keys, huge and negative numbers,
header shapes, offsets, dtypes and lengths, cut or flipped bytes) and run lora-eval,
lora-merge and lora-train --resume on each, in-process. Whatever the mutation:

  * the exit code is 0, or 2 with one message (one ``error:`` line, no traceback);
  * nothing is written outside the output (eval writes nothing; merge only its -o
    file, loadable by safetensors when it exits 0; a resume only inside output_dir,
    and on exit 2 its checkpoints are as they were);
  * each example ends within the hypothesis deadline (a hang fails).

Then one test per malformed input that issue 14 lists (point 9). The fast suite runs
about ten examples per property and one case of each kind; the ``slow`` variants run
hundreds of examples (``LORA_FUZZ_EXAMPLES`` sets how many) and every case.
"""

from __future__ import annotations

import builtins
import copy
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_cli.cli import app
from lora_cli.models import build_model

runner = CliRunner()

LONG = int(os.environ.get("LORA_FUZZ_EXAMPLES", "300"))
_COMMON = dict(database=None, deadline=timedelta(seconds=20), derandomize=False,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                      HealthCheck.data_too_large])
FAST = settings(max_examples=10, **_COMMON)
SLOW = settings(max_examples=LONG, **_COMMON)

# --------------------------------------------------------------------------- the project

FEATURES = 3


def _csv(n: int, seed: int, labels: list[str] | None = None) -> str:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    rows = ["a,b,c,y"]
    for i, r in enumerate(x.tolist()):
        rows.append(",".join(f"{v:.4f}" for v in r) + "," + (labels[i % len(labels)] if labels else f"{sum(r):.4f}"))
    return "\n".join(rows) + "\n"


def _save_base(path: Path) -> None:
    torch.manual_seed(1)
    model = build_model(arch="mlp", args={"in_features": FEATURES, "out_features": 1, "hidden": 8})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


CONFIG = {
    "seed": 0, "device": "cpu", "task": "regression", "output_dir": "run",
    "model": {"arch": "mlp", "args": {"hidden": 8}, "base": "base.safetensors"},
    "data": {"train": "train.csv", "eval": "eval.csv"},
    "lora": {"rank": 2, "alpha": 4, "target_modules": "all-linear"},
    "train": {"max_steps": 2, "batch_size": 8, "log_every": 1, "lr": 0.01, "save_every": 1, "keep_last": None},
}


def _invoke(args, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def _describe(result) -> str:
    text = result.output
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        text += "\n" + "".join(traceback.format_exception(*result.exc_info))
    return text


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny regression run (mlp, safetensors base, 2 steps, a checkpoint per step) and a
    classification run (label map, no base file) trained once; tests work on copies."""
    root = tmp_path_factory.mktemp("bad-input") / "p"
    root.mkdir()
    (root / "train.csv").write_text(_csv(24, seed=0))
    (root / "eval.csv").write_text(_csv(8, seed=1))
    (root / "cls.csv").write_text(_csv(24, seed=2, labels=["cat", "dog", "eel"]))
    _save_base(root / "base.safetensors")
    (root / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    cls = copy.deepcopy(CONFIG)
    cls.update(task="classification", output_dir="cls_run")
    cls["model"]["base"] = None
    cls["data"] = {"train": "cls.csv", "val_split": 0.25}
    cls["train"] = {"max_steps": 1, "batch_size": 8}
    (root / "cls.yaml").write_text(yaml.safe_dump(cls))
    for config in ("config.yaml", "cls.yaml"):
        result = _invoke(["train", config], root)
        assert result.exit_code == 0, _describe(result)
    assert (root / "run" / "checkpoints" / "step_2" / "trainer_state.pt").is_file()
    before = snapshot(root)
    yield root
    assert snapshot(root) == before, "a test wrote into the shared project"


@pytest.fixture
def proj(project: Path, tmp_path: Path) -> Path:
    """A private copy of the project, for tests that change it."""
    return Path(shutil.copytree(project, tmp_path / "p"))


def snapshot(root: Path) -> dict:
    """Every path under root with its kind and (for files) content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        mode = p.lstat().st_mode
        out[rel] = ("dir",) if stat.S_ISDIR(mode) else ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def changes(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def assert_outcome(result, allowed: int | tuple = (0, 2)) -> None:
    """Exit 0, or exit 2 with one message (an ``error:`` line and no traceback)."""
    detail = _describe(result)
    allowed = (allowed,) if isinstance(allowed, int) else allowed
    assert result.exit_code in allowed, detail
    assert result.exception is None or isinstance(result.exception, SystemExit), detail
    assert "Traceback" not in result.output, detail
    if result.exit_code == 2:
        assert result.output.count("error:") == 1 and "error:" in result.stderr, detail
    if currently_in_test_context():
        event(f"exit {result.exit_code}")


# --------------------------------------------------------------------------- mutations

WEIRD = st.sampled_from([None, True, False, 0, -1, 1, 2, 3, -(2**63), 2**64, 10**30, 0.5, -0.0, 1e300,
                         float("nan"), float("inf"), -float("inf"), "", "x", "none", "LORA", "linear",
                         "F32", "x" * 300, "../../etc", [], [0], [-1, 2], [2.5], [True], ["a", "b"],
                         {}, {"a": 1}, {"": None}])
JUNK = st.one_of(WEIRD, st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6),
                 st.lists(st.integers(-3, 12), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(-2, 2), max_size=2))
# Replacements written as raw JSON text: things json.dumps cannot produce, or should not have to
RAW = st.sampled_from(["9" * 5000, "[" * 20000 + "]" * 20000, "NaN", "-Infinity", "1e999", "{", "\"\\ud800\"",
                       '"' + "x" * 3_000_000 + '"'])


def fresh(value):
    """A drawn value to put in a tree: a copy, so that later edits do not change the
    strategy's own constants (hypothesis replays draws and needs them unchanged)."""
    return copy.deepcopy(value)


def paths_of(tree, prefix=()) -> list[tuple]:
    """Every path (tuple of keys and indices) to a value inside nested dicts and lists."""
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += paths_of(v, prefix + (k,))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out += paths_of(v, prefix + (i,))
    return out


def _parent(tree, path):
    node = tree
    for key in path[:-1]:
        node = node[key]
    return node


@st.composite
def json_mutation(draw, tree):
    """``tree`` (a deep copy) with 1 to 3 edits: a value replaced, a key deleted or added;
    returns (tree, raw) where raw maps placeholder strings to raw JSON text."""
    tree = copy.deepcopy(tree)
    raw = {}
    for n in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths_of(tree)))
        op = draw(st.sampled_from(["set", "set", "set", "raw", "delete", "add"]))
        if not path:
            if op in ("set", "raw"):
                tree = fresh(draw(JUNK))
            continue
        parent = _parent(tree, path)
        if op == "set":
            parent[path[-1]] = fresh(draw(JUNK))
        elif op == "raw":
            marker = f"@@raw{n}@@"
            parent[path[-1]] = marker
            raw[f'"{marker}"'] = draw(RAW)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["zzz", "__metadata__", "lora_cli", "r", "step", ""]))] = fresh(draw(JUNK))
        else:
            parent.append(fresh(draw(JUNK)))
        if not isinstance(tree, (dict, list)):
            break
    return tree, raw


def dump_json(tree, raw: dict) -> bytes:
    text = json.dumps(tree, allow_nan=True)
    for marker, value in raw.items():
        text = text.replace(marker, value)
    return text.encode("utf-8", "surrogatepass")


BYTE_DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("replace"), st.binary(max_size=64)),
)


def damage(data: bytes, how) -> bytes:
    kind = how[0]
    if kind == "truncate":
        return data[: int(len(data) * how[1])]
    if kind == "flip":
        if not data:
            return data
        i = how[1] % len(data)
        return data[:i] + bytes([data[i] ^ how[2]]) + data[i + 1:]
    if kind == "append":
        return data + how[1]
    return how[1]


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


@st.composite
def safetensors_mutation(draw, data: bytes) -> bytes:
    """A safetensors file with its header edited (dtype, shape, offsets, metadata, entries,
    the length field) or its bytes damaged."""
    header, body = split_safetensors(data)
    kind = draw(st.sampled_from(["header", "header", "header", "length", "body", "bytes"]))
    if kind == "bytes":
        return damage(data, draw(BYTE_DAMAGE))
    if kind == "body":
        body = damage(body, draw(BYTE_DAMAGE))
    raw_header = json.dumps(header).encode()
    if kind == "header":
        tree, raw = draw(json_mutation(header))
        raw_header = dump_json(tree, raw)
    raw_header += b" " * draw(st.sampled_from([0, 0, 3, 8]))
    length = len(raw_header)
    if kind == "length":
        near = st.integers(-8, 8).map(lambda d: max(0, len(raw_header) + d))
        length = draw(st.one_of(st.integers(0, 2**64 - 1), near))
    return struct.pack("<Q", length) + raw_header + body


TENSORS = st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype),
                    st.lists(st.integers(0, 5), max_size=3),
                    st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool]))


@st.composite
def pt_mutation(draw, tree):
    """A trainer_state.pt object with 1 to 3 edits (values may become tensors of any shape)."""
    tree = copy.deepcopy(tree)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths_of(tree)))
        op = draw(st.sampled_from(["set", "tensor", "delete", "add"]))
        if not path:
            tree = fresh(draw(st.one_of(JUNK, TENSORS)))
            break
        parent = _parent(tree, path)
        if isinstance(parent, tuple):
            continue
        if op in ("set", "tensor"):
            parent[path[-1]] = fresh(draw(TENSORS if op == "tensor" else JUNK))
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["zzz", "step", 7, "optimizer"]))] = fresh(draw(st.one_of(JUNK, TENSORS)))
        else:
            parent.append(fresh(draw(JUNK)))
    return tree


# --------------------------------------------------------------------------- running one example

def run_in_copy(project: Path, prepare, args: list[str]) -> None:
    """Copy the project, let ``prepare(copy)`` damage it, run the command there and check
    the outcome and what it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(project, Path(tmp) / "p"))
        prepare(root)
        before = snapshot(root)
        result = _invoke(args, root)
        assert_outcome(result)
        changed = changes(before, snapshot(root))
        command = args[0]
        if command == "eval":
            assert not changed, changed
        elif command == "merge":
            out = args[args.index("-o") + 1]
            assert all(c == out for c in changed), changed
            if result.exit_code == 0:
                load_file(root / out)     # the merged output is a file safetensors can load
            else:
                assert not changed, changed
        else:   # train --resume: only inside run/, and a refused resume changes nothing there
            assert all(c.startswith("run/") for c in changed), changed
            assert not any(".tmp" in Path(c).name for c in snapshot(root) if c.startswith("run/")), changed
            if result.exit_code == 2:
                assert not any(c.startswith("run/checkpoints/") for c in changed), changed
            else:
                assert (root / "run" / "adapter" / "adapter_model.safetensors").is_file()


ADAPTER = "run/adapter"
ADAPTER_COMMANDS = {
    "eval": ["eval", ADAPTER],
    "merge": ["merge", "base.safetensors", ADAPTER, "-o", "out.safetensors"],
    "verify": ["merge", "base.safetensors", ADAPTER, "-o", "out.safetensors", "--verify"],
    "eval-cls": ["eval", "cls_run/adapter"],
}


@st.composite
def adapter_case(draw, project: Path):
    """(what to damage, how, command): the adapter's config JSON, the copy of it in the
    safetensors header (the JSON then removed), or the safetensors file itself."""
    command = draw(st.sampled_from(sorted(ADAPTER_COMMANDS)))
    adapter = ADAPTER if command != "eval-cls" else "cls_run/adapter"
    target = draw(st.sampled_from(["config", "config", "header-config", "safetensors"]))
    weights = project / adapter / "adapter_model.safetensors"
    if target == "config":
        config = json.loads((project / adapter / "adapter_config.json").read_text())
        if draw(st.integers(0, 9)) == 0:
            text = damage(json.dumps(config).encode(), draw(BYTE_DAMAGE))
        else:
            text = dump_json(*draw(json_mutation(config)))

        def prepare(root: Path) -> None:
            (root / adapter / "adapter_config.json").write_bytes(text)
    elif target == "header-config":
        header, body = split_safetensors(weights.read_bytes())
        tree, raw = draw(json_mutation(json.loads(header["__metadata__"]["adapter_config"])))
        header["__metadata__"]["adapter_config"] = dump_json(tree, raw).decode("utf-8", "surrogatepass")
        raw_header = json.dumps(header).encode("utf-8", "surrogatepass")
        data = struct.pack("<Q", len(raw_header)) + raw_header + body

        def prepare(root: Path) -> None:
            (root / adapter / "adapter_config.json").unlink()
            (root / adapter / "adapter_model.safetensors").write_bytes(data)
    else:
        data = draw(safetensors_mutation(weights.read_bytes()))

        def prepare(root: Path) -> None:
            (root / adapter / "adapter_model.safetensors").write_bytes(data)
    event(f"adapter {target} / {command}")
    return prepare, ADAPTER_COMMANDS[command]


def _adapter_example(project: Path, data) -> None:
    prepare, args = data.draw(adapter_case(project))
    run_in_copy(project, prepare, args)


@FAST
@given(data=st.data())
def test_mutated_adapters_give_exit_0_or_one_message(project, data):
    _adapter_example(project, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_mutated_adapters_give_exit_0_or_one_message_long(project, data):
    _adapter_example(project, data)


STEP = "run/checkpoints/step_2"
RESUME = ["train", "config.yaml", "--resume", "train.max_steps=3"]


@st.composite
def checkpoint_case(draw, project: Path):
    """The newest checkpoint's trainer_state.json, trainer_state.pt or adapter, damaged."""
    target = draw(st.sampled_from(["json", "pt", "pt", "pt-bytes", "adapter-config", "adapter-weights"]))
    ckpt = project / STEP
    if target == "json":
        info = json.loads((ckpt / "trainer_state.json").read_text())
        name, data = "trainer_state.json", dump_json(*draw(json_mutation(info)))
    elif target == "pt":
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        buffer = io.BytesIO()
        torch.save(draw(pt_mutation(state)), buffer)
        name, data = "trainer_state.pt", buffer.getvalue()
    elif target == "pt-bytes":
        name, data = "trainer_state.pt", damage((ckpt / "trainer_state.pt").read_bytes(), draw(BYTE_DAMAGE))
    elif target == "adapter-config":
        config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
        name, data = "adapter/adapter_config.json", dump_json(*draw(json_mutation(config)))
    else:
        weights = ckpt / "adapter" / "adapter_model.safetensors"
        name, data = "adapter/adapter_model.safetensors", draw(safetensors_mutation(weights.read_bytes()))
    event(f"checkpoint {target}")

    def prepare(root: Path) -> None:
        (root / STEP / name).write_bytes(data)
    return prepare


def _checkpoint_example(project: Path, data) -> None:
    run_in_copy(project, data.draw(checkpoint_case(project)), RESUME)


@FAST
@given(data=st.data())
def test_mutated_checkpoints_resume_or_give_one_message(project, data):
    _checkpoint_example(project, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_mutated_checkpoints_resume_or_give_one_message_long(project, data):
    _checkpoint_example(project, data)


BASE_COMMANDS = {
    "merge": ["merge", "bad.safetensors", ADAPTER, "-o", "out.safetensors", "--ignore-fingerprint"],
    "merge-checked": ["merge", "bad.safetensors", ADAPTER, "-o", "out.safetensors"],
    "eval-merged": ["eval", ADAPTER, "--merged", "bad.safetensors"],
    "train": ["train", "config.yaml", "model.base=bad.safetensors", "output_dir=run2", "train.max_steps=1",
              "train.save_every=null"],
}


def _base_example(project: Path, data) -> None:
    bad = data.draw(safetensors_mutation((project / "base.safetensors").read_bytes()))
    command = data.draw(st.sampled_from(sorted(BASE_COMMANDS)))
    event(f"base / {command}")
    args = BASE_COMMANDS[command]

    def prepare(root: Path) -> None:
        (root / "bad.safetensors").write_bytes(bad)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(project, Path(tmp) / "p"))
        prepare(root)
        before = snapshot(root)
        result = _invoke(args, root)
        assert_outcome(result)
        changed = changes(before, snapshot(root))
        if command == "train":
            assert all(c.startswith("run2") for c in changed), changed
            if result.exit_code == 2 and "became non-finite" not in result.stderr:   # a diverged run keeps its log
                assert not changed, changed
        elif command == "eval-merged":
            assert not changed, changed
        else:
            assert all(c == "out.safetensors" for c in changed), changed
            if result.exit_code == 0:
                load_file(root / "out.safetensors")
            else:
                assert not changed, changed


@FAST
@given(data=st.data())
def test_mutated_safetensors_bases_give_exit_0_or_one_message(project, data):
    _base_example(project, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_mutated_safetensors_bases_give_exit_0_or_one_message_long(project, data):
    _base_example(project, data)


def fast_first(ids: str, params: list, fast: set[str]) -> list:
    """Parameters for pytest: those whose id is in ``fast`` run in the fast suite, the
    others are marked slow (they run in CI)."""
    names = ids.split()
    return [pytest.param(*(p if isinstance(p, tuple) else (p,)), id=i, marks=() if i in fast else pytest.mark.slow)
            for p, i in zip(params, names, strict=True)]


# --------------------------------------------------------------------------- point 9, case by case

def expect_refused(result, *needles: str) -> str:
    """Exit 2 with one message holding every needle (whitespace squashed)."""
    assert_outcome(result, 2)
    message = " ".join(result.stderr.split())
    for needle in needles:
        assert " ".join(needle.split()) in message, f"{needle!r} not in:\n{result.stderr}"
    return result.stderr


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def refused_everywhere(proj: Path, *needles: str, adapter: str = ADAPTER) -> None:
    """lora-eval, lora-merge and lora-merge --verify all refuse the adapter and write nothing."""
    before = snapshot(proj)
    for args in (["eval", adapter], ["merge", "base.safetensors", adapter, "-o", "m.safetensors"],
                 ["merge", "base.safetensors", adapter, "-o", "m.safetensors", "--verify"]):
        expect_refused(_invoke(args, proj), *needles)
    assert changes(before, snapshot(proj)) == []


@pytest.mark.parametrize("key, value, needle", fast_first(
    "rank-0 alpha-string alpha-nan modules-list fingerprint-string features-int config-list bias modules_to_save", [
    ("r", 0, "r: must be an integer >= 1, got 0"),
    ("lora_alpha", "16", "lora_alpha: must be a finite number"),
    ("lora_alpha", float("nan"), "lora_alpha: must be a finite number"),
    ("lora_cli.modules", ["layers.0"], "lora_cli.modules: must be an object of module paths"),
    ("lora_cli.fingerprint", "1f7eb67f39bfaf17", "lora_cli.fingerprint: must be an object"),
    ("lora_cli.features", 3, "lora_cli.features: must be a non-empty list"),
    ("lora_cli.config", [1], "lora_cli.config: must be an object"),
    ("bias", "some", "bias: must be one of none, all, lora_only"),
    ("modules_to_save", [["head"]], "modules_to_save: must be a list of module names"),
], fast={"rank-0", "alpha-string", "modules-list", "fingerprint-string"}))
def test_adapter_field_of_the_wrong_type_is_named(proj, key, value, needle):
    def edit(config):
        node = config
        *parents, leaf = key.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = value
    edit_json(proj / ADAPTER / "adapter_config.json", edit)
    refused_everywhere(proj, "adapter_config.json: malformed adapter config", needle, "fix:")


def test_the_same_checks_apply_to_the_config_in_the_safetensors_header(proj):
    weights = proj / ADAPTER / "adapter_model.safetensors"
    header, body = split_safetensors(weights.read_bytes())
    config = json.loads(header["__metadata__"]["adapter_config"])
    config["r"] = "two"
    header["__metadata__"]["adapter_config"] = json.dumps(config)
    raw = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    (proj / ADAPTER / "adapter_config.json").unlink()
    refused_everywhere(proj, "adapter_model.safetensors (header): malformed adapter config", "r: must be an integer")


def test_label_map_of_300000_classes_is_refused_at_once(proj):
    path = proj / "cls_run/adapter/adapter_config.json"
    text = path.read_text()
    labels = '"label_map": {' + ", ".join(f'"c{i}": {i}' for i in range(300_000)) + "}"
    path.write_text(text.replace('"label_map": {', labels + ', "was": {', 1))
    expect_refused(_invoke(["eval", "cls_run/adapter"], proj),
                   "lora_cli.label_map: must hold 2 to 10,000 classes, got 300,000")


def test_label_map_that_is_not_a_numbering_is_refused(proj):
    edit_json(proj / "cls_run/adapter/adapter_config.json",
              lambda c: c["lora_cli"].update(label_map={"cat": 0, "dog": 0, "eel": 5}))
    expect_refused(_invoke(["eval", "cls_run/adapter"], proj), "class ids 0 to 2, each once")


@pytest.mark.parametrize("name, tensor, needle", fast_first("0-d 1-d rank-0 integers", [
    ("lora_A", torch.tensor(1.0), "lora_A has shape ()"),
    ("lora_B", torch.ones(8), "lora_B has shape (8,)"),
    ("lora_A", torch.ones(0, 3), "lora_A has shape (0, 3)"),
    ("lora_A", torch.ones(2, 3, dtype=torch.int64), "lora_A holds int64"),
], fast={'0-d'}))
def test_adapter_tensor_of_the_wrong_shape_or_kind_is_refused(proj, name, tensor, needle):
    weights = proj / ADAPTER / "adapter_model.safetensors"
    tensors, header = load_file(weights), split_safetensors(weights.read_bytes())[0]["__metadata__"]
    tensors[f"base_model.model.layers.0.{name}.weight"] = tensor
    save_file(tensors, weights, metadata=header)
    refused_everywhere(proj, "module 'layers.0'", needle)


@pytest.mark.parametrize("args", fast_first("huge-hidden a-million-layers other-shapes", [
    {"hidden": 100_000}, {"layers": 10**6}, {"hidden": 8, "layers": 2, "bias": False}], fast={"huge-hidden"}))
def test_adapter_model_args_that_do_not_fit_the_base_are_refused_before_building(proj, args):
    # the model is built on the meta device first: nothing of 100,000 x 100,000 is allocated
    edit_json(proj / ADAPTER / "adapter_config.json", lambda c: c["lora_cli"]["model_args"].update(args))
    for command in (["eval", ADAPTER], ["merge", "base.safetensors", ADAPTER, "-o", "m.safetensors", "--verify"]):
        expect_refused(_invoke(command, proj), "model")
    assert not (proj / "m.safetensors").exists()


def test_adapter_model_args_beyond_the_fingerprint_are_refused_without_a_base_file(proj):
    edit_json(proj / "cls_run/adapter/adapter_config.json", lambda c: c["lora_cli"]["model_args"].update(hidden=50_000))
    expect_refused(_invoke(["eval", "cls_run/adapter"], proj), "adapter's fingerprint")
    expect_refused(_invoke(["eval", "cls_run/adapter", "--ignore-fingerprint"], proj),
                   "these arguments build a model that holds")


@pytest.mark.parametrize("text", fast_first("5000-digit-int nested-100000 cut-short not-utf8", [
    "9" * 5000, "[" * 100_000 + "]" * 100_000, '{"r": 1', '\xff'], fast={"5000-digit-int", "nested-100000"}))
def test_adapter_config_that_json_cannot_take_is_one_message(proj, text):
    path = proj / ADAPTER / "adapter_config.json"
    if text == '\xff':
        path.write_bytes(b'{"r": "\xff"}')
    else:
        path.write_text(text if text.startswith("{") else '{"r": ' + text + "}")
    refused_everywhere(proj, "adapter_config.json", "adapter config is not")


# --- checkpoint state files

class _Marker:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _resume(proj: Path):
    before = snapshot(proj)
    result = _invoke(RESUME, proj)
    return result, changes(before, snapshot(proj))


@pytest.mark.parametrize("edit, needle", fast_first(
    "no-optimizer no-rng step-string eval-without-loss torch-rng python-rng state-shape state-missing step-none "
    "lr-string extra-param permuted schedule-step position scaler", [
    (lambda s: s.pop("optimizer"), "trainer_state.pt: optimizer missing"),
    (lambda s: s.pop("rng"), "trainer_state.pt: rng missing"),
    (lambda s: s["loop"].update(step="2"), "loop.step must be an integer"),
    (lambda s: s["loop"].update(eval_base={"mse": 1.0}), "loop.eval_base must be null or metrics"),
    (lambda s: s["rng"][0].update(torch=torch.zeros(3, dtype=torch.uint8)), "rng state 0: not a state"),
    (lambda s: s["rng"][0].update(python=[1, 2]), "rng state 0: not a state"),
    (lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(5, 5)),
     "'exp_avg' of parameter 0 is a tensor of shape (5, 5), not a tensor of the parameter's shape (2, 3)"),
    (lambda s: s["optimizer"]["state"][0].pop("exp_avg"), "'exp_avg' of parameter 0 is missing"),
    (lambda s: s["optimizer"]["state"][0].update(step=None), "'step' of parameter 0 is None"),
    (lambda s: s["optimizer"]["param_groups"][0].update(lr="fast"),
     "optimizer setting 'lr' is 'fast', the run's is 0.01"),
    (lambda s: s["optimizer"]["param_groups"][0]["params"].append(99), "must number the parameters 0, 1, 2"),
    (lambda s: s["optimizer"]["param_groups"][0].update(params=[3, 2, 1, 0]), "must number the parameters 0, 1, 2"),
    (lambda s: s["schedule"].update(last_epoch=7), "the schedule is at step 7, the loop at step 2"),
    (lambda s: s["loop"].update(step_in_epoch=99), "the loop position"),
    (lambda s: s.__setitem__("scaler", "on"), "scaler must be an object"),
], fast={'no-optimizer', 'state-shape', 'step-string'}))
def test_trainer_state_pt_with_missing_keys_or_wrong_types_is_refused(proj, edit, needle):
    path = proj / STEP / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    result, changed = _resume(proj)
    expect_refused(result, "run/checkpoints/step_2", needle, "delete this checkpoint directory")
    assert changed == []


@pytest.mark.parametrize("edit, needle", fast_first("no-config workers-string workers-0 step", [
    (lambda i: i.pop("config"), "config must be an object"),
    (lambda i: i.update(workers="2"), "workers must be an integer from 1 to"),
    (lambda i: i.update(workers=0), "workers must be an integer from 1 to"),
    (lambda i: i.update(step=5), "step must be 2 (the directory's)"),
], fast={'workers-string', 'no-config'}))
def test_trainer_state_json_with_missing_keys_or_wrong_types_is_refused(proj, edit, needle):
    edit_json(proj / STEP / "trainer_state.json", edit)
    result, changed = _resume(proj)
    expect_refused(result, "trainer_state.json", needle)
    assert changed == []


def test_trainer_state_json_keys_of_later_versions_are_ignored(proj):
    edit_json(proj / STEP / "trainer_state.json", lambda i: i.update(data_fingerprints={"train.csv": "abc"}))
    state = torch.load(proj / STEP / "trainer_state.pt", weights_only=True)
    state["loop"]["added_later"] = 1
    torch.save(state, proj / STEP / "trainer_state.pt")
    result, _ = _resume(proj)
    assert_outcome(result, 0)


@pytest.mark.parametrize("payload", fast_first("top-level inside", ["top-level", "inside"], fast={"top-level"}))
def test_trainer_state_pt_that_would_run_code_is_refused_without_running_it(proj, payload):
    marker = proj / "PWNED"
    evil = _Marker(marker)
    torch.save(evil if payload == "top-level" else {"optimizer": evil}, proj / STEP / "trainer_state.pt")
    result, changed = _resume(proj)
    expect_refused(result, "trainer_state.pt is not a plain state file", "would run code")
    assert not marker.exists() and changed == []


@pytest.mark.parametrize("data", fast_first("0-bytes garbage cut-zip", [b"", b"garbage" * 10, b"PK\x03\x04"],
                                              fast={"0-bytes"}))
def test_trainer_state_pt_that_is_not_a_torch_file_is_refused(proj, data):
    (proj / STEP / "trainer_state.pt").write_bytes(data)
    result, changed = _resume(proj)
    expect_refused(result, "trainer_state.pt is truncated or corrupt")
    assert changed == []


def test_checkpoint_whose_adapter_scaling_differs_from_the_run_is_refused(proj):
    edit_json(proj / STEP / "adapter/adapter_config.json", lambda c: c.update(lora_alpha=99.0))
    result, changed = _resume(proj)
    expect_refused(result, "its adapter scales 'layers.0' by 49.5 (alpha 99), the run by 2 (lora.alpha 4)")
    assert changed == []


def test_metrics_rows_that_are_not_lora_clis_do_not_stop_a_resume(proj):
    metrics = proj / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": "x"}\n[1, 2]\n' + "[" * 100_000 + "\n")
    result, _ = _resume(proj)
    assert_outcome(result, 0)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert all(isinstance(r, dict) and isinstance(r["step"], int) for r in rows)


# --- safetensors headers

def rewrite_header(path: Path, edit) -> None:
    header, body = split_safetensors(path.read_bytes())
    header = edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _overlap(h: dict) -> dict:
    a = h[min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])]    # the first in the file
    a["data_offsets"][1] += 4         # runs 4 bytes into the next tensor ...
    a["shape"] = [int(torch.Size(a["shape"]).numel()) + 1]    # ... with a shape to match
    return h


HEADER_FLAWS = {
    "json-list": (lambda h: [h], "the header is a JSON list, not an object"),
    "negative-shape": (lambda h: (h[_first(h)].update(shape=[-1, 3]), h)[1], "integers >= 0, got [-1, 3]"),
    "float-shape": (lambda h: (h[_first(h)].update(shape=[1.5]), h)[1], "integers >= 0, got [1.5]"),
    "bool-shape": (lambda h: (h[_first(h)].update(shape=[True]), h)[1], "integers >= 0, got [True]"),
    "overlap": (_overlap, "overlaps the tensor before it"),
    "metadata-not-strings": (lambda h: (h.update(__metadata__={"format": 5}), h)[1],
                             "__metadata__ must map strings to strings"),
    "unknown-dtype": (lambda h: (h[_first(h)].update(dtype="F128"), h)[1], "unknown dtype 'F128'"),
    "offsets-past-the-end": (lambda h: (h[_first(h)].update(data_offsets=[0, 10**12]), h)[1],
                             "ends at byte 1000000000000"),
}


@pytest.mark.parametrize("flaw", fast_first(" ".join(HEADER_FLAWS), list(HEADER_FLAWS), fast={
    "json-list", "negative-shape", "float-shape", "overlap", "metadata-not-strings"}))
def test_safetensors_base_with_a_bad_header_is_refused_by_merge_and_train(proj, flaw):
    edit, needle = HEADER_FLAWS[flaw]
    rewrite_header(proj / "base.safetensors", edit)
    before = snapshot(proj)
    for args in (["merge", "base.safetensors", ADAPTER, "-o", "m.safetensors", "--ignore-fingerprint"],
                 ["train", "config.yaml", "output_dir=run2"],
                 ["eval", ADAPTER, "--merged", "base.safetensors"]):
        expect_refused(_invoke(args, proj), "base.safetensors: cannot read safetensors file", needle, "corrupt")
    assert changes(before, snapshot(proj)) == []    # no merged file that nothing can load


@pytest.mark.parametrize("flaw", fast_first(" ".join(HEADER_FLAWS), list(HEADER_FLAWS),
                                             fast={"json-list", "metadata-not-strings"}))
def test_adapter_with_a_bad_safetensors_header_is_refused(proj, flaw):
    edit, needle = HEADER_FLAWS[flaw]
    rewrite_header(proj / ADAPTER / "adapter_model.safetensors", edit)
    refused_everywhere(proj, "adapter_model.safetensors: cannot read the adapter weights", needle)


def test_a_header_length_past_the_end_and_a_duplicate_name_are_refused(proj):
    path = proj / "base.safetensors"
    data = path.read_bytes()
    header, body = split_safetensors(data)
    name = _first(header)
    raw = json.dumps(header).encode()
    raw = raw[:-1] + b", " + json.dumps(name).encode() + b": " + json.dumps(header[name]).encode() + b"}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    expect_refused(_invoke(["merge", "base.safetensors", ADAPTER, "-o", "m.safetensors"], proj), "appears twice")
    path.write_bytes(struct.pack("<Q", 2**63) + data[8:])
    expect_refused(_invoke(["merge", "base.safetensors", ADAPTER, "-o", "m.safetensors"], proj), "header claims")


# --- .pt bases, model folders

@pytest.mark.parametrize("data", fast_first("0-bytes zeros", [b"", b"\x00" * 16], fast={"0-bytes"}))
def test_pt_base_of_0_bytes_is_refused(proj, data):
    (proj / "base.pt").write_bytes(data)
    for args in (["merge", "base.pt", ADAPTER, "-o", "m.pt"], ["train", "config.yaml", "model.base=base.pt",
                                                                "output_dir=run2"]):
        expect_refused(_invoke(args, proj), "base.pt", "truncated or corrupt")
    assert not (proj / "m.pt").exists() and not (proj / "run2").exists()


def _model_folder(proj: Path, config_text: str | None) -> Path:
    folder = proj / "model"
    folder.mkdir()
    shutil.copy(proj / "base.safetensors", folder / "model.safetensors")
    if config_text is not None:
        (folder / "config.json").write_text(config_text)
    return folder


@pytest.mark.parametrize("text, needle", fast_first("invalid a-list architectures-string deep", [
    ("{not json", "config.json is not valid JSON"),
    ("[1, 2]", "config.json holds a JSON list"),
    ('{"architectures": "LlamaForCausalLM"}', "architectures must be a list"),
    ("[" * 100_000, "nested too deeply"),
], fast={'invalid'}))
def test_model_folder_with_an_invalid_config_json_is_refused(proj, text, needle):
    _model_folder(proj, text)
    expect_refused(_invoke(["merge", "model", ADAPTER, "-o", "merged"], proj), "model/config.json", needle)
    assert not (proj / "merged").exists()
    pytest.importorskip("transformers")
    hf = {"task": "causal_lm", "model": {"hf": "model"}, "data": {"train": "train.txt"}, "output_dir": "hf_run"}
    (proj / "train.txt").write_text("hello world\n")
    (proj / "hf.yaml").write_text(yaml.safe_dump(hf))
    expect_refused(_invoke(["train", "hf.yaml"], proj), "model/config.json", needle)
    assert not (proj / "hf_run").exists()


def test_model_folder_with_a_bad_shard_index_is_refused(proj):
    folder = _model_folder(proj, "{}")
    index = folder / "model.safetensors.index.json"
    for text, needle in [("{", "not valid JSON"), ('{"weight_map": []}', "weight_map must be a non-empty object"),
                         ('{"weight_map": {"a": 5}}', "values must be shard file names")]:
        index.write_text(text)
        expect_refused(_invoke(["merge", "model", ADAPTER, "-o", "merged"], proj), "invalid shard index", needle)
    assert not (proj / "merged").exists()


# --- YAML

BOMB = "".join(f"{n}: &{n} [{', '.join([f'*{p}' for _ in range(9)] if p else ['lol'] * 9)}]\n"
               for p, n in zip([None, *"abcdefgh"], "abcdefghi"))


@pytest.mark.parametrize("where", fast_first("file model.args override", ["file", "model.args", "override"],
                                              fast={"file", "override"}))
def test_yaml_alias_bomb_is_refused_at_once(proj, where):
    # 9 levels of 9 aliases: 387 bytes that expand to 9^9 = 387 million values
    if where == "file":
        (proj / "bomb.yaml").write_text(BOMB)
        args = ["train", "bomb.yaml"]
    elif where == "model.args":
        (proj / "bomb.yaml").write_text(yaml.safe_dump(CONFIG).replace("args:\n", "args:\n" + "".join(
            "    " + line + "\n" for line in BOMB.splitlines())))
        args = ["train", "bomb.yaml"]
    else:
        flow = "[" + ", ".join(line.split(": ", 1)[1] for line in BOMB.splitlines()) + "]"
        args = ["train", "config.yaml", "model.args.x=" + flow, "output_dir=run2"]
    expect_refused(_invoke(args, proj), "aliases expand to more than 100,000 values")
    assert not (proj / "run2").exists()


@pytest.mark.parametrize("where, shape", fast_first(
    "lists-in-a-file maps-in-a-file lists-in-an-override maps-in-an-override",
    [("file", "lists"), ("file", "mappings"), ("override", "lists"), ("override", "mappings")],
    fast={"lists-in-a-file", "maps-in-an-override"}))
def test_yaml_nested_50000_levels_deep_is_refused(proj, where, shape):
    value = "[" * 50_000 + "]" * 50_000 if shape == "lists" else "{a: " * 50_000 + "1" + "}" * 50_000
    if where == "file":
        (proj / "deep.yaml").write_text("seed: 0\nmodel:\n  args:\n    x: " + value + "\n")
        args = ["train", "deep.yaml"]
    else:
        args = ["train", "config.yaml", "model.args.x=" + value, "output_dir=run2"]
    expect_refused(_invoke(args, proj), "nesting deeper than 64 levels")


def test_yaml_integer_of_thousands_of_digits_and_a_huge_config_are_one_message(proj):
    (proj / "big.yaml").write_text("seed: " + "9" * 5000 + "\n")
    expect_refused(_invoke(["train", "big.yaml"], proj), "invalid YAML", "digits")
    expect_refused(_invoke(["train", "config.yaml", "seed=" + "9" * 5000], proj), "override", "digits")
    (proj / "huge.yaml").write_text("# " + "x" * (2 << 20) + "\n")
    expect_refused(_invoke(["train", "huge.yaml"], proj), "the config file is 2.0 MB")


# --- a full disk

class FullDisk:
    """Writes to files under ``root`` fail with ENOSPC once ``budget`` bytes went there
    (builtins.open and io.open are patched while it is installed)."""

    def __init__(self, root: Path, budget: float):
        self.root, self.left, self.written = os.path.abspath(root), budget, 0

    def install(self, monkeypatch) -> None:
        real = builtins.open

        def opened(file, mode="r", *args, **kwargs):
            fh = real(file, mode, *args, **kwargs)
            if not isinstance(file, int) and any(c in mode for c in "wax+") and \
                    os.path.abspath(os.fspath(file)).startswith(self.root):
                return _Limited(fh, self)
            return fh
        monkeypatch.setattr(builtins, "open", opened)
        monkeypatch.setattr(io, "open", opened)


class _Limited:
    def __init__(self, fh, disk: FullDisk):
        self._fh, self._disk = fh, disk

    def write(self, data):
        n = len(data)
        if n > self._disk.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.left -= n
        self._disk.written += n
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def check_no_partial_run(result, out: Path, top: Path, proj: Path, before: dict) -> None:
    """After a run into ``out`` (``top``: the top-most folder it creates) on a full disk:
    exit 0, or one 'disk is full' message with nothing half-written; without a complete
    checkpoint no output folder at all, with one a resumable run (the hint says so)."""
    assert_outcome(result)
    outside = [c for c in changes(before, snapshot(proj)) if not (proj / c).is_relative_to(top)]
    assert not outside, outside
    if result.exit_code == 0:
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        return
    expect_refused(result, "the disk is full", "nothing half-written was left behind")
    if not (out / "checkpoints").is_dir() or not any((out / "checkpoints").iterdir()):
        assert not top.exists(), sorted(snapshot(top))
        return
    assert "--resume" in result.stderr
    left = snapshot(out)
    assert not [p for p in left if ".tmp" in p], left
    for step in (out / "checkpoints").iterdir():
        assert {"adapter", "trainer_state.json", "trainer_state.pt"} <= {p.name for p in step.iterdir()}, step


TRAIN_INTO = ["train", "config.yaml", "output_dir=out/run", "train.max_steps=3", "train.keep_last=2"]
_RUN_BYTES: dict[str, int] = {}


def _full_disk_example(proj: Path, monkeypatch, data) -> None:
    if "train" not in _RUN_BYTES:    # what a whole run writes, once
        disk = FullDisk(proj / "out", float("inf"))
        with monkeypatch.context() as m:
            disk.install(m)
            assert_outcome(_invoke(TRAIN_INTO, proj), 0)
        _RUN_BYTES["train"] = disk.written
    total = _RUN_BYTES["train"]
    budget = data.draw(st.one_of(st.integers(0, total), st.sampled_from([0, 1, 100, total - 1])))
    shutil.rmtree(proj / "out", ignore_errors=True)
    before = snapshot(proj)
    with monkeypatch.context() as m:
        FullDisk(proj / "out", budget).install(m)
        result = _invoke(TRAIN_INTO, proj)
    check_no_partial_run(result, proj / "out" / "run", proj / "out", proj, before)
    event("kept checkpoints" if result.exit_code == 2 and (proj / "out").exists() else f"exit {result.exit_code}")
    if result.exit_code == 2 and (proj / "out" / "run").exists():    # space freed: the run goes on
        assert_outcome(_invoke(TRAIN_INTO + ["--resume"], proj), 0)


@settings(FAST, max_examples=4)
@given(data=st.data())
def test_a_full_disk_at_any_byte_of_a_run_leaves_nothing_half_written(proj, monkeypatch, data):
    _full_disk_example(proj, monkeypatch, data)


@pytest.mark.slow
@settings(SLOW, max_examples=max(LONG // 3, 10))
@given(data=st.data())
def test_a_full_disk_at_any_byte_of_a_run_leaves_nothing_half_written_long(proj, monkeypatch, data):
    _full_disk_example(proj, monkeypatch, data)


@pytest.mark.parametrize("what", ["config.yaml", "metrics.jsonl", "checkpoint", "adapter"])
def test_a_full_disk_while_writing_each_output_is_one_message(proj, monkeypatch, what):
    """The disk fills up while writing ``what``: one message naming it."""
    real = builtins.open
    names = {"config.yaml": ".config.yaml.tmp", "metrics.jsonl": "metrics.jsonl", "checkpoint": "trainer_state.pt",
             "adapter": "adapter_model.safetensors"}

    def opened(file, mode="r", *args, **kwargs):
        fh = real(file, mode, *args, **kwargs)
        if not isinstance(file, int) and "w" in mode or "a" in mode:
            name = Path(os.fspath(file)).name
            if name.startswith(names[what]) and ".adapter.tmp" in os.fspath(file) if what == "adapter" else \
                    name.startswith(names[what]):
                disk = FullDisk(Path(os.fspath(file)).parent, 0)
                return _Limited(fh, disk)
        return fh
    monkeypatch.setattr(builtins, "open", opened)
    monkeypatch.setattr(io, "open", opened)
    args = ["train", "config.yaml", "output_dir=fresh/run", "train.max_steps=2"]
    if what != "checkpoint":
        args.append("train.save_every=null")
    result = _invoke(args, proj)
    monkeypatch.undo()
    shown = {"checkpoint": "the checkpoint of step 1", "adapter": "the adapter"}.get(what, what)
    expect_refused(result, f"cannot write {shown}: the disk is full")
    if what == "adapter":    # the trained tensors fitted beside it: kept, and --resume writes the adapter
        assert (proj / "fresh" / "run" / "unsaved-adapter.pt").is_file()
        assert_outcome(_invoke(args + ["--resume"], proj), 0)
        assert (proj / "fresh" / "run" / "adapter" / "adapter_model.safetensors").is_file()
        return
    assert not (proj / "fresh").exists()


def _sharded(proj: Path) -> Path:
    """The base as a model directory: two shards, their index, a config.json."""
    folder = proj / "sharded"
    folder.mkdir()
    weights = load_file(proj / "base.safetensors")
    names = sorted(weights)
    shard = {n: f"model-0000{1 + (i >= 3)}-of-00002.safetensors" for i, n in enumerate(names)}
    for file in set(shard.values()):
        save_file({n: weights[n] for n in names if shard[n] == file}, folder / file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shard}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["MLP"], "note": "x" * 3000}))
    return folder


def test_a_full_disk_while_merging_leaves_no_output(proj, monkeypatch):
    _sharded(proj)
    for base, out in (("base.safetensors", "outs/m.safetensors"), ("sharded", "outs/merged")):
        disk = FullDisk(proj / "outs", float("inf"))    # what the merge writes (copies go around write())
        (proj / "outs").mkdir(exist_ok=True)
        with monkeypatch.context() as m:
            disk.install(m)
            assert_outcome(_invoke(["merge", base, ADAPTER, "-o", out], proj), 0)
        shutil.rmtree(proj / "outs")
        for budget in (0, 8, disk.written // 2, disk.written - 1):
            disk = FullDisk(proj / "outs", budget)
            (proj / "outs").mkdir(exist_ok=True)
            with monkeypatch.context() as m:
                disk.install(m)
                result = _invoke(["merge", base, ADAPTER, "-o", out], proj)
            expect_refused(result, f"{out}: cannot write the merged output: the disk is full")
            assert list((proj / "outs").iterdir()) == []


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@pytest.mark.parametrize("size", fast_first("8k 40k 64k", ["8k", "40k", "64k"], fast={"8k", "40k"}))
def test_a_real_full_disk_on_a_small_tmpfs(proj, tmp_path, size):
    """ENOSPC from the kernel, not a patch: train and merge onto a tmpfs of a few pages."""
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, size):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        before = snapshot(proj)
        out = mount / "runs" / "run"
        result = _invoke(["train", "config.yaml", f"output_dir={out}", "train.max_steps=3", "train.keep_last=null"],
                         proj)
        check_no_partial_run(result, out, mount / "runs", proj, before)
        shutil.rmtree(mount / "runs", ignore_errors=True)
        weights = load_file(proj / "base.safetensors")
        weights["padding"] = torch.zeros(20_000)     # 80 KB: more than the tmpfs holds
        save_file(weights, proj / "big.safetensors")
        result = _invoke(["merge", "big.safetensors", ADAPTER, "-o", str(mount / "m.safetensors"),
                          "--ignore-fingerprint"], proj)
        expect_refused(result, "cannot write the merged output: the disk is full")
        assert list(mount.iterdir()) == []
        (_sharded(proj) / "config.json").write_text(json.dumps({"note": "x" * 80_000}))   # more than the tmpfs
        result = _invoke(["merge", "sharded", ADAPTER, "-o", str(mount / "merged")], proj)
        expect_refused(result, "cannot write the merged output: the disk is full")
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=20)


# --- paths with [ and ]

def test_paths_with_brackets_print_literally_and_nothing_crashes_after_writing(proj):
    (proj / "[data]").mkdir()
    shutil.copy(proj / "train.csv", proj / "[data]" / "train [1].csv")
    out = "runs/[exp 1]/[/]:cat:"   # (quoted in overrides: YAML reads a trailing ':' as a mapping)
    # (an override value starting with [ is a YAML list: quote it)
    args = ["train", "config.yaml", "data.train='[data]/train [1].csv'", f"output_dir='{out}'", "train.save_every=null"]
    plan = _invoke([*args, "--dry-run"], proj)
    assert_outcome(plan, 0)
    assert "[data]/train [1].csv" in plan.stdout
    trained = _invoke(args, proj)
    assert_outcome(trained, 0)
    assert f"{out}/adapter" in trained.stdout and "🐱" not in trained.output
    evaluated = _invoke(["eval", f"{out}/adapter"], proj)
    assert_outcome(evaluated, 0)
    (proj / "[red]").mkdir()
    merged = _invoke(["merge", "base.safetensors", f"{out}/adapter", "-o", "[red]/m [bold].safetensors",
                      "--verify"], proj)
    assert_outcome(merged, 0)
    assert "[red]/m [bold].safetensors" in merged.stdout and "verify:" in merged.stdout
    load_file(proj / "[red]" / "m [bold].safetensors")
    missing = _invoke(["train", "config.yaml", "data.train='[gone]/x [/].csv'", "output_dir=r2"], proj)
    expect_refused(missing, "[gone]/x [/].csv")


def test_paths_the_system_refuses_are_one_message(proj):
    long = "x" * 300 + ".safetensors"       # one name longer than the 255 bytes a file system allows
    for args in (["eval", long], ["merge", long, ADAPTER], ["merge", "base.safetensors", ADAPTER, "-o", long],
                 ["eval", ADAPTER, "--merged", long], ["train", "config.yaml", f"output_dir={long}"]):
        expect_refused(_invoke(args, proj), "cannot use this path: File name too long")
    edit_json(proj / ADAPTER / "adapter_config.json", lambda c: c["lora_cli"]["config"]["data"].update(eval="a\0b"))
    expect_refused(_invoke(["eval", ADAPTER], proj), "lora_cli.config.data.eval: a string holds a NUL character")


def test_a_pipe_named_as_a_file_is_refused_instead_of_read_forever(proj):
    for name in ("pipe.yaml", "pipe.csv", "pipe.safetensors"):
        os.mkfifo(proj / name)
    for args, needle in [(["train", "pipe.yaml"], "not a regular file"),
                         (["eval", ADAPTER, "--data", "pipe.csv"], "not a regular file"),
                         (["merge", "pipe.safetensors", ADAPTER], "not a regular file"),
                         (["eval", "pipe.safetensors"], "adapter is not a file or directory")]:
        expect_refused(_invoke(args, proj), needle)
