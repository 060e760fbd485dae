"""One benchmark run in a fresh process: build, adapt, train a few steps, report.

    python bench/worker.py --json-config '{"tier": "B", "size": "S", "variant": "ours", ...}'

Prints one line ``RESULT {json}`` on stdout. The variants:

    floor  frozen base, forward + input gradients only (no LoRA, no optimizer)
    full   every parameter trained with AdamW
    peft   peft.get_peft_model with a LoraConfig
    ours   lora_cli.apply_lora (its step inside sharing_dropout(), as lora-train's, unless
           "dropout_shared" is false: then each layer draws its own mask, as PEFT's do)

Everything that could differ between tools is fixed here, once: the base weights (seeded
construction, checksummed), the LoRA start (A uniform(+-1/sqrt(in)) as nn.Linear's
kaiming init, B = 0, written into both tools' tensors from one seeded generator), the
batches, and the optimizer (AdamW below). Only the tool under test differs.

Imports are done per variant, so peak RSS shows what each tool really loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lora_cli from this checkout
from spec import ADAMW, SIZES, TARGETS, llama_linears  # noqa: E402  (bench/ is sys.path[0])

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- models and batches -----------------------------------------------------------------

class OneLayer(nn.Module):
    """Tier A: one nn.Linear(k, d) named ``linear``, so both tools can target it by name."""

    def __init__(self, k: int, d: int):
        super().__init__()
        self.linear = nn.Linear(k, d)

    def forward(self, x):            # x: (N, k) -> (N, d)
        return self.linear(x)


def build_a(cfg: dict):
    torch.manual_seed(cfg["seed"])
    model = OneLayer(cfg["k"], cfg["d"])
    x = torch.randn(cfg["N"], cfg["k"]).requires_grad_(True)   # (N, k): input grads always,
    # as for a layer inside a network; the same x every step (no (steps, N, k) tensor)

    def loss_fn(m, step):
        x.grad = None
        return m(x).square().mean()                             # (N, d) -> ()
    return model, loss_fn, cfg["N"]


def build_b(cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SIZES[cfg["size"]]
    config = LlamaConfig(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], intermediate_size=s["intermediate"],
        num_attention_heads=s["heads"], num_key_value_heads=s["heads"], vocab_size=s["vocab"],
        max_position_embeddings=s["seq"], tie_word_embeddings=False, use_cache=False,
        attention_dropout=0.0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg["seed"])
    model = LlamaForCausalLM(config)
    linears = sorted((m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear))
    assert linears == sorted((k, d) for _, k, d in llama_linears(cfg["size"])), "shapes.py is out of date"
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    n_batches = cfg["warmup"] + cfg["steps"]
    ids = torch.randint(0, s["vocab"], (n_batches, s["batch"], s["seq"]), generator=g)  # (steps, B, T)

    def loss_fn(m, step):
        return m(input_ids=ids[step], labels=ids[step]).loss   # causal LM loss (shifted inside)
    return model, loss_fn, s["batch"] * s["seq"]


# --- variants -----------------------------------------------------------------------------

def lora_pairs(model: nn.Module, variant: str) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(path, A (r, in), B (out, r)) for every adapted module, in module order."""
    if variant == "ours":
        from lora_cli.lora.inject import lora_layers
        return [(p, m.lora_A, m.lora_B) for p, m in lora_layers(model).items()]
    from peft.tuners.lora import LoraLayer
    return [(p.removeprefix("base_model.model."), m.lora_A["default"].weight, m.lora_B["default"].weight)
            for p, m in model.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def init_lora(pairs, seed: int) -> None:
    """The same start for both tools: A ~ U(+-1/sqrt(in)) (nn.Linear's init), B = 0."""
    g = torch.Generator().manual_seed(seed)
    for _, a, b in pairs:
        bound = 1.0 / a.shape[1] ** 0.5
        a.copy_(torch.rand(a.shape, generator=g) * 2 * bound - bound)
        b.zero_()


def adapt(model: nn.Module, cfg: dict):
    """Apply the variant; returns (model to call, its trainable params, adapted paths)."""
    variant = cfg["variant"]
    if variant == "floor":
        model.requires_grad_(False)
        if cfg["tier"] == "B":
            model.enable_input_require_grads()   # embeddings output requires grad
        return model, [], []
    if variant == "full":
        return model, list(model.parameters()), []
    targets = ["linear"] if cfg["tier"] == "A" else TARGETS[cfg["targets"]]
    if variant == "ours":
        from lora_cli import apply_lora
        apply_lora(model, rank=cfg["r"], alpha=cfg["alpha"], target_modules=targets, dropout=cfg["dropout"],
                   use_dora=bool(cfg.get("dora")))
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model
        lc = LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=targets,
                        lora_dropout=cfg["dropout"], bias="none", use_dora=bool(cfg.get("dora")),
                        task_type="CAUSAL_LM" if cfg["tier"] == "B" else None)
        model = get_peft_model(model, lc)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    pairs = lora_pairs(model, variant)
    init_lora(pairs, cfg["seed"] + 2)
    return model, [p for p in model.parameters() if p.requires_grad], [p for p, _, _ in pairs]


def adapter_bytes(model: nn.Module, variant: str) -> int | None:
    if variant not in ("peft", "ours"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "adapter"
        if variant == "ours":
            from lora_cli import save_adapter
            save_adapter(model, out)
        else:
            model.save_pretrained(out)
        return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


# --- the run --------------------------------------------------------------------------------

def run(cfg: dict) -> dict:
    torch.set_num_threads(cfg["threads"])
    rss_import = peak_rss_mb()
    model, loss_fn, tokens = (build_a if cfg["tier"] == "A" else build_b)(cfg)
    with torch.no_grad():
        checksum = sum(p.double().sum().item() for p in model.parameters())
    model.train()
    model, params, adapted = adapt(model, cfg)
    opt = torch.optim.AdamW(params, **ADAMW) if params else None
    rss_model = peak_rss_mb()

    if cfg["variant"] == "ours":      # as lora-train runs a step: with lora.dropout_shared as set
        from lora_cli.lora.kernel import sharing_dropout
        share = lambda: sharing_dropout(cfg.get("dropout_shared", True))   # noqa: E731
    else:
        share = contextlib.nullcontext
    times, losses = [], []
    for step in range(cfg["warmup"] + cfg["steps"]):
        t0 = time.perf_counter()
        with share():
            loss = loss_fn(model, step)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    rss_peak = peak_rss_mb()            # before saving the adapter
    times, losses = times[cfg["warmup"]:], losses[cfg["warmup"]:]
    step_s = statistics.median(times)
    return {
        "config": cfg,
        "step_s": step_s,
        "step_times_s": times,
        "tokens_per_s": tokens / step_s,
        "losses": losses,
        "final_loss": losses[-1],
        "peak_rss_mb": rss_peak,
        "rss_after_import_mb": rss_import,
        "rss_after_build_mb": rss_model,
        "trainable_params": sum(p.numel() for p in params),
        "adapted_modules": len(adapted),
        "adapter_bytes": adapter_bytes(model, cfg["variant"]),
        "base_checksum": checksum,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-config", required=True, help="the run's settings as a JSON object")
    cfg = json.loads(parser.parse_args().json_config)
    print("RESULT " + json.dumps(run(cfg)), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
