"""The words of the LoRA engine that a config may use, in one place and without torch, so
that lora_cli.run.config (torch-free) offers exactly the choices the engine takes."""

ALL_LINEAR = "all-linear"                                   # target every Linear but the output head
HEAD_NAMES = ("lm_head", "head", "classifier", "score", "output")   # a last top-level child named so is a head
BIAS_CHOICES = ("none", "all", "lora_only")                 # which biases train
DTYPE_NAMES = ("float32", "bfloat16", "float16")          # the float dtypes a user may name
LAYOUTS = ("linear", "conv1d", "embedding")                 # how an adapted module's weight is laid out
FACTORS = {"linear": ("lora_A", "lora_B"), "conv1d": ("lora_A", "lora_B"),
           "embedding": ("lora_embedding_A", "lora_embedding_B")}   # its two factors' parameter names
