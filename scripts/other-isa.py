"""Print the ATEN_CPU_CAPABILITY that gives torch's kernels another instruction set than this CPU's default
(avx2 on an AVX-512 box, default — no vector kernels — on an AVX2 box), and say on stderr what this CPU is.
`make test-portable` reruns the tests that compare two computations under it, so a tolerance that holds only
with one CPU's kernels fails here before it fails for a user on another CPU."""

import platform
import sys
from pathlib import Path

import torch

native = torch.backends.cpu.get_cpu_capability()  # AVX512, AVX2 or DEFAULT (run without ATEN_CPU_CAPABILITY)
other = "avx2" if native == "AVX512" else "default"
model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
    platform.processor()
print(f"cpu: {model}; torch kernels {native} natively, {other.upper()} in this pass", file=sys.stderr)
print(other)
