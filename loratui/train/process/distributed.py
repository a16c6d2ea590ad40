"""Several training processes (`loratui train --gpus N`, `--cpu-processes N`, `--accelerate-config FILE`).

accelerate's launcher starts one worker per device and sets `RANK`/`WORLD_SIZE`/`LOCAL_RANK`; the trainers
stay the same single loop. What changes with several processes lives here:

- who writes: only rank 0 touches the run directory (events, status, checkpoints, TensorBoard, samples,
  exports); every rank holds the same LoRA weights after each step, so rank 0 can save alone;
- the data: a step's sample indices come from the global `StepPlan`; each rank takes a disjoint share
  (`shard`), and its micro-losses are scaled by the process count so that DDP's gradient average equals the
  single-process gradient of the whole step (2 processes x batch b == 1 process x batch 2b);
- one small exchange per step (`exchange`, before the update): any rank out of memory, any rank asked to
  stop, the loss of each rank and the memory of each rank (the step events carry `rank_memory`); only then
  the gradients are averaged (`all_reduce_gradients`): micro-batches run under DDP's `no_sync`, so an
  out-of-memory error on one rank never leaves the others inside a gradient all-reduce;
- a dead peer: the exchange runs over gloo (`control`: a group of its own when training uses NCCL), which
  fails at once when a peer's process is gone (a hung peer: after `LORATUI_COLLECTIVE_TIMEOUT_S`, default
  1800 s); the error becomes `PeerLost`, naming the rank whose process is gone, and rank 0 saves a
  checkpoint of the last completed step before the run stops.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TIMEOUT_ENV = "LORATUI_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0
COMM_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "gloo",
    "NCCL",
    "timed out",
    "Timeout",
    "ProcessGroup",
    "DistBackendError",
    "recvBytes",
    "sendBytes",
)


class PeerLost(RuntimeError):
    """Another training process stopped (crashed, killed, or unreachable): the run cannot go on."""

    def __init__(self, message: str, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def rank() -> int:
    """This process's global rank (0 without a distributed launcher)."""
    return _env_int("RANK", 0)


def world_size() -> int:
    """Number of training processes: the size of the initialised torch.distributed group, else what the
    launcher announced in WORLD_SIZE (before the group exists), else 1."""
    group = _group_size()
    return group if group is not None else max(1, _env_int("WORLD_SIZE", 1))


def _group_size() -> int | None:
    """The default process group's size, or None while there is none (torch is imported only if loaded)."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return int(dist.get_world_size())


def is_main() -> bool:
    """Whether this process writes the run directory (rank 0)."""
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def collective_timeout_s() -> float:
    """Seconds a collective may wait for the other processes before it fails."""
    try:
        return max(1.0, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_TIMEOUT_S


# --- setup ---------------------------------------------------------------------------------------------------


def make_accelerator(mixed_precision: str, *, cpu: bool) -> Any:
    """A fresh `Accelerator` (no accelerate-side accumulation); with several processes the process group gets
    the collective timeout and every rank learns the others' pids (to name a dead one)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    AcceleratorState._reset_state(reset_partial_state=True)  # several runs in one process (tests, demo)
    GradientState._reset_state()
    handlers = []
    if world_size() > 1:
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s())))
        # no collective inside forward: the frozen buffers are the same on every rank (see all_reduce_gradients)
        handlers.append(DistributedDataParallelKwargs(broadcast_buffers=False))
        # torch's DDP calls broadcast_buffers deprecated, but its replacement still syncs buffers at init and
        # the warning itself says to keep broadcast_buffers=False meanwhile: not news for the run's log
        warnings.filterwarnings(
            "ignore", message=r"`broadcast_buffers` is deprecated", category=FutureWarning
        )
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=handlers)
    if accelerator.num_processes > 1:
        open_control_group()
        PEERS.learn()
    return accelerator


@dataclass
class Peers:
    """(host id, pid) of every rank, gathered once at setup."""

    table: list[tuple[int, int]] = field(default_factory=list)

    def learn(self) -> None:
        mine = [_host_id(), os.getpid()]
        self.table = [tuple(row) for row in _all_gather_ints(mine)]  # type: ignore[misc]

    @property
    def pids(self) -> list[int]:
        return [pid for _host, pid in self.table]

    def dead(self) -> list[int]:
        """Ranks on this host whose process is gone (remote ranks cannot be checked)."""
        from loratui.runs.status import pid_alive

        here = _host_id()
        return [
            r
            for r, (host, pid) in enumerate(self.table)
            if host == here and r != rank() and not pid_alive(pid)
        ]


PEERS = Peers()


def _host_id() -> int:
    return zlib.crc32(socket.gethostname().encode())


@dataclass
class _Control:
    """The process group of the small per-step collectives (exchange, peers, OOM agreement)."""

    group: Any = None  # None: the default group (gloo already, on the CPU)


CONTROL = _Control()


def open_control_group() -> None:
    """With NCCL, a gloo group on the side for the per-step exchange: a peer that died makes gloo fail at once
    (its socket closes), so rank 0 learns it in the next exchange and saves, where an NCCL collective would
    block until the collective timeout. Called on every rank, in the same order, at setup."""
    from datetime import timedelta

    import torch.distributed as dist

    CONTROL.group = None
    if dist.is_initialized() and dist.get_backend() == "nccl":
        CONTROL.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=collective_timeout_s()))


def control() -> tuple[Any, Any]:
    """(group, device) for the per-step collectives."""
    import torch
    import torch.distributed as dist

    if CONTROL.group is None and dist.get_backend() == "nccl":
        return None, torch.device("cuda", torch.cuda.current_device())
    return CONTROL.group, torch.device("cpu")


def _all_gather_ints(values: Sequence[int]) -> list[list[int]]:
    import torch
    import torch.distributed as dist

    group, device = control()
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    rows = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine, group=group)
    return [[int(v) for v in row.tolist()] for row in rows]


# --- the per-step exchange -----------------------------------------------------------------------------------


@dataclass
class Exchanged:
    """What all ranks learned in one step's exchange."""

    any_oom: bool
    any_stop: bool
    losses: list[float]
    memory: list[int]


def exchange(*, oom: bool, stop: bool, loss: float, memory: int) -> Exchanged:
    """One all-gather of (out-of-memory flag, stop flag, loss, memory bytes) over all ranks."""
    import torch
    import torch.distributed as dist

    group, device = control()
    mine = torch.tensor(
        [float(oom), float(stop), float(loss), float(memory)], dtype=torch.float64, device=device
    )
    rows = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine, group=group)
    table = [row.tolist() for row in rows]
    return Exchanged(
        any_oom=any(r[0] > 0 for r in table),
        any_stop=any(r[1] > 0 for r in table),
        losses=[r[2] for r in table],
        memory=[int(r[3]) for r in table],
    )


def all_reduce_gradients(params: Sequence[Any]) -> None:
    """Average the gradients of `params` over all ranks in one flattened all-reduce.

    The trainers run every micro-batch under DDP's `no_sync`, so no collective happens inside forward or
    backward; the gradients are exchanged here, once per step, after every rank agreed in `exchange` that
    none ran out of memory. That keeps the collectives of all ranks in the same order whatever happens
    inside one rank's step (an out-of-memory error in a backward, a different number of micro-batches, a
    loss computed outside the DDP wrapper). A parameter without a gradient contributes zeros."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    by_kind: dict[tuple[Any, Any], list[int]] = {}
    for position, grad in enumerate(grads):
        by_kind.setdefault((grad.dtype, grad.device), []).append(position)
    with peer_errors("the gradient exchange"):
        for positions in by_kind.values():
            flat = torch.cat([grads[i].reshape(-1) for i in positions])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(dist.get_world_size())
            offset = 0
            for i in positions:
                count = grads[i].numel()
                grads[i].copy_(flat[offset : offset + count].view_as(grads[i]))
                offset += count
                if params[i].grad is None:
                    params[i].grad = grads[i]


def memory_now() -> tuple[int, str]:
    """(bytes, kind): the CUDA peak reserved by this process, or its resident memory on the CPU."""
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.max_memory_reserved()), "gpu"
    with contextlib.suppress(Exception):
        import psutil

        return int(psutil.Process().memory_info().rss), "rss"
    return 0, "rss"


def barrier(where: str) -> None:
    """Wait for every rank (no-op with one process); a lost peer raises `PeerLost`."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    group, _device = control()
    with peer_errors(where):
        dist.barrier(group=group)


def finish() -> None:
    """At a normal end with several processes: wait until every rank is done (rank 0 may still be saving),
    then close the process groups, so that no rank tears its connections down under a peer still inside a
    collective. Best effort and silent: a failure here must not turn a finished run into a failed launch."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    with contextlib.suppress(Exception):
        group, _device = control()
        dist.barrier(group=group)  # gloo: never blocks a CUDA stream
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    CONTROL.group = None


# --- a dead peer ---------------------------------------------------------------------------------------------


def is_comm_error(exc: BaseException) -> bool:
    """Whether an exception is a failed collective (a peer died or timed out)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError"):
            return True
        if isinstance(current, RuntimeError | ConnectionError | TimeoutError) and any(
            marker in str(current) for marker in COMM_MARKERS
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def describe_loss(exc: BaseException, where: str) -> str:
    """'training process rank 1 (pid 123) stopped at step 7: ...' for a failed collective."""
    dead = PEERS.dead()
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if dead:
        names = ", ".join(f"rank {r} (pid {PEERS.table[r][1]})" for r in dead)
        who = f"training process {names} stopped"
    else:
        who = "lost contact with another training process (it stopped, hung or cannot be reached)"
    return f"{who} during {where}; the run cannot continue ({first})"


@contextlib.contextmanager
def peer_errors(where: str) -> Iterator[None]:
    """Turn a failed collective into `PeerLost` (with several processes)."""
    try:
        yield
    except PeerLost:
        raise
    except Exception as exc:
        if world_size() > 1 and is_comm_error(exc):
            raise PeerLost(describe_loss(exc, where)) from exc
        raise


@contextlib.contextmanager
def checkpoint_on_peer_loss(save: Callable[[], Path | None]) -> Iterator[None]:
    """When a peer is lost, rank 0 saves the last completed step (local state only) before the run stops."""
    try:
        yield
    except PeerLost as exc:
        if is_main():
            with contextlib.suppress(Exception):
                exc.checkpoint = save()
        raise
