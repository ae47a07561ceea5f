"""Arithmetic for tests that compare two computations: fp64 end to end, so a tolerance can be derived from the
arithmetic instead of read off one CPU.

transformers' LlamaRMSNorm casts to fp32 even in an fp64 model: every comparison of two computations that
differ in reduction order (a tree vs separate passes, 2 processes vs 1, 1 thread vs 2, AVX2 vs AVX-512 kernels)
then carries fp32 rounding (~1e-7 relative) into the gradients. `rmsnorm_fp64` computes the norm in the input's
dtype; `exact_norm()` installs it on the class (every model built afterwards, in this process), and
tests/launch_runs.py installs it in launched processes when PONDER_TEST_EXACT_NORM=1.
"""

import contextlib
import os

import torch

U64 = 2.0 ** -53  # unit roundoff of fp64


def rmsnorm_fp64(self, h):
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@contextlib.contextmanager
def exact_norm():
    """LlamaRMSNorm in the input's dtype while the block runs (and in every process it launches)."""
    from transformers.models.llama import modeling_llama
    old, env = modeling_llama.LlamaRMSNorm.forward, os.environ.get("PONDER_TEST_EXACT_NORM")
    modeling_llama.LlamaRMSNorm.forward = rmsnorm_fp64
    os.environ["PONDER_TEST_EXACT_NORM"] = "1"
    try:
        yield
    finally:
        modeling_llama.LlamaRMSNorm.forward = old
        if env is None:
            os.environ.pop("PONDER_TEST_EXACT_NORM", None)
        else:
            os.environ["PONDER_TEST_EXACT_NORM"] = env


# Two fp64 AdamW runs that add the same gradients in another order (2 processes vs 1, another thread split or
# instruction set): a reordered sum differs by ~u relative (u = 2^-53 in fp64, 2^-24 in fp32), and AdamW's step
# m̂/(√v̂ + ε) amplifies a gradient difference by up to 1/ε where a gradient element is near 0 — how fp32 runs
# on another CPU ended 1e-5 apart after a few steps at lr 1e-2. The amplification is the same in fp64, so the
# same drift scales by u64/u32 = 2^-29 to ~2e-14; the tolerance leaves a factor 5e4 above that for other CPUs
# and stays ~1e7 below the lr-sized change of a wrong gradient.
FP32_DRIFT_SEEN = 1.3e-5
WEIGHT_ATOL = FP32_DRIFT_SEEN * 2.0 ** -29 * 5e4   # ≈ 1.2e-9
LOSS_RTOL = 1e-9    # losses (relative): fp64 sums, measured ~1e-15 apart; the later steps on weights up to WEIGHT_ATOL apart
