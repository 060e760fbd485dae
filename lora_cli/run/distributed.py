"""Training on several workers with torch.distributed: who each worker is, and what they share.

A run on W workers (ranks 0..W-1, started by torchrun or ``lora-train --nproc-per-node``)
behaves like one process whose batch is W times larger::

    global batch G = batch_size x grad_accum x W          (examples per optimizer step)
    epoch order    = one permutation of the n examples, the same on every rank (seed, epoch)
    rank r reads   = positions r, r+W, r+2W, ... of it, padded to a multiple of W so
                     that every rank runs ceil(n / W) examples (the padding counts zero)
    loss           = summed over the step's rows or target tokens on all ranks, divided
                     by their global count (see lora_cli.run.train)

so optimizer step s sees the same G examples as a single process with batch G, and its
gradient is the mean over them. Two strategies:

    ddp    DistributedDataParallel over the trainable parameters: after backward, the
           adapter's gradients (not the frozen base's) are averaged across workers.
    fsdp   FSDP2 ``fully_shard``: every parameter, frozen base included, is split across
           workers (one unit per element of the model's outer ModuleList, plus the root)
           and gathered only while its unit runs. The adapter is gathered whole to save.

Only rank 0 writes files and prints. Decisions that depend on the disk (resume or not,
from which checkpoint) are taken on rank 0 and broadcast, so workers on machines
without a shared file system agree.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from ..errors import UserError

T = TypeVar("T")

# Exit code of a worker that stopped because another worker failed (the one to look at).
PEER_FAILED = 3


class FollowerStop(Exception):
    """A non-zero rank stops because rank 0 failed, and reports it: with exit code 2
    after a user error, else PEER_FAILED."""

    def __init__(self, user_error: bool = True):
        super().__init__("rank 0 stopped the run")
        self.exit_code = 2 if user_error else PEER_FAILED


class PeerFailed(Exception):
    """A collective failed: another worker died or hung up."""

    def __init__(self, rank: int, cause: BaseException):
        # gloo says "[.../pair.cc:537] Read error [host]:port: Connection reset by peer. This is ..."
        detail = re.sub(r"^\[[^\]]*\]\s*", "", str(cause).strip().splitlines()[0] if str(cause).strip() else "")
        detail = detail.split(". ")[0][:200] or type(cause).__name__
        super().__init__(f"rank {rank}: stopped because another worker failed ({detail})")
        self.rank = rank


@dataclass(frozen=True)
class World:
    """This process's place among the workers; a single process is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def _device(self) -> torch.device:
        """Where collectives' tensors live: the current CUDA device under nccl, else CPU."""
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over all ranks (float64)."""
        if not self.distributed:
            return list(values)
        return self.sum_tensor(torch.tensor(list(values), dtype=torch.float64)).tolist()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over all ranks (a new tensor)."""
        if not self.distributed:
            return t
        out = t.to(self._device(), copy=True)
        torch.distributed.all_reduce(out)
        return out.to(t.device)

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank. A UserError it
        raises is raised on rank 0 (which reports it) and stops the others quietly."""
        if not self.distributed:
            return fn()
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:
                self.broadcast((None, "user" if isinstance(exc, UserError) else "other"))
                raise
            self.broadcast((result, None))
            return result
        result, failure = self.broadcast(None)
        if failure:
            raise FollowerStop(user_error=failure == "user")
        return result

    def on_all(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it raised anywhere, stop everywhere.

        A rank whose ``fn`` raised something other than a UserError re-raises it (its
        traceback is the report) and the others stop quietly. Otherwise rank 0 reports
        once: its own UserError, or the first other rank's (prefixed with that rank).
        """
        if not self.distributed:
            return fn()
        try:
            result, error = fn(), None
        except BaseException as exc:
            result, error = None, exc
        reports = self.gather(None if error is None else (isinstance(error, UserError), str(error)))
        if not any(reports):
            return result
        if error is not None and not isinstance(error, UserError):
            raise error
        if not all(user for user, _ in filter(None, reports)):
            raise FollowerStop(user_error=False)
        if not self.is_main:
            raise FollowerStop()
        if error is not None:
            raise error
        rank, (_, text) = next((r, m) for r, m in enumerate(reports) if m)
        raise UserError(f"rank {rank}: {text}")


SINGLE = World()


def launched() -> bool:
    """Whether this process is a worker started by torchrun (or lora-train --nproc-per-node)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
    except ImportError:
        return False
    return True


def join(strategy: str, device: torch.device) -> World:
    """Join the process group torchrun set up (env:// rendezvous): gloo on CPU, nccl on CUDA."""
    import torch.distributed as dist

    if device.type not in ("cpu", "cuda"):
        raise UserError(f"distributed training runs on cpu or cuda, not {device.type}", where="device",
                        fix="set device: cpu or device: cuda")
    if strategy == "fsdp" and not fsdp_available():
        raise UserError(f"train.strategy fsdp needs FSDP2 (torch >= 2.6), this is torch {torch.__version__}",
                        where="train.strategy", fix="use train.strategy: ddp, or upgrade torch")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"worker {local_rank} on this machine has no GPU ({torch.cuda.device_count()} visible)",
                            where="--nproc-per-node", fix="start at most one worker per GPU")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank, strategy=strategy)


def leave(together: bool) -> None:
    """Leave the process group. When every worker stopped at the same point (done, a
    user error, an interrupt) they first wait for each other: one tearing down its
    connections while another still uses them can abort. After a failure they do not
    wait (the others may be gone)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or not together:
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:
            dist.barrier()
    except Exception:           # a worker went away after all: nothing to wait for
        return
    dist.destroy_process_group()


@contextlib.contextmanager
def peer_failures(world: World):
    """Turn a collective failing because another worker went away into PeerFailed."""
    try:
        yield
    except Exception as exc:
        if world.distributed and is_peer_failure(exc):
            raise PeerFailed(world.rank, exc) from None
        raise


def quiet() -> None:
    """Silence a non-zero rank's warnings and library logs: rank 0 says it once. Errors
    still reach stderr."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    for name in ("transformers", "torch", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def worker_device(device: torch.device, world: World) -> torch.device:
    """Each worker on a machine takes its own GPU (cuda:LOCAL_RANK)."""
    if world.distributed and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


# What gloo and nccl say when the other end of a collective is gone or never came.
_PEER_ERROR = re.compile(r"Connection (reset|closed|refused)|Broken pipe|remote process exited|"
                         r"communicator was aborted|timed out|Timeout", re.IGNORECASE)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another worker went away (not
    this worker's own fault, such as running out of memory inside a collective)."""
    import torch.distributed as dist
    if isinstance(exc, getattr(dist, "DistNetworkError", ())):
        return True
    return isinstance(exc, RuntimeError) and bool(_PEER_ERROR.search(str(exc)))


# --- the data each rank reads ---------------------------------------------------------------

def shard(order: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's part of ``order``: positions rank, rank+W, rank+2W, ..."""
    return order[world.rank::world.size] if world.distributed else order


def epoch_share(order: torch.Tensor, world: World, done: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's examples of an epoch, after the first ``done`` positions of its
    ``order``, and which of them count.

    The epoch order is first padded to a multiple of W by repeating its first entries,
    so that every rank runs the same number of micro-batches (each is a collective).
    The padding is flagged False in the second tensor: it runs but its loss counts zero,
    so the step's gradient is the one of the real examples alone.
    """
    n, size = len(order), world.size
    extra = -n % size
    padded = torch.cat([order, order.repeat(extra // max(n, 1) + 1)[:extra]]) if extra else order
    keep = torch.arange(len(padded)) < n
    return shard(padded[done:], world), shard(keep[done:], world)


# --- wrapping the model ---------------------------------------------------------------------

def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The module the training step calls: the model itself, a DDP wrapper over it, or the
    model with FSDP2 sharding applied (in place). Trainable parameters start equal on all
    ranks (rank 0's values)."""
    if not world.distributed:
        return model.to(device)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = world.broadcast({n: p.detach().cpu() for n, p in trainable.items()} if world.is_main else None)
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(start[n])
    if world.strategy == "fsdp":
        _fully_shard(model, device)
        return model
    from torch.nn.parallel import DistributedDataParallel

    model.to(device)
    # No broadcast of the frozen base at start (every rank loaded the same one) nor of
    # buffers at each forward; gradients are bucketed and averaged for parameters with
    # requires_grad only.
    import inspect
    accepted = inspect.signature(DistributedDataParallel).parameters
    options = {"init_sync": False} if "init_sync" in accepted else {}
    options["forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"] = False
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **options)


def inner(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (or the model itself)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """Modules to shard as one unit each: the elements of the outermost ModuleLists
    (transformer blocks). A unit whose parameter is also used elsewhere (tied weights)
    is left to the root unit, which holds everything not in a unit."""
    units: list[nn.Module] = []
    lists: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(n + ".") for n in lists):
            lists.append(name)
            units.extend(m for m in module if any(True for _ in m.parameters()))
    unit_of = {id(sub): i for i, u in enumerate(units) for sub in u.modules()}
    users: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users.setdefault(id(p), set()).add(unit_of.get(id(module), -1))
    return [u for i, u in enumerate(units) if all(users[id(p)] == {i} for p in u.parameters())]


def _fully_shard(model: nn.Module, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for unit in _shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, world: World, enabled: bool):
    """Exchange gradients in this backward pass only if ``enabled`` (the last
    micro-batch of an optimizer step); earlier ones just accumulate locally."""
    if world.distributed and world.strategy == "fsdp":
        model.set_requires_gradient_sync(enabled)
        yield
    elif world.distributed and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def full(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole on CPU; a sharded one is gathered (every rank must call this)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def full_tensors(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of the named state-dict entries, in the order given."""
    state = inner(model).state_dict(keep_vars=True)
    return {n: full(state[n]).clone() for n in names}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with sharded state gathered whole (every rank must call this)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                   for i, s in sorted(sd["state"].items())}
    return sd


def shard_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> dict:
    """A whole optimizer state laid out like this rank's (possibly sharded) parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        mesh = getattr(p, "device_mesh", None)
        state[i] = {}
        for k, v in s.items():
            if mesh is not None and isinstance(v, torch.Tensor) and v.shape == p.shape:
                v = _distribute(v.to(p.device), mesh, p.placements)
            state[i][k] = v
    return {**sd, "state": state}


def _distribute(full_tensor: torch.Tensor, mesh, placements):
    """This rank's shard of a tensor every rank holds whole (no communication where the
    torch version can skip it)."""
    from torch.distributed.tensor import distribute_tensor
    try:
        return distribute_tensor(full_tensor, mesh, placements, src_data_rank=None)
    except TypeError:                       # older torch: scatters rank 0's copy instead
        return distribute_tensor(full_tensor, mesh, placements)


def grad_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float (a replicated DTensor under fsdp)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all the model's parameters (what fsdp gathers, about twice per step)."""
    return sum(p.numel() * p.element_size() for p in inner(model).parameters())


def gradient_bytes(model: nn.Module, world: World) -> int:
    """Bytes of gradient each worker sends into the exchange per optimizer step: all
    trainable parameters' gradients, once (0 on one worker)."""
    if not world.distributed:
        return 0
    return sum(p.numel() * p.element_size() for p in inner(model).parameters() if p.requires_grad)


def global_batch(cfg, workers: int) -> int:
    """Examples per optimizer step over all workers: batch_size x grad_accum x workers."""
    return cfg.train.batch_size * cfg.train.grad_accum * workers
