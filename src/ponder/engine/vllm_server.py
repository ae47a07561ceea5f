"""The ``vllm-server`` rollout backend: a vLLM OpenAI server in its own process (``ponder vllm-serve``, as TRL's
``vllm-serve``), reached over HTTP, so rollouts can run on another machine or another device than training.

Weights travel without NCCL: the trainer writes its full state (`vllm_engine.full_state`: tied weights
included, PEFT merged) as safetensors into a directory both sides see (``PONDER_VLLM_SHARED_DIR``), then asks
the server to ``reload_weights`` from it (vLLM's ``/collective_rpc`` dev endpoint, on with
``VLLM_SERVER_DEV_MODE=1``, which `serve_command` sets) and resets its prefix cache. The push is checked as in
the colocated backend (the server's prompt log-probs of a probe sequence against the trainer's): a failed or
disagreeing push leaves the engine refusing to sample until a later push passes.

A server that restarted (its process start time changed) is re-pushed before it samples; one that is down
gives a one-line `ServerUnreachable`. Sampling sends one completions request per sample (its own seed), with
token-id prompts and ``return_token_ids``; stop strings are applied afterwards by `rollout._cut`, so the
server needs no tokenizer of ours. Settings: ``PONDER_VLLM_SERVER`` (default ``http://127.0.0.1:8000``),
``PONDER_VLLM_SHARED_DIR`` (default: a folder under the system temp dir, right only when both run here),
``PONDER_VLLM_SERVER_TIMEOUT`` (seconds per request, default 600).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import torch

from ponder.engine import models, testbed
from ponder.engine.vllm_engine import (
    Completion,
    EngineBroken,
    Sampling,
    VLLMEngine,
    positive_env,
    runs_on_cpu,
    sampling_kwargs,
    step_settings,
)

SERVED_NAME = "ponder"
DEFAULT_URL = "http://127.0.0.1:8000"


class ServerUnreachable(RuntimeError):
    """The vLLM server did not answer (down, restarting, wrong address)."""


def settings() -> tuple[str, Path, float]:
    """(server URL, shared directory, request timeout) from the environment; a malformed value fails in one
    line."""
    url = os.environ.get("PONDER_VLLM_SERVER", DEFAULT_URL).rstrip("/")
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"PONDER_VLLM_SERVER must be an http(s) URL such as {DEFAULT_URL}, got {url!r}")
    shared = Path(os.environ.get("PONDER_VLLM_SHARED_DIR") or Path(tempfile.gettempdir()) / "ponder-vllm-shared")
    timeout = positive_env("PONDER_VLLM_SERVER_TIMEOUT", "seconds", ValueError, default="600")
    return url, shared, timeout


def model_dir(spec: str) -> Path:
    """The folder a server starts from: the testbed's, SmolLM2's converted copy, or a save_pretrained folder."""
    if spec == "testbed":
        return testbed.weights_dir()
    if spec == "smollm2-135m":
        return models.smollm2_dir()
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ValueError(f"--model must be testbed, smollm2-135m or a folder written by save_pretrained; {spec!r} "
                         "is none of these")
    return path


def serve_command(model_dir: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32",
                  kv_cache_gb: float = 1.0, eager: bool = True, max_model_len: int | None = None,
                  cpu: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a vLLM OpenAI server for the vllm-server backend (its dev endpoints on,
    HF generation defaults off so the request's stop ids are the only ones; on a CPU (`cpu`, default: this
    machine has no CUDA) whole prefills only, `vllm_engine.step_settings`)."""
    if cpu is None:
        cpu = runs_on_cpu()
    conf = Path(model_dir) / "config.json"
    longest = max_model_len or (json.loads(conf.read_text()).get("max_position_embeddings", 0) if conf.is_file() else 0)
    step, chunked = step_settings(cpu, int(longest or 0))
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", SERVED_NAME, "--host", host, "--port", str(port), "--dtype", dtype,
            "--kv-cache-memory-bytes", str(int(kv_cache_gb * 2 ** 30)), "--generation-config", "vllm",
            "--max-num-batched-tokens", str(step), "--disable-uvicorn-access-log"]
    if not chunked:
        argv.append("--no-enable-chunked-prefill")
    if eager:
        argv.append("--enforce-eager")
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    return argv, env


class ServerEngine(VLLMEngine):
    """`VLLMEngine`'s checked push and sampling, against a vLLM server."""

    def __init__(self, url: str, shared: Path, timeout: float = 600.0, shape: tuple | None = None):
        super().__init__(llm=None, sampling_params_cls=dict, path=url, shape=shape)
        self.url, self.shared, self.timeout = url, Path(shared), timeout
        self.identity: str | None = None

    def _request(self, path: str, body: dict | None = None, timeout: float | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300].replace("\n", " ")
            raise RuntimeError(f"vllm server {self.url}{path} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            self.pushed = None  # whatever comes back up there must get the weights again
            reason = getattr(e, "reason", e)
            raise ServerUnreachable(f"vllm server at {self.url} is unreachable ({reason}); start it with "
                                    "`ponder vllm-serve MODEL` or set PONDER_VLLM_SERVER") from None

    def _json(self, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        return json.loads(self._request(path, body, timeout) or b"{}")

    def server_identity(self) -> str:
        """The server process's start time (Prometheus' process_start_time_seconds): changes on a restart."""
        text = self._request("/metrics", timeout=30).decode()
        m = re.search(r"^process_start_time_seconds\s+(\S+)", text, re.M)
        return m.group(1) if m else ""

    def _complete(self, body: dict) -> dict:
        return self._json("/v1/completions", dict(model=SERVED_NAME, return_token_ids=True, **body))["choices"][0]

    def generate(self, prompts_ids: Sequence[Sequence[int]], params: Sampling, seeds: Sequence[int]
                 ) -> list[Completion]:
        if self.broken:
            raise EngineBroken(self.broken)
        if len(seeds) != len(prompts_ids):
            raise ValueError("one seed per prompt")
        spec = Sampling(params.max_new_tokens, params.temperature, params.top_p, params.top_k, (),
                        params.stop_token_ids, params.ignore_eos)  # stop strings: cut afterwards by _cut

        def one(args):
            p, s = args
            kw = sampling_kwargs(spec, int(s))
            kw.pop("stop")
            c = self._complete(dict(prompt=list(p), **kw))
            return Completion(list(c["token_ids"]), c.get("finish_reason"), c.get("stop_reason"))
        with ThreadPoolExecutor(max_workers=min(64, max(1, len(prompts_ids)))) as pool:
            return list(pool.map(one, zip(prompts_ids, seeds)))

    def engine_logprobs(self, ids: Sequence[int]) -> torch.Tensor:
        c = self._complete(dict(prompt=list(ids), max_tokens=1, temperature=0.0, prompt_logprobs=0))
        rows = c["prompt_logprobs"][1:]
        return torch.tensor([row[str(t)]["logprob"] for row, t in zip(rows, ids[1:])])

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file
        self.shared.mkdir(parents=True, exist_ok=True)
        self.pushes_written = getattr(self, "pushes_written", 0) + 1
        target = self.shared / f"weights-{os.getpid()}-{self.pushes_written}"
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        seen: set[int] = set()
        out = {}
        for k, v in state.items():  # tied tensors share storage, which safetensors refuses: a copy each, since
            t = v.detach().to("cpu")  # vLLM's layer-wise reload wants every layer's own name (lm_head too)
            out[k] = t.clone() if t.data_ptr() in seen else t.contiguous()
            seen.add(t.data_ptr())
        save_file(out, str(tmp / "model.safetensors"))
        tmp.rename(target)  # the server never sees a half-written file
        for old in self.shared.glob(f"weights-{os.getpid()}-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
        self._json("/collective_rpc", dict(method="reload_weights", kwargs=dict(weights_path=str(target))))

    def _reset(self) -> None:
        self._request("/reset_prefix_cache", {})

    def ensure_synced(self, model) -> bool:
        ident = self.server_identity()
        if ident != self.identity:
            self.pushed = None  # a restarted server holds its start-up weights
        pushed = super().ensure_synced(model)
        self.identity = ident
        return pushed

    def close(self) -> None:
        pass


_SERVER: list[ServerEngine] = []


def set_engine(engine: ServerEngine | None) -> None:
    _SERVER[:] = [engine] if engine is not None else []


def current() -> ServerEngine | None:
    return _SERVER[0] if _SERVER else None


def engine_for(model) -> ServerEngine:
    """The process's server client (one per address)."""
    url, shared, timeout = settings()
    if not _SERVER or _SERVER[0].url != url:
        set_engine(ServerEngine(url, shared, timeout))
    return _SERVER[0]
