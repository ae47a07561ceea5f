"""`ponder onepass`: one-pass multi-turn reasoning SFT (arXiv 2504.18246), its timing harness (one-pass vs
N-pass side by side, used by the demo and bench/onepass.py) and its demo."""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ponder.engine import masks, models, testbed
from ponder.engine.chat import pad_id
from ponder.engine.data import load_conversations
from ponder.methods.onepass import npass_samples, npass_step, onepass_step
from ponder.recipes.common import pyplot, run_training
from ponder.trainers.onepass import OnePassConfig, OnePassTrainer


def run_onepass(config_path, overrides: list[str]):
    return run_training(OnePassConfig, OnePassTrainer, config_path, overrides, "onepass")[0]


def compare(model, tokenizer, messages: Sequence[dict[str, Any]], repeats: int = 3, attention: str = "auto",
            on_step=None, warmup: bool = True) -> dict[str, float]:
    """One-pass vs N-pass on one conversation, side by side: tokens forwarded, the ideal ratio (N-pass tokens /
    one-pass tokens), median forward+backward seconds of each (repeats interleaved, so both see the same
    machine load; preparation not timed, as a trainer prepares once) and the largest log-prob difference.
    `on_step(mode)` is called around each timed step (e.g. to sample memory); `warmup` runs each once untimed
    first (the first call of a shape pays for allocator growth)."""
    batch = masks.collate([masks.onepass_layout(tokenizer, messages)], pad_id(tokenizer))
    samples = npass_samples(tokenizer, messages)
    runs = {"onepass": lambda: onepass_step(model, batch, attention), "npass": lambda: npass_step(model, samples)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values() if warmup else ():
        fn()
    diff = 0.0
    for _ in range(repeats):
        out = {}
        for mode, fn in runs.items():
            model.zero_grad(set_to_none=True)
            with (on_step(mode) if on_step else contextlib.nullcontext()):
                t = time.perf_counter()
                out[mode] = fn()
                times[mode].append(time.perf_counter() - t)
        diff = max(diff, max((a - b).abs().max().item() for a, b in zip(out["onepass"], out["npass"])))
    model.zero_grad(set_to_none=True)
    n_one, n_n = batch.input_ids.numel(), sum(ids.numel() for ids, _ in samples)
    one_s, n_s = statistics.median(times["onepass"]), statistics.median(times["npass"])
    return {"depth": len(samples), "onepass_tokens": n_one, "npass_tokens": n_n, "ideal": n_n / n_one,
            "onepass_s": one_s, "npass_s": n_s, "speedup": n_s / one_s, "maxdiff": diff}


def demo(run_dir: Path, base: str, problems: list, quick: bool = False) -> dict[str, Any]:
    """One-pass vs N-pass (arXiv 2504.18246): the same short SFT run on multi-turn testbed conversations in both
    modes (the loss curves must match to fp32 noise), and forward+backward time by conversation depth."""
    run_dir = Path(run_dir)
    steps, bs = (2, 2) if quick else (12, 4)
    data = load_conversations("testbed:multi", n=steps * bs, seed=0)
    loss, secs, tokens = {}, {}, {}
    for mode in ("onepass", "npass"):
        cfg = OnePassConfig(model=base, mode=mode, max_steps=steps, per_device_train_batch_size=bs,
                            learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                            report_to="none", output_dir=str(run_dir / mode), seed=0)
        trainer = OnePassTrainer(args=cfg, train_dataset=data)
        t = time.perf_counter()
        trainer.train()
        secs[mode] = time.perf_counter() - t
        loss[mode] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        tokens[mode] = trainer.data_stats["train"]["tokens_forwarded"]
        del trainer
    dloss = max(abs(a - b) for a, b in zip(loss["onepass"], loss["npass"]))

    model, tok = models.load(base)
    model.train()
    rng = random.Random(0)
    by_depth = []
    for depth in (2,) if quick else (2, 4, 8):
        msgs = testbed.multi_turn(testbed.sample_problem(rng), rng, depth)
        by_depth.append(compare(model, tok, msgs, repeats=1 if quick else 2))

    rows = [["final train loss", loss["onepass"][-1], loss["npass"][-1], ""],
            ["largest loss difference at any step", dloss, "", ""],
            ["training seconds", secs["onepass"], secs["npass"], secs["npass"] / secs["onepass"]],
            ["tokens forwarded", tokens["onepass"], tokens["npass"], tokens["npass"] / tokens["onepass"]]]
    rows += [[f"depth {r['depth']}: fwd+bwd seconds (ideal ratio {r['ideal']:.2f})", r["onepass_s"], r["npass_s"],
              r["speedup"]] for r in by_depth]
    _plot(run_dir / "onepass.png", loss, by_depth)
    grows = all(a["speedup"] < b["speedup"] for a, b in zip(by_depth, by_depth[1:]))
    same = dloss < 1e-4  # fp32 noise is ~1e-6 here; anything near 1e-4 means the two modes differ
    notes = [f"{steps} steps x {bs} conversations in each mode from the same seed: the loss curves "
             + (f"agree to {dloss:.1e} (fp32 noise; the two modes compute the same loss)." if same else
                f"DIFFER by up to {dloss:.1e}, more than fp32 noise: the modes should compute the same loss."),
             f"Speedup at depth {by_depth[-1]['depth']}: {by_depth[-1]['speedup']:.2f}x measured vs "
             f"{by_depth[-1]['ideal']:.2f}x ideal (token ratio); "
             + ("it grows with depth, as in the paper." if grows else "it did not grow with depth in this run "
                "(the machine is noisy; see bench/onepass.py for repeated timings).")]
    return {"title": "One-pass multi-turn SFT vs N-pass (arXiv 2504.18246)",
            "columns": ["", "one-pass", "N-pass", "N-pass / one-pass"], "rows": rows, "plots": ["onepass.png"],
            "notes": notes, "metrics": {"loss": loss, "seconds": secs, "tokens": tokens, "max_loss_diff": dloss,
                                        "by_depth": by_depth}}


def _plot(path: Path, loss: dict[str, list[float]], by_depth: list[dict[str, float]]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for mode, style in (("npass", "s--"), ("onepass", "o-")):
        ax[0].plot(range(1, len(loss[mode]) + 1), loss[mode], style, ms=4, label=mode)
    ax[0].set(xlabel="training step", ylabel="train loss", title="loss: one-pass vs N-pass")
    d = [r["depth"] for r in by_depth]
    ax[1].plot(d, [r["npass_s"] for r in by_depth], "s--", label="N-pass")
    ax[1].plot(d, [r["onepass_s"] for r in by_depth], "o-", label="one-pass")
    ax[1].set(xlabel="conversation depth (assistant turns)", ylabel="fwd+bwd seconds", title="time per conversation")
    ax[2].plot(d, [r["speedup"] for r in by_depth], "o-", label="measured")
    ax[2].plot(d, [r["ideal"] for r in by_depth], "k:", label="ideal (token ratio)")
    ax[2].set(xlabel="conversation depth (assistant turns)", ylabel="N-pass time / one-pass time", title="speedup")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
