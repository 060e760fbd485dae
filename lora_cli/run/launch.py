"""Starting workers on this machine: ``lora-train CONFIG --nproc-per-node N``.

The workers are N copies of ``python -m lora_cli train CONFIG ...``, started by torch's
elastic launcher (the engine behind torchrun) with a rendezvous on localhost. When one
worker fails the launcher stops the others; :func:`launch` then names the worker that
failed first and how, instead of torch's error report.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError
from .distributed import PEER_FAILED

INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)


@dataclass
class Failure:
    """How one worker ended, as the launcher saw it."""

    rank: int
    exitcode: int      # negative: killed by that signal
    pid: int | None = None

    @property
    def signal_name(self) -> str | None:
        if self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"

    @property
    def shell_code(self) -> int:
        """The exit code a shell would report: 128 + signal for a killed worker."""
        return 128 - self.exitcode if self.exitcode < 0 else self.exitcode

    @property
    def secondary(self) -> bool:
        """Stopped because another worker failed (or by the launcher stopping it)."""
        return self.exitcode in (PEER_FAILED, -signal.SIGTERM)


def explain(failures: list[Failure], nproc: int, resume: str | None = None) -> tuple[int, UserError | None]:
    """The run's exit code, and the message to print (None when rank 0 already said it all).
    ``resume`` is the command that continues from the last checkpoint, if there is one."""
    primary = [f for f in failures if not f.secondary] or failures
    codes = {f.shell_code for f in primary}
    if codes <= set(INTERRUPTED) or codes == {2}:
        return max(codes), None            # interrupted, or a user error: rank 0 reported it
    first = min(primary, key=lambda f: f.rank)
    how = (f"was killed by {first.signal_name}" if first.signal_name
           else f"failed with exit code {first.exitcode} (its error is printed above)")
    stopped = sorted(f.rank for f in failures if f.secondary)
    also = sorted(f.rank for f in primary if f is not first)
    rest = f"; rank{'s' if len(stopped) > 1 else ''} {', '.join(map(str, stopped))} stopped after it" if stopped else ""
    rest += f"; rank{'s' if len(also) > 1 else ''} {', '.join(map(str, also))} failed too" if also else ""
    fix = ("SIGKILL is often the out-of-memory killer (see dmesg): lower train.batch_size or the number of "
           "workers" if first.exitcode == -signal.SIGKILL else "fix what that worker reported")
    fix += f"; then resume with: {resume}" if resume else "; with train.save_every set, a rerun can --resume"
    return first.shell_code, UserError(f"worker rank {first.rank} of {nproc} {how}{rest}",
                                       where=f"--nproc-per-node {nproc}", fix=fix)


def worker_threads(nproc: int) -> int:
    """CPU threads per worker: the cores this process may use, shared out, at least one."""
    from .build import available_cores
    return max(1, available_cores() // nproc)


def launch(args: list[str], nproc: int, resume: Callable[[], str | None] = lambda: None
           ) -> tuple[int, UserError | None]:
    """Run ``python -m lora_cli train *args`` on ``nproc`` local workers; return the exit
    code and, if a worker failed, the message that explains it (``resume`` gives the
    command that continues the run, once it has failed)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # torch's own failure report (a table and a traceback) would repeat what we say; its
    # loggers set their own levels, so each is quietened
    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    threads_set = "OMP_NUM_THREADS" in os.environ
    os.environ.setdefault("OMP_NUM_THREADS", str(worker_threads(nproc)))     # the workers inherit it
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "lora_cli", "train", *args)
    except ChildFailedError as exc:
        failures = [Failure(rank=rank, exitcode=f.exitcode, pid=f.pid) for rank, f in exc.failures.items()]
        return explain(failures, nproc, resume())
    except SignalException as exc:          # Ctrl-C or kill: the workers got it too and checkpointed
        return 128 + int(exc.sigval), None
    finally:
        if not threads_set:
            del os.environ["OMP_NUM_THREADS"]
    return 0, None
