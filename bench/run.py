"""The benchmark runner (`make bench`, `ponder bench`): runs bench/*.py one after another (never in parallel:
they time things), keeps their output and `RATIO name=value` lines, and writes bench/results.md with the
machine, date and commands — rewritten after every script, so a failure later on loses nothing.

    python bench/run.py [--only NAME ...] [--out bench/results.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from ponder import ui
from ponder.engine import runtime


def parse_ratios(stdout: str) -> tuple[dict[str, float], list[str]]:
    """`RATIO name=value [# comment]` lines -> {name: value}; lines that do not parse are returned, not fatal."""
    ratios, bad = {}, []
    for ln in stdout.splitlines():
        if ln.startswith("RATIO "):
            name, _, rest = ln[6:].partition("=")
            try:
                ratios[name.strip()] = float(rest.split("#")[0].split()[0])
            except (ValueError, IndexError):
                bad.append(ln)
    return ratios, bad


def run_benchmarks(only: list[str], out: Path) -> dict[str, float]:
    """Run bench/*.py one after another (never in parallel: they time things), keep their output and the
    `RATIO name=value` lines, and write a Markdown summary with the machine, date and commands — rewritten after
    every script, so a failure later on loses nothing."""
    scripts = sorted(p for p in Path("bench").glob("*.py") if p.stem != "run")
    if only:
        scripts = [s for s in scripts if s.stem in only]
    sections: dict[str, str] = {}
    if only and out.exists():  # --only: replace those scripts' sections, keep the others
        for part in out.read_text().split("\n## ")[1:]:
            sections[part.split("\n", 1)[0].strip()] = "## " + part.rstrip() + "\n"
    failed = []
    head = [f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  ",
            f"Machine: {runtime.describe(runtime.machine())} at the start, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}  ",
            f"Command: `make bench` (or `ponder bench{''.join(' --only ' + o for o in only)}`)\n"]
    for script in scripts:
        cmd = [sys.executable, str(script)]
        ui.info(f"[bold]bench[/] {' '.join(cmd)}")
        t = time.time()
        # wide enough that rich tables are not squeezed into 80 columns when captured
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        _, bad = parse_ratios(proc.stdout)
        if proc.returncode:
            failed.append(script.stem)
        body = proc.stdout.strip() if proc.returncode == 0 else (proc.stdout + proc.stderr)[-4000:]
        warn = "".join(f"\nUnparsed: `{ln}`" for ln in bad)
        sections[script.stem] = (f"## {script.stem}\n\n`{' '.join(cmd)}` — {time.time() - t:.0f} s, exit "
                                 f"{proc.returncode}{warn}\n\n```\n{body}\n```\n")
        ratios: dict[str, float] = {}
        for sec in sections.values():
            ratios.update(parse_ratios(sec)[0])
        table = ["| ratio | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
        status = [f"Failed: {', '.join(failed)}\n"] if failed else []
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("\n".join(["# Benchmarks\n", *head, *status, *table]) + "\n\n" + "\n".join(sections.values()))
        os.replace(tmp, out)
    ui.info(f"wrote {out}" + (f"   [red]failed: {', '.join(failed)}[/]" if failed else ""))
    return {k: v for sec in sections.values() for k, v in parse_ratios(sec)[0].items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=[], help="bench names (default: every bench/*.py)")
    ap.add_argument("--out", type=Path, default=Path("bench/results.md"))
    a = ap.parse_args()
    run_benchmarks(a.only, a.out)
