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


@pytest.mark.parametrize("kernels,amx,avx512_bf16,want", [
    ("AVX512", True, True, True),      # Intel Sapphire Rapids and later
    ("AVX512", False, True, True),     # AMD Zen 4
    ("AVX512", False, False, False),   # AVX-512 without native bf16 dot products
    ("AVX2", True, True, False),       # kernels forced below AVX512 (ATEN_CPU_CAPABILITY): no bf16 path
    ("AVX2", False, False, False),     # AMD AVX2 boxes: bf16 measured 3-4x slower
])
def test_bf16_pays_only_where_the_cpu_has_native_bf16_and_torch_uses_it(kernels, amx, avx512_bf16, want):
    if torch.cuda.is_available():
        pytest.skip("the CPU rule; a GPU answers by torch.cuda.is_bf16_supported")
    m = {"cpu": "x", "kernels": kernels, "amx": amx, "avx512_bf16": avx512_bf16, "threads": 1, "load": 0.0}
    assert runtime.bf16_pays(m) is want


def test_dtype_auto_trains_fp32_master_weights_under_bf16_autocast_where_it_pays(tmp_path, monkeypatch):
    """dtype: auto resolves to HF's bf16 mixed precision (fp32 weights and optimizer, bf16 autocast) where the
    rule says so and to plain fp32 elsewhere; the bf16 run's losses stay within 2% of fp32's (bf16 has 8
    significand bits: 0.4% per rounding) and its weights stay fp32."""
    from ponder.trainers.sft import SFTConfig, SFTTrainer
    losses, dtypes = {}, {}
    for pays in (False, True):
        monkeypatch.setattr(runtime, "bf16_pays", lambda m=None, pays=pays: pays)
        cfg = SFTConfig(output_dir=str(tmp_path / str(pays)), model="tiny-random", dataset="testbed:single",
                        dtype="auto", max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
        assert cfg.dtype == "float32" and cfg.bf16 is pays
        tr = SFTTrainer(args=cfg)
        tr.train()
        losses[pays] = [h["loss"] for h in tr.state.log_history if "loss" in h]
        dtypes[pays] = {p.dtype for p in tr.model.parameters()}
        assert (tr.accelerator.mixed_precision == "bf16") is pays
    assert dtypes[True] == dtypes[False] == {torch.float32}
    assert len(losses[True]) == 4
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) <= 0.02 * abs(b), (losses[True], losses[False])
    assert losses[True] != losses[False]  # autocast really ran in bf16


def test_busy_cores_counts_other_processes_running_now():
    assert 0 <= runtime.busy_cores(samples=2, interval=0.0) < 4096
