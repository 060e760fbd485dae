"""What a training step will hold in memory, per worker, before it runs (``lora-train --dry-run``).

    peak ~ base weights   frozen parameters at their storage dtype (quantized: packed bytes)
         + LoRA weights   trainable parameters (float32)
         + gradients      one per trainable parameter (DDP keeps a second copy in its buckets)
         + optimizer      Adam/AdamW: two float32 moments per trainable parameter; SGD: none
         + activations    what autograd saves for backward, for one micro-batch
         + backward       the model's output (alive until backward ends), and twice the largest
                          saved tensor (the gradients flowing into and out of the op that saved it)

Activations are measured, not guessed: one forward pass of the longest training example
records every tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``),
parameters excluded, each storage counted once, and attributed to the block (an element
of the model's outer ModuleList) that saved it. A micro-batch of B examples holds about B
times that. With gradient checkpointing a block keeps only its input until backward
recomputes it, so the estimate is: what is saved outside the blocks + every block's
input + one block's activations (the one being recomputed).

Under fsdp every parameter, its gradient and its optimizer state are split W ways, and a
unit (one block) is gathered whole while it runs, two at a time with prefetching.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..models.quantize import is_quantized, stored_bytes
from .distributed import _shard_units
from .evaluate import forward, loss_fn

GB = 1e9


@dataclass(frozen=True)
class Activations:
    """Bytes autograd saves for one example: outside the blocks, per block, and the blocks' inputs."""

    outside: int
    blocks: tuple[int, ...]
    block_inputs: tuple[int, ...]
    largest: int                 # the largest single saved tensor
    output: int = 0              # the model's output tensor

    @property
    def plain(self) -> int:
        return self.outside + sum(self.blocks)

    @property
    def checkpointed(self) -> int:
        if not self.blocks:
            return self.plain
        return self.outside + sum(self.block_inputs) + max(self.blocks)


@dataclass(frozen=True)
class MemoryEstimate:
    """The bytes one worker holds at the peak of a training step, by part."""

    base_weights: int
    lora_weights: int
    gradients: int
    optimizer: int
    per_example: Activations | None    # None: the forward pass could not be measured (see ``why``)
    batch_size: int
    checkpointing: bool
    workers: int = 1
    strategy: str = "single"
    why: str | None = None

    def activations(self, batch_size: int | None = None, checkpointing: bool | None = None) -> int:
        """Activation bytes of one micro-batch (the configured one unless given), plus the backward term."""
        b = self.batch_size if batch_size is None else batch_size
        ck = self.checkpointing if checkpointing is None else checkpointing
        a = self.per_example
        if a is None:
            return 0
        return b * ((a.checkpointed if ck else a.plain) + a.output + 2 * a.largest)

    @property
    def fixed(self) -> int:
        """Everything but the activations."""
        return self.base_weights + self.lora_weights + self.gradients + self.optimizer

    def total(self, batch_size: int | None = None, checkpointing: bool | None = None) -> int:
        return self.fixed + self.activations(batch_size, checkpointing)

    def largest_batch(self, limit_bytes: float, checkpointing: bool | None = None) -> int:
        """The largest micro-batch whose estimated peak fits ``limit_bytes`` (0: none fits)."""
        per = self.activations(1, checkpointing)
        room = limit_bytes - self.fixed
        return max(0, int(room // per)) if per > 0 else 0   # not measured: no batch is known to fit

    def parts(self) -> list[tuple[str, int]]:
        """(name, bytes) rows as the plan shows them."""
        return [("base weights", self.base_weights), ("LoRA weights", self.lora_weights),
                ("gradients", self.gradients), ("optimizer state", self.optimizer),
                (f"activations (batch {self.batch_size}{', checkpointed' if self.checkpointing else ''})",
                 self.activations())]


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _storage_bytes(t: torch.Tensor) -> int:
    if is_quantized(t):                                 # torchao's: the sum of its inner tensors
        return stored_bytes(t)
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):         # a wrapper subclass without one storage
        return t.numel() * t.element_size()


@contextlib.contextmanager
def _checkpointing_off(model: nn.Module):
    """Measure every activation: checkpointing switched off for the measurement, back on after."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


def measure_activations(model: nn.Module, task: str, inputs: torch.Tensor, target: torch.Tensor) -> Activations:
    """Bytes autograd saves for backward in one forward pass and loss of ``inputs`` (B, ...),
    divided by B: per example."""
    params = {_storage_key(p) for p in [*model.parameters(), *model.buffers()] if not is_quantized(p)}
    seen: set[tuple[str, int]] = set()
    units = _shard_units(model)
    blocks = [0] * len(units)
    inputs_of = [0] * len(units)
    current: list[int] = []
    outside = largest = 0

    def pack(t: torch.Tensor):
        nonlocal outside, largest
        if t.device.type != "meta" and not is_quantized(t):      # a quantized tensor is a frozen weight
            key = _storage_key(t)
            if key not in params and key not in seen:
                seen.add(key)
                n = _storage_bytes(t)
                largest = max(largest, n)
                if current:
                    blocks[current[-1]] += n
                else:
                    outside += n
        return t

    def enter(i):
        def hook(module, args):
            current.append(i)
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            inputs_of[i] = first.numel() * first.element_size() if first is not None else 0
        return hook

    def leave(module, args, output) -> None:
        current.pop()

    handles = [u.register_forward_pre_hook(enter(i)) for i, u in enumerate(units)]
    handles += [u.register_forward_hook(leave) for u in units]
    was_training = model.training
    model.train()
    try:
        with _checkpointing_off(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = forward(model, inputs)
            loss = loss_fn(task, output, target)
        out_bytes = output.numel() * output.element_size()
        del loss, output
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    b = max(1, (inputs["input_ids"] if isinstance(inputs, dict) else inputs).shape[0])   # packed: a dict
    return Activations(outside=outside // b, blocks=tuple(n // b for n in blocks),
                       block_inputs=tuple(n // b for n in inputs_of), largest=largest // b,
                       output=out_bytes // b)


def _longest_example(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the one longest training example (the padded length a batch can reach)."""
    from .build import batches
    data = plan.built.data
    examples = getattr(data.train, "examples", None)
    if examples:
        sizes = [len(ex[0] if isinstance(ex, tuple) else ex) for ex in examples]
        index = max(range(len(sizes)), key=sizes.__getitem__)
    else:
        index = 0
    pad = data.tokenizer.pad_id if data.tokenizer is not None else None
    return next(batches(data.train, torch.tensor([index]), 1, pad))


def estimate(plan) -> MemoryEstimate:
    """The per-worker peak of ``plan``'s training step, by part (one measured forward pass)."""
    cfg, model, world = plan.cfg, plan.built.model, plan.world
    frozen = sum(_storage_bytes(p) for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = 2 if cfg.train.optimizer in ("adam", "adamw") else 0
    inputs, target = _longest_example(plan)
    why = None
    try:
        with torch.random.fork_rng(devices=[]):
            acts = measure_activations(model, cfg.task, inputs, target)
    except (RuntimeError, IndexError, ValueError) as exc:     # training would fail the same way; the plan shows it
        acts, why = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    workers = world.size if world.distributed else 1
    strategy = world.strategy if world.distributed else "single"
    grads = trainable
    if strategy == "fsdp":
        units = _shard_units(model)
        gathered = 2 * max((sum(_storage_bytes(p) for p in u.parameters()) for u in units), default=0)
        frozen, trainable, grads = frozen // workers + gathered, trainable // workers, grads // workers
    elif strategy == "ddp":
        grads = 2 * trainable                    # the gradients and DDP's buckets
    return MemoryEstimate(base_weights=frozen, lora_weights=trainable, gradients=grads,
                          optimizer=moments * trainable, per_example=acts, batch_size=cfg.train.batch_size,
                          checkpointing=cfg.train.gradient_checkpointing, workers=workers, strategy=strategy,
                          why=why)
