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

Also the machine's measured constants (`measured`): numbers a rule needs that differ between CPUs (the attention
path's costs, docs/methods.md §6.3), measured once per machine and kept in one JSON file per kind under
`cache_dir()`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ponder import ui


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


def machine() -> dict[str, str | int | float]:
    """What a timing or a result was measured on: CPU model, the instruction set torch's kernels use (AVX512,
    AVX2, DEFAULT; ATEN_CPU_CAPABILITY can force a lower one), whether the CPU has AMX / AVX512-BF16, torch's
    thread count and the 1-minute load average now."""
    import platform

    import torch
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:  # not Linux: the platform's word is all there is
        pass
    return {"cpu": model, "kernels": torch.backends.cpu.get_cpu_capability(),
            "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "threads": torch.get_num_threads(), "load": round(os.getloadavg()[0], 1)}


def describe(m: dict) -> str:
    """`machine()` in a sentence for a report."""
    extra = ", AMX" if m["amx"] else ", AVX512-BF16" if m["avx512_bf16"] else ""
    threads = f"{m['threads']} thread" + ("s" if m["threads"] != 1 else "")
    return f"{m['cpu']} ({m['kernels']} kernels{extra}), {threads}, load {m['load']}"


def bf16_pays(m: dict | None = None) -> bool:
    """Whether bf16 autocast (fp32 master weights) is the faster way to train here — the rule behind ``dtype:
    auto`` (docs/methods.md §6.5). A CUDA GPU with bf16; a CPU whose torch kernels are AVX512 and that has native
    bf16 dot products: AMX (Intel Sapphire Rapids and later: bf16 matmul 4-6x the fp32 rate, a SmolLM2 train step
    2.1-2.5x faster) or AVX512-BF16 (AMD Zen 4: 2.2x the fp32 matmul rate, a SmolLM2 train step 1.7x faster;
    bench/efficiency.py). Without them (AVX2 boxes) bf16 was measured 3-4x slower than fp32."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    m = m or machine()
    return m["kernels"] == "AVX512" and bool(m["amx"] or m["avx512_bf16"])


def cache_dir(environ=os.environ) -> Path:
    """Where the measured constants live: ``$PONDER_HOME`` (ponder's cache of built models too), else
    ``$XDG_CACHE_HOME/ponder``, else ``~/.cache/ponder``."""
    if environ.get("PONDER_HOME"):
        return Path(environ["PONDER_HOME"])
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ponder"


#: The constants measured or read in this process, by file and key: each is measured at most once per process.
MEASURED: dict[tuple[str, str], dict[str, float]] = {}


@functools.cache
def machine_id() -> tuple[tuple[str, str], ...]:
    """What makes timings differ between machines: CPU model, torch's instruction set, torch version (read once
    per process)."""
    import torch
    m = machine()
    return (("cpu", m["cpu"]), ("kernels", m["kernels"]), ("torch", torch.__version__))


def machine_key(key: dict) -> str:
    """`key` plus `machine_id()`, as the cache's JSON key."""
    return json.dumps({**dict(machine_id()), **key}, sort_keys=True)


def _valid(entry, names: Sequence[str]) -> bool:
    return (isinstance(entry, dict) and set(entry) == set(names)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                    for v in entry.values()))


def busy_cores(samples: int = 5, interval: float = 0.01) -> int:
    """Cores other processes keep busy right now: the fewest runnable tasks over a few samples of
    /proc/loadavg, less this process's own (0 where there is no /proc)."""
    fewest = None
    for i in range(samples):
        try:
            with open("/proc/loadavg", encoding="utf-8") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        fewest = running if fewest is None else min(fewest, running)
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, (fewest or 1) - 1)


def measured(kind: str, key: dict, measure: Callable[[], dict[str, float]], names: Sequence[str], threads: int = 1,
             fallback: dict[str, float] | None = None) -> dict[str, float]:
    """The constants `names` for `key` on this machine: from this process's memo, else from
    ``cache_dir()/<kind>.json``, else `measure()` (then saved there). A file that cannot be read or holds
    something else is ignored with a one-line warning (and rewritten); one that cannot be written too.

    A timing taken while other processes hold the cores it runs on measures them, not this machine: when fewer
    than `threads` cores are free (`busy_cores`), `fallback` (if given) serves this process and nothing is
    measured or saved; a later process measures."""
    k = machine_key(key)
    if (kind, k) in MEASURED:
        return MEASURED[kind, k]
    path = cache_dir() / f"{kind}.json"
    table = {}
    if path.exists():
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(table, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            ui.warn(f"ignoring the unreadable cache {path} ({type(e).__name__}: {e}); measuring again")
            table = {}
    entry = table.get(k)
    if entry is not None and not _valid(entry, names):
        ui.warn(f"ignoring a malformed entry in {path}; measuring again")
        entry = None
    if entry is None and fallback is not None and threads > len(os.sched_getaffinity(0)) - busy_cores():
        ui.info(f"{kind}: other processes keep the cores busy; using the built-in values in this process")
        MEASURED[kind, k] = dict(fallback)
        return MEASURED[kind, k]
    if entry is None:
        entry = {n: float(v) for n, v in measure().items()}
        table[k] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            ui.warn(f"could not save {path} ({type(e).__name__}: {e}); the measurement holds for this process only")
    MEASURED[kind, k] = entry
    return entry
