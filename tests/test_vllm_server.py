"""Server mode on 127.0.0.1 with the real vLLM server (`ponder vllm-serve`'s command): greedy ids equal HF
`generate`, a push after an optimizer step is followed, a killed server gives a one-line error and a restarted
one gets the weights again before it samples, an address nobody listens on is one line. Bounded in time; the
server's process group is killed at the end, pass or fail."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from ponder import models, rollout, testbed, vllm_engine, vllm_server

sys.path.insert(0, str(Path(__file__).parent))
from real_engine import fields, marks, require  # noqa: E402

pytestmark = marks("server", pytest.mark.timeout(600))
QS = [f"What is {17 + i}+{23 * i}*{i % 7 + 2}?" for i in range(8)]
GREEDY = dict(temperature=0.0, max_new_tokens=32, progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port, log):
    argv, env = vllm_server.serve_command(str(testbed.weights_dir()), port=port, kv_cache_gb=1.0)
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, f"vllm server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    raise AssertionError("vllm server not ready in 240 s")


def stop(proc):
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_server_generate_push_restart(tmp_path, monkeypatch):
    require()
    port = free_port()
    monkeypatch.setenv("PONDER_VLLM_SERVER", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("PONDER_VLLM_SHARED_DIR", str(tmp_path / "shared"))
    model, tok = models.load("testbed")
    proc = None
    with open(tmp_path / "server.log", "wb") as log:
        try:
            proc = start(port, log)
            ref = lambda: rollout.sample(model, tok, QS, backend="generate", **GREEDY)  # noqa: E731
            got = rollout.sample(model, tok, QS, backend="vllm-server", **GREEDY)
            engine = vllm_server.current()
            assert fields(got) == fields(ref()) and engine.pushes == 1
            assert engine.last_probe_error < vllm_engine.PROBE_TOL[torch.float32]
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)  # fused: no version bumps
            for q in QS[:2]:
                ids = torch.tensor([rollout.prompt_ids(tok, q) + [5, 6, 7]])
                model(ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
            after = rollout.sample(model, tok, QS, backend="vllm-server", **GREEDY)
            assert fields(after) == fields(ref()) and fields(after) != fields(got) and engine.pushes == 2
            # killed: one line, no traceback of urllib's
            stop(proc)
            with pytest.raises(vllm_server.ServerUnreachable) as e:
                rollout.sample(model, tok, QS, backend="vllm-server", **GREEDY)
            assert "\n" not in str(e.value) and f"vllm server at http://127.0.0.1:{port} is unreachable" in str(e.value)
            # restarted (its start-up weights): pushed again before it samples
            proc = start(port, log)
            assert fields(rollout.sample(model, tok, QS, backend="vllm-server", **GREEDY)) == fields(ref())
            assert engine.pushes == 3
        finally:
            stop(proc)
            vllm_server.set_engine(None)


def test_unreachable_server_is_one_line(monkeypatch):
    monkeypatch.setenv("PONDER_VLLM_SERVER", f"http://127.0.0.1:{free_port()}")
    vllm_server.set_engine(None)
    model, tok = models.load("tiny-random")
    with pytest.raises(vllm_server.ServerUnreachable) as e:
        rollout.sample(model, tok, ["hi"], backend="vllm-server", max_new_tokens=4, progress=False)
    assert "\n" not in str(e.value) and "start it with `ponder vllm-serve MODEL`" in str(e.value)
    vllm_server.set_engine(None)
    monkeypatch.setenv("PONDER_VLLM_SERVER", "localhost:8000")
    with pytest.raises(ValueError, match="PONDER_VLLM_SERVER must be an http"):
        rollout.check_backend("vllm-server")
