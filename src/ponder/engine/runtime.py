"""Thread settings for a shared CPU machine (docs/methods.md §6.4), applied once by the `ponder` command before
torch is imported.

torch's CPU build runs its intra-op threads on GNU OpenMP (libgomp). By default an idle libgomp thread spins
at every barrier before it sleeps; when another process holds a core, the spinning thread and the thread it
waits for take turns on the same core and every parallel region stalls. Measured with bench/threads.py on this
2-core machine beside other users' jobs: a testbed training step took 5.7 s with the defaults and 0.33 s with
``OMP_WAIT_POLICY=PASSIVE`` (1 thread: 0.67 s); with the policy forced to ACTIVE, 12 s beside a `nice 19`
busy loop. Beside heavy load even passive threads wait for each other: one thread was then as fast or
faster (0.73 s vs 1.44 s), while on a quiet machine two threads are up to 2x faster than one. So ponder sets the
passive policy (threads sleep at barriers) and one thread per core it may run on (`os.sched_getaffinity`)
that other processes do not already keep busy (the whole part of the 1-minute load average at start).

Overrides: an ``OMP_WAIT_POLICY`` already set in the environment is kept; ``PONDER_THREADS=N`` (or else
``OMP_NUM_THREADS``) sets torch's intra-op threads. Intel OpenMP's ``KMP_*`` settings do nothing here:
torch's wheel does not load libiomp.
"""

from __future__ import annotations

import os
import sys


def threads_wanted(environ=os.environ, load: float | None = None) -> int:
    """PONDER_THREADS if set, else OMP_NUM_THREADS if set, else the cores this process may run on minus the
    cores other processes keep busy (the whole part of the 1-minute load average, read at start), at least 1."""
    for key in ("PONDER_THREADS", "OMP_NUM_THREADS"):
        raw = environ.get(key, "").strip()
        if raw:
            if not raw.isdigit() or int(raw) < 1:
                raise ValueError(f"{key} must be a positive integer, got {raw!r}")
            return int(raw)
    load = os.getloadavg()[0] if load is None else load
    return max(1, len(os.sched_getaffinity(0)) - int(load))


def configure(environ=os.environ) -> dict[str, str | int | bool]:
    """Set the passive OpenMP wait policy (effective only before torch is first imported: the OpenMP runtime
    reads it once) and torch's intra-op threads. Returns what was applied."""
    late = "torch" in sys.modules
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    n = threads_wanted(environ)
    environ["OMP_NUM_THREADS"] = str(n)
    if late:  # the caller already imported torch: only the thread count can still change
        sys.modules["torch"].set_num_threads(n)
    return {"wait_policy": environ["OMP_WAIT_POLICY"], "threads": n, "wait_policy_applied": not late}
