"""A worker's random generators as plain data, for checkpoints: torch's (and the current
GPU's), Python's and numpy's, stored as lists and dicts so that ``torch.load`` can read
them back with ``weights_only=True``, and checked before they are restored."""

from __future__ import annotations

import random

import torch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _py_state(random.getstate())}
    if torch.cuda.is_available():      # this worker's own GPU: another machine may have fewer
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy
        state["numpy"] = _py_state(numpy.random.get_state(legacy=False))
    except ImportError:
        pass
    return state


def _py_state(state):
    """RNG states as plain lists/dicts (weights_only loads no tuples of arbitrary objects)."""
    if isinstance(state, tuple):
        return {"__tuple__": [_py_state(s) for s in state]}
    if isinstance(state, dict):
        return {k: _py_state(v) for k, v in state.items()}
    if hasattr(state, "tolist"):
        return state.tolist()
    return state


def _py_unstate(state):
    if isinstance(state, dict) and "__tuple__" in state:
        return tuple(_py_unstate(s) for s in state["__tuple__"])
    if isinstance(state, dict):
        return {k: _py_unstate(v) for k, v in state.items()}
    if isinstance(state, list):
        return tuple(_py_unstate(s) for s in state)
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_py_unstate(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], (list, tuple)):     # written by lora-cli <= 0.1: every GPU's
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy
        numpy.random.set_state(_numpy_state(_py_unstate(state["numpy"])))


def _numpy_state(state):
    import numpy
    if isinstance(state, dict):   # legacy=False form: {'bit_generator': ..., 'state': {...}}
        inner = state.get("state", {})
        if isinstance(inner.get("key"), tuple):
            inner = {**inner, "key": numpy.array(inner["key"], dtype=numpy.uint32)}
            state = {**state, "state": inner}
    return state


def rng_problem(state) -> str | None:
    """Why an RNG state cannot be restored (tried on fresh generators), or None."""
    if not isinstance(state, dict) or "torch" not in state or "python" not in state:
        return "must be an object with 'torch' and 'python' states"
    try:
        t = state["torch"]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
            return "torch: must be a 1-D uint8 tensor"
        torch.Generator().set_state(t)
        random.Random().setstate(_py_unstate(state["python"]))
        if "cuda" in state:
            cuda = state["cuda"] if isinstance(state["cuda"], (list, tuple)) else [state["cuda"]]
            if not all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda):
                return "cuda: must be uint8 tensors"
        if "numpy" in state:
            try:
                import numpy
            except ImportError:
                return None
            numpy.random.RandomState().set_state(_numpy_state(_py_unstate(state["numpy"])))
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, OverflowError, AttributeError) as exc:
        return f"not a state the generator accepts ({str(exc).strip()[:120] or type(exc).__name__})"
    return None
