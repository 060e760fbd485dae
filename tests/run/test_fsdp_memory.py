"""Under FSDP a worker holds its shard of the frozen base, not the whole of it: after a
training step, no tensor reachable from any LoRA layer (through any Python reference,
FSDP's own state included) is larger than one shard of a weight.

Two CPU workers (gloo) shard a stack of equal 64 x 64 adapted layers the way lora-train
does (:func:`lora_cli.run.distributed.wrap`); every worker also plants a whole copy of
a weight on one layer, the way the old ``_base_module`` reference kept one, and checks
that the walk finds it, so the test would catch that leak.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import reachable_tensors, storage_bytes
from lora_cli.run import distributed as dist

WORKERS, DIM, BLOCKS = 2, 64, 3


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(DIM, DIM, bias=False)
        self.v_proj = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x):
        return x + torch.tanh(self.q_proj(x)) * self.v_proj(x)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(BLOCKS))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def worker(rank: int, init: str, out: str) -> None:
    from lora_cli import apply_lora
    from lora_cli.lora.inject import lora_layers

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=WORKERS)
    try:
        torch.manual_seed(0)
        model = apply_lora(Stack(), rank=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.1)
        full = DIM * DIM * 4                                     # bytes of one whole float32 weight
        layers = lora_layers(model)
        world = dist.World(rank=rank, size=WORKERS, strategy="fsdp")
        engine = dist.wrap(model, world, torch.device("cpu"))
        opt = torch.optim.AdamW([p for p in engine.parameters() if p.requires_grad], lr=0.01)
        engine.train()
        for _ in range(2):
            engine(torch.randn(5, DIM)).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        largest = {path: max((storage_bytes(t), p) for p, t in reachable_tensors(layer))
                   for path, layer in layers.items()}
        shard = {path: layer.weight.to_local().untyped_storage().nbytes() for path, layer in layers.items()}
        planted = next(iter(layers.values()))
        object.__setattr__(planted, "_planted", [nn.Linear(DIM, DIM, bias=False)])     # a whole weight, hidden
        found = max(storage_bytes(t) for _, t in reachable_tensors(planted))
        Path(out, f"{rank}.json").write_text(json.dumps({
            "full": full, "largest": {k: list(v) for k, v in largest.items()}, "shard": shard,
            "planted_found": found, "local_numel": {p: layer.weight.to_local().numel() for p, layer in layers.items()},
        }))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_no_tensor_reachable_from_a_lora_layer_is_larger_than_its_shard(tmp_path):
    if not dist.fsdp_available():
        pytest.skip("this torch has no FSDP2 fully_shard")
    import torch.multiprocessing as mp

    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.spawn(worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=WORKERS, join=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for rank in range(WORKERS):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        full = got["full"]
        assert got["planted_found"] == full                         # the walk sees a hidden whole weight
        assert len(got["largest"]) == 2 * BLOCKS
        for path, (largest, where) in got["largest"].items():
            assert got["local_numel"][path] == math.ceil(DIM / WORKERS) * DIM        # rows split over workers
            assert got["shard"][path] <= math.ceil(full / WORKERS)
            assert largest <= got["shard"][path], f"{path}: {largest} bytes reachable via {where}"
