"""What the real-vLLM tests (test_vllm_real.py, test_vllm_server.py) share: their marks — skipped with the reason
where vLLM cannot run, a failure instead under PONDER_REQUIRE_VLLM=1 (CI's `make test-engine`) — and the sample
fields two backends must agree on."""

import os

import pytest

from ponder import vllm_engine

REASON = vllm_engine.unavailable_reason()
REQUIRED = os.environ.get("PONDER_REQUIRE_VLLM") == "1"


def marks(what: str, *extra) -> list:
    return [pytest.mark.engine, *extra,
            pytest.mark.skipif(REASON is not None and not REQUIRED, reason=f"real vLLM {what}: {REASON}")]


def require() -> None:
    """In a fixture: CI asked for the engine and it cannot run here -> fail, never a silent skip."""
    if REASON and REQUIRED:
        pytest.fail(f"PONDER_REQUIRE_VLLM=1 but {REASON}")


def fields(rows):
    return [[(s.prompt_index, s.prompt_ids, s.ids, s.text, s.finish_reason, s.stop_index, s.stop) for s in r]
            for r in rows]
