"""Thread settings for a shared machine: the passive OpenMP wait policy and the thread count, with overrides."""

import os
import subprocess
import sys

import pytest
import torch

from ponder import runtime


def test_defaults_and_overrides():
    env = {}
    got = runtime.configure(env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and 1 <= got["threads"] <= len(os.sched_getaffinity(0))
    cores = len(os.sched_getaffinity(0))
    assert runtime.threads_wanted({}, load=0.7) == cores            # a quiet machine: every core
    assert runtime.threads_wanted({}, load=1.2) == max(1, cores - 1)  # one busy process: leave it its core
    assert runtime.threads_wanted({}, load=40.0) == 1
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    assert runtime.configure(env)["threads"] == 1 and env["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's settings
    env = {"OMP_NUM_THREADS": "1", "PONDER_THREADS": "3"}
    assert runtime.configure(env)["threads"] == 3 and env["OMP_NUM_THREADS"] == "3"


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_bad_thread_count_is_one_line(bad):
    with pytest.raises(ValueError, match=f"PONDER_THREADS must be a positive integer, got '{bad}'"):
        runtime.configure({"PONDER_THREADS": bad})


def test_late_call_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        got = runtime.configure({"PONDER_THREADS": "1"})
        assert torch.get_num_threads() == 1 and got["wait_policy_applied"] is False  # torch is already loaded
    finally:
        torch.set_num_threads(before)


def test_the_command_configures_before_torch_loads():
    """`ponder` sets the policy before anything imports torch, so libgomp reads it (checked in a fresh process)."""
    code = ("import os, sys; from ponder import cli, runtime; assert 'torch' not in sys.modules; "
            "r = runtime.configure(); import torch; "
            "print(r['wait_policy_applied'], os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "PONDER_THREADS")}
    env["PONDER_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "PASSIVE", "1"]


def test_the_command_reports_a_bad_thread_count_in_one_line():
    env = dict(os.environ, PONDER_THREADS="two")
    r = subprocess.run([sys.executable, "-m", "ponder.cli", "--help"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: PONDER_THREADS must be a positive integer, got 'two'"
