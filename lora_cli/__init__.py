"""lora-cli: LoRA fine-tuning from one YAML file.

The Python API is small on purpose::

    from lora_cli import apply_lora, save_adapter, load_adapter, merge_adapter

    apply_lora(model, rank=8, alpha=16, target_modules=["q_proj", "v_proj"])  # in place
    ...train: only the LoRA tensors require grad...
    save_adapter(model, "runs/my-adapter")        # adapter_model.safetensors + adapter_config.json
    load_adapter(fresh_base_model, "runs/my-adapter")
    merge_adapter(model)                           # folds B @ A into W; no LoRA modules left

Names are imported lazily so that ``lora-train --help`` never pays for importing torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "apply_lora": "lora.inject",
    "summarize": "lora.inject",
    "save_adapter": "lora.adapter",
    "load_adapter": "lora.adapter",
    "read_adapter": "lora.adapter",
    "loraplus_param_groups": "lora.loraplus",
    "merge_adapter": "lora.merge",
    "merge_state_dict": "lora.merge",
    "UserError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_cli' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
