"""Tiny models built in code, shared by the engine tests (layers, inject, adapter, merge).

    TinyLM     Llama-shaped: embed_tokens, layers.N.self_attn.{q,k,v,o}_proj,
               layers.N.mlp.{gate,up,down}_proj, layers.N.input_layernorm, norm, lm_head;
               get_output_embeddings() returns lm_head
    TinyGPT2   GPT-2-shaped with transformers' Conv1D: wte, h.N.attn.{c_attn,c_proj},
               h.N.mlp.{c_fc,c_proj}, ln_f, lm_head (skipped when transformers is absent)
    Headed     a plain MLP whose last top-level child is named like a head (no
               get_output_embeddings), for the all-linear fallback

Every factory takes a ``seed``: the same seed gives bitwise the same base, so a "fresh
base" in a round-trip test is ``tiny_lm(seed=0)`` again, and a "different base" is
another seed. All biases and norms are random so that bias handling is visible.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, HIDDEN, N_LAYER, N_HEAD = 32, 16, 24, 2, 2

# The models here are tiny: intra-op threads only add synchronisation, and on a busy
# machine (tests run in parallel with other jobs) they make each small op take
# milliseconds. One thread keeps every test fast and the results deterministic.
torch.set_num_threads(1)

try:
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers absent
    Conv1D = None


def _randomize(model: nn.Module) -> nn.Module:
    """Give every parameter (biases, norm weights too) non-trivial values."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    B, T, C = q.shape                                                        # (B, T, C)
    D = C // N_HEAD
    q, k, v = (t.view(B, T, N_HEAD, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(D)                           # (B, H, T, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    return (att @ v).transpose(1, 2).reshape(B, T, C)                        # (B, T, C)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(DIM, DIM, bias=True)
        self.k_proj = nn.Linear(DIM, DIM, bias=True)
        self.v_proj = nn.Linear(DIM, DIM, bias=True)
        self.o_proj = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x):
        return self.o_proj(_causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x)))


class MLPBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(DIM, HIDDEN, bias=False)
        self.up_proj = nn.Linear(DIM, HIDDEN, bias=False)
        self.down_proj = nn.Linear(HIDDEN, DIM, bias=True)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(DIM)
        self.self_attn = SelfAttention()
        self.mlp = MLPBlock()

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(x)


class TinyLM(nn.Module):
    """ids (B, T) -> logits (B, T, VOCAB)."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        x = self.embed_tokens(ids)                 # (B, T, C)
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))          # (B, T, VOCAB)


class TinyLMWithInputEmbeddings(TinyLM):
    """TinyLM that, like every transformers model, also has get_input_embeddings()."""

    def get_input_embeddings(self):
        return self.embed_tokens


class GPT2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(DIM)
        self.attn = nn.Module()
        self.attn.c_attn = Conv1D(3 * DIM, DIM)    # weight (in, out) = (DIM, 3*DIM)
        self.attn.c_proj = Conv1D(DIM, DIM)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(HIDDEN, DIM)
        self.mlp.c_proj = Conv1D(DIM, HIDDEN)

    def forward(self, x):
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(DIM, dim=-1)
        x = x + self.attn.c_proj(_causal_attention(q, k, v))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(x)))


class TinyGPT2(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM)
        self.h = nn.ModuleList(GPT2Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        x = self.wte(ids)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class Headed(nn.Module):
    """(B, 16) -> (B, 3): body.0, body.1, then a head named ``head_name`` (no getter)."""

    def __init__(self, head_name: str = "head"):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head_name = head_name
        setattr(self, head_name, nn.Linear(16, 3))

    def forward(self, x):
        return getattr(self, self.head_name)(self.body(x))


def tiny_lm(seed: int = 0, cls: type = TinyLM) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize(cls()).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    if Conv1D is None:
        pytest.skip("transformers (Conv1D) is not installed")
    torch.manual_seed(seed)
    return _randomize(TinyGPT2()).eval()


def headed(head_name: str = "head", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize(Headed(head_name)).eval()


def ids(batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def perturb_lora(model: nn.Module, seed: int = 3, std: float = 0.1) -> nn.Module:
    """Give every LoRA factor (and anything else that requires grad) random values, as
    training would: a fresh adapter has B = 0 and would hide layout mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
    return model


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the state dict (clones, not views)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def lm() -> nn.Module:
    return tiny_lm()


def write_lm_run(root, pairs: list[tuple[str, str]], *, eval_every_nth: int, seed: int, n_layer: int,
                 seq: int, dropout: float, train: dict):
    """A small causal-LM run on the built-in gpt (random base) in ``root``: train.jsonl from
    (prompt, completion) pairs, eval.jsonl from every n-th of them, config.yaml with
    output_dir "run"; returns root."""
    import json

    import yaml

    lines = [json.dumps({"prompt": p, "completion": c}) for p, c in pairs]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "eval.jsonl").write_text("\n".join(lines[::eval_every_nth]) + "\n")
    config = {
        "seed": seed, "device": "cpu", "task": "causal_lm", "output_dir": "run",
        "model": {"arch": "gpt", "args": {"n_layer": n_layer, "n_head": 2, "d_model": 32, "max_seq_len": seq},
                  "base": None},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_seq_len": seq},
        "lora": {"rank": 4, "alpha": 8, "dropout": dropout, "target_modules": "all-linear"},
        "train": train,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


FAULTS = Path(__file__).resolve().parent / "faults"


def fault_env(point: str) -> dict:
    """Environment for a subprocess that lora-cli must die in at ``point`` (see
    tests/faults/sitecustomize.py): the fault module first on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "LORA_CLI_TEST_FAULT": point}


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    """Each test its own tokenized-data cache (lora_cli/data/token_cache.py), never ~/.cache."""
    monkeypatch.setenv("LORA_CLI_CACHE", str(tmp_path_factory.mktemp("cache")))


def reachable_tensors(root: object) -> list[tuple[str, torch.Tensor]]:
    """Every tensor an object keeps alive through Python references: its attributes,
    containers, hook functions (closures, bound methods) and the modules, optimizers or
    FSDP states they lead to, walked to the end, each object once. A DTensor counts as
    the local tensor it holds. Returns (how it was reached, tensor) pairs."""
    import types

    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    stack: list[tuple[str, object]] = [("", root)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, type, types.ModuleType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            local = getattr(obj, "_local_tensor", None)        # a DTensor's own shard
            found.append((path, local if isinstance(local, torch.Tensor) else obj))
            continue
        if isinstance(obj, dict):
            stack += [(f"{path}[{k!r}]", v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        elif isinstance(obj, types.MethodType):
            stack += [(f"{path}.__self__", obj.__self__), (f"{path}.__func__", obj.__func__)]
        elif isinstance(obj, types.FunctionType):
            stack += [(f"{path}.__defaults__", obj.__defaults__), (f"{path}.__kwdefaults__", obj.__kwdefaults__)]
            stack += [(f"{path}<closure {i}>", c.cell_contents) for i, c in enumerate(obj.__closure__ or ())
                      if _has(c)]
        else:
            import functools
            if isinstance(obj, functools.partial):
                stack += [(f"{path}.func", obj.func), (f"{path}.args", obj.args), (f"{path}.kw", obj.keywords)]
            if hasattr(obj, "__dict__"):
                stack += [(f"{path}.{k}", v) for k, v in vars(obj).items()]
            for slot in getattr(type(obj), "__slots__", ()):
                if isinstance(slot, str) and hasattr(obj, slot):
                    stack.append((f"{path}.{slot}", getattr(obj, slot)))
    return found


def _has(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:          # an empty cell
        return False
    return True


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes of the memory a tensor keeps alive (its whole storage, not only its view)."""
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return 0
