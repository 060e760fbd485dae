"""Small checks for values read from untrusted JSON (adapter configs, trainer state):
each returns None when a value is fine, else the problem in words, so a validator can
report every problem of a file at once."""

from __future__ import annotations

import json
import math

_F32_MAX = float(3.4028234663852886e38)


def show(value, limit: int = 60) -> str:
    """A value for an error message: repr, cut short (adapter files are untrusted)."""
    try:
        text = repr(value)
    except ValueError:            # an int too long to print
        text = "a huge integer"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_json(raw: bytes | str, what: str, *, pairs_hook=None):
    """``raw`` (UTF-8 bytes, or text) parsed as JSON, or a ValueError saying in words why
    it is not, naming it ``what``: not UTF-8, or not valid JSON (nested too deeply counts).
    Every JSON file lora-cli reads goes through here; what the value must be is the
    caller's to check."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 text") from None
    try:
        return json.loads(text, object_pairs_hook=pairs_hook)
    except RecursionError:
        raise ValueError(f"{what} is not valid JSON: nested too deeply") from None
    except ValueError as exc:    # JSONDecodeError, a duplicate key (pairs_hook), an integer of thousands of digits
        raise ValueError(f"{what} is not valid JSON ({exc})") from None


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v, bound: float = _F32_MAX) -> bool:
    """A finite int or float no larger than ``bound`` in size (bools are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v)) and abs(float(v)) <= bound
    except OverflowError:
        return False


def is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def entries(ok, expect: str, *, keys: str = "names"):
    """A check of an object whose values must each pass ``ok``: the first bad entry is named."""
    def check(v):
        if not isinstance(v, dict):
            return f"must be an object of {keys} to {expect}, got {show(v)}"
        bad = next((k for k, x in v.items() if not ok(x)), None)
        return None if bad is None else f"[{show(bad)}] must be {expect}, got {show(v[bad])}"
    return check


def simple(ok, expect: str, *, null: bool = False):
    """A check of one value: ``ok(value)``, or also null when ``null``."""
    return lambda v: None if (v is None and null) or ok(v) else f"must be {expect}{' or null' * null}, got {show(v)}"


def nul_at(tree, path: str = "", depth: int = 0) -> str | None:
    """The key path of the first string (key or value) holding a NUL character, or None."""
    if isinstance(tree, str):
        return path if "\x00" in tree else None
    if depth > 100:     # json.loads nests at most a few hundred levels deep; nothing lora-cli writes does
        return None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        here = f"{path}.{key}" if path and isinstance(key, str) else f"{path}[{key}]" if path else str(key)
        if isinstance(key, str) and "\x00" in key:
            return here
        found = nul_at(value, here, depth + 1)
        if found is not None:
            return found
    return None
