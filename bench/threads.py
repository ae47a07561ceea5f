"""Threads under contention: torch's intra-op threads (1 vs 2) and the OpenMP wait policy, for a training step
and a generation batch of the testbed and SmolLM2-135M, alone and beside one competing CPU-bound process.

Each configuration runs in a fresh child process (the OpenMP runtime reads its settings once, at start).
torch's CPU wheel uses GNU OpenMP (libgomp): OMP_NUM_THREADS, OMP_WAIT_POLICY (active: spin at barriers;
passive: sleep; unset: spin a while, then sleep) and GOMP_SPINCOUNT apply; Intel's KMP_* settings do not
(libiomp is not loaded). The competitor is a `nice -n 19` Python busy loop (or `--competitor torch`: a
`nice -n 19` 2-thread matmul loop), started before the child and killed after it.

For each workload and configuration: median seconds alone and with the competitor, and the slowdown. A
competitor may cost its share of the CPU; on 2 cores with a nice-19 competitor a fair scheduler should cost a
2-thread job little and a 1-thread job nothing. Prints `RATIO threads_<workload>_<config>_slowdown=…` and
`RATIO threads_<workload>_<config>_vs_default=…` (time of the config / time of torch's defaults, both with the
competitor). The machine's load average is printed with every row: other users' jobs count as load too.

    python bench/threads.py [--workloads testbed_train testbed_gen smollm2_train smollm2_gen] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

CONFIGS = {  # name -> environment of the child
    "default": {},                                         # ponder < this change: torch's defaults (2 threads)
    "t2_passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "t2_active": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "t1": {"OMP_NUM_THREADS": "1"},
    "ponder": {"PONDER_RUNTIME": "1"},                     # ponder.runtime.configure() in the child
}
TIMEOUT = 300  # seconds per child (warm-up + repeats); slower counts as TIMEOUT / (repeats + 1) per repeat
WORKLOADS = ("testbed_train", "testbed_gen", "smollm2_train", "smollm2_gen")


def child(workload: str, repeats: int) -> None:
    """Time one workload in this process; print one JSON line."""
    if os.environ.get("PONDER_RUNTIME"):
        from ponder import runtime
        runtime.configure()
    import torch

    from ponder import chat, models, rollout
    spec = "testbed" if workload.startswith("testbed") else "smollm2-135m"
    model, tok = models.load(spec)
    qs = [f"What is {17 + i}+{23 * i}*{i % 7 + 2}?" for i in range(64)]
    if workload.endswith("train"):
        bs, length = (16, 128) if spec == "testbed" else (4, 64)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, len(tok), (bs, length), generator=g)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model.train()

        def step():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    else:
        bs, new = (64, 32) if spec == "testbed" else (8, 16)
        pids = [chat.generation_prompt(tok, [{"role": "user", "content": q}]) for q in qs[:bs]]

        def step():
            rollout.sample(model, tok, pids, temperature=0.0, max_new_tokens=new, batch_size=bs, progress=False,
                           suppress_eos=True)
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(json.dumps({"seconds": statistics.median(times), "threads": torch.get_num_threads()}), flush=True)


COMPETITORS = {
    "busy": "while True: pass",
    "torch": "import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\nwhile True: a @ a",
}


def run(workload: str, config: str, competitor: str | None, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(CONFIGS[config])
    comp = None
    if competitor:
        comp = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", COMPETITORS[competitor]],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.5)
    load = os.getloadavg()[0]
    try:
        out = subprocess.run([sys.executable, __file__, "--child", workload, "--repeats", str(repeats)], env=env,
                             capture_output=True, text=True, check=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:  # a configuration that stalls this badly is reported as the timeout
        return {"seconds": float(TIMEOUT) / (repeats + 1), "threads": CONFIGS[config].get("OMP_NUM_THREADS", "?"),
                "load": load, "timeout": True}
    finally:
        if comp is not None:
            os.killpg(comp.pid, signal.SIGKILL)  # only the competitor we started (its own session)
            comp.wait()
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["load"] = load
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--competitor", default="busy", choices=list(COMPETITORS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=WORKLOADS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.repeats)
    print(f"{os.cpu_count()} cores, affinity {len(os.sched_getaffinity(0))}, competitor: nice -n 19 "
          f"{args.competitor}; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    ratios = []
    for w in args.workloads:
        res = {}
        for c in args.configs:  # alone and contended back to back, so both see similar background load
            alone = run(w, c, None, args.repeats)
            cont = run(w, c, args.competitor, args.repeats)
            res[c] = (alone, cont)
            mark = " (timed out: at least)" if cont.get("timeout") or alone.get("timeout") else ""
            print(f"{w:14s} {c:11s} threads {alone['threads']}: alone {alone['seconds']:7.3f}s (load "
                  f"{alone['load']:.1f})  with competitor {cont['seconds']:7.3f}s (load {cont['load']:.1f})  "
                  f"slowdown x{cont['seconds'] / alone['seconds']:.2f}{mark}", flush=True)
        base = res.get("default", next(iter(res.values())))[1]["seconds"]
        for c, (alone, cont) in res.items():
            ratios.append((f"threads_{w}_{c}_slowdown", cont["seconds"] / alone["seconds"]))
            ratios.append((f"threads_{w}_{c}_vs_default", cont["seconds"] / base))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    for k, v in ratios:
        print(f"RATIO {k}={v:.3f}")


if __name__ == "__main__":
    main()
