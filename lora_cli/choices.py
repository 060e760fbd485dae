"""Every word a config may choose from, defined once: the schema (run/config.py) offers
exactly these, and the code that acts on each choice imports it from here. Torch-free, so
reading a config never imports torch."""

from __future__ import annotations

from .lora.names import ALL_LINEAR, BIAS_CHOICES, DTYPE_NAMES

TASKS = ("regression", "classification", "causal_lm")
TABULAR_TASKS = ("regression", "classification")
ARCHS = ("linear", "mlp", "gpt")                 # built-in models (lora_cli.models.builtin)
DTYPES = DTYPE_NAMES                             # compute dtypes (lora_cli.lora.weight_files.DTYPES)
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DEVICE_PATTERN = r"auto|cpu|cuda|cuda:\d+|mps"
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "linear", "constant")
STRATEGIES = ("ddp", "fsdp")
RESUME = ("never", "auto")
ON_NAN = ("stop", "skip")
QUANTIZE = ("nf4", "int8")                       # quantized frozen bases (lora_cli.models.quantize)
BIASES = BIAS_CHOICES
TARGET_ALL_LINEAR = ALL_LINEAR

__all__ = ["ARCHS", "BIASES", "DEVICES", "DEVICE_PATTERN", "DTYPES", "ON_NAN", "OPTIMIZERS", "QUANTIZE", "RESUME",
           "SCHEDULERS", "STRATEGIES", "TABULAR_TASKS", "TARGET_ALL_LINEAR", "TASKS"]
