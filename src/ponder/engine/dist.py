"""Several processes (`accelerate launch`, `torchrun`): this process's rank, its share of a list of work, and
the results of every process gathered in the original order — one process gets the same answers with no
communication.

Work is cut into *units* (consecutive items); unit u goes to rank u mod world and is seeded by
`unit_seed(seed, u)`. With the default (one unit per process) a single process has one unit seeded by `seed`
itself, so its results are what they were before units existed; a fixed `unit_size` makes results independent
of the number of processes (the same units, the same seeds, whichever process runs them).
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from accelerate import PartialState

T = TypeVar("T")
R = TypeVar("R")


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shutdown() -> None:
    """Tear the process group down before the interpreter's teardown: left to it, gloo's threads can abort a
    process whose work succeeded ("terminate called without an active exception", exit -6; seen on rank 0 of a
    2-process CPU launch at exit). Registered with atexit; a no-op without a process group."""
    if _initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # exiting anyway: a group the launcher already tore down is not an error
            pass


atexit.register(shutdown)


def rank() -> int:
    """This process's global rank (0 without a launcher; read from the launcher's RANK before the process group
    exists)."""
    return torch.distributed.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def world() -> int:
    return torch.distributed.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0: the only process that writes a run's files (reports, metrics, plots, trajectories)."""
    return rank() == 0


def _group_ready() -> bool:
    if world() == 1:
        return False
    if not _initialized():  # before any config built the process group: accelerate's shared state builds it
        PartialState(cpu=not torch.cuda.is_available())
    return True


def barrier() -> None:
    if _group_ready():
        torch.distributed.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, by rank, on every rank (picklable objects; `[obj]` in one process)."""
    if not _group_ready():
        return [obj]
    out: list[Any] = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _group_ready():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def units(n: int, unit_size: int | None = None, processes: int | None = None) -> list[range]:
    """Cut n items into consecutive units: of `unit_size` items, or (None) one unit per process."""
    processes = processes or world()
    size = unit_size or max(math.ceil(n / processes), 1)
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


def unit_seed(seed: int, unit: int) -> int:
    """The seed of work unit `unit` (unit 0 keeps `seed`; units are ~1e6 apart, clear of per-turn offsets)."""
    return seed + 1_000_003 * unit


def map_units(fn: Callable[[list[T], int], list[R]], items: Sequence[T], seed: int, unit_size: int | None = None
              ) -> list[R]:
    """`fn(unit_items, unit_seed)` -> one result per item, for this rank's units (u ≡ rank mod world); the
    results of every unit gathered on every rank, in item order. No item is done twice or dropped."""
    items = list(items)
    cut = units(len(items), unit_size)
    mine = {u: fn([items[i] for i in r], unit_seed(seed, u)) for u, r in enumerate(cut) if u % world() == rank()}
    for u, res in mine.items():
        if len(res) != len(cut[u]):
            raise RuntimeError(f"work unit {u}: {len(res)} results for {len(cut[u])} items")
    done: dict[int, list[R]] = {}
    for part in gather(mine):
        done.update(part)
    return [x for u in range(len(cut)) for x in done[u]]
