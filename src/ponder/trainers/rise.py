"""RISE training: reward-weighted regression on multi-turn trajectories (arXiv 2407.18219; docs/methods.md §3.5-3.6).

The official code turns a trajectory with T attempts into T examples — the conversation truncated after attempt
i, only attempt i trained with weight w_i = exp(r_i/τ) — and minimises the mean over examples of
w_i · (mean token cross-entropy of attempt i). Earlier attempts are visible context in example i, so the T
examples are the N-pass samples of ONE sequence, and a trajectory trains as one sequence with a weight on each
attempt (`OnePassTrainer` with the ``messages`` normalisation: each weighted message's mean token CE × its
weight, summed, divided by the number of weighted messages in the optimizer batch) — the same loss and gradient
(tests/test_rise.py, fp64), about (T+1)/2 times fewer tokens forwarded (bench/rise.py).

``history_reasoning: keep`` (the default, the paper's MDP: earlier attempts shown in full) makes that sequence an
ordinary causal one; ``strip`` (earlier reasoning hidden, as at inference) uses the one-pass layout
(`ponder.masks`). ``mode: npass`` trains the official per-turn examples instead (the reference).

Hyperparameters of the paper's runs (docs/methods.md §3.6): lr 1e-5, cosine, warmup 0.04, weight decay 0,
per-device batch 1 × 16 accumulation; τ = 0.4.
"""

from __future__ import annotations

from typing import ClassVar

from ponder.config import check_choice
from ponder.engine.data import DataError
from ponder.methods import rise
from ponder.trainers import configs
from ponder.trainers.configs import PonderConfig, config, option
from ponder.trainers.onepass import OnePassTrainer, check_onepass


@config
class RISEConfig(PonderConfig):
    """Reward-weighted one-pass SFT on RISE trajectories: the loss, the layout, and the conversion of
    trajectories into weighted conversations (docs/methods.md §3.5)."""
    method: ClassVar[str] = "rise"
    dataset: str | None = option(None, "trajectories .jsonl written by `ponder rise`")
    max_length: int = configs.max_length()
    loss_normalization: str = configs.loss_normalization(
        "messages", "messages = RISE's per-example mean CE x weight, averaged (the official loss); tokens")
    history_reasoning: str = configs.history_reasoning(
        "keep", "keep (earlier attempts shown in full: the paper's MDP) | strip (earlier reasoning hidden)")
    packing: bool = configs.packing()
    packing_length: int = configs.packing_length()
    mode: str = option("onepass", "onepass | npass | kpass")
    kpass_chunks: int = option(2, "kpass: number of chunks of turns")
    attention: str = configs.attention()
    # -- conversion (docs/methods.md §3.5)
    tau: float = option(0.4, "weight exp(reward / tau)")
    criteria: str = option("all", "all | better | best | success")
    remove_duplicates: bool = option(False, "drop repeated / empty attempts")
    only_success: bool = option(False, "drop trajectories that never succeed")

    def __post_init__(self):
        check_onepass(self)
        check_choice("criteria", self.criteria, rise.CRITERIA)
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        super().__post_init__()


class RISETrainer(OnePassTrainer):
    """Reward-weighted SFT on RISE trajectories (TRL-shaped: RISETrainer + RISEConfig).

    train_dataset: trajectory records from `ponder.rise.collect` (converted here with the config's tau /
    criteria / remove_duplicates / only_success), already weighted conversations (messages carrying
    ``weight``), or a path to a trajectories JSONL (also `args.dataset`)."""

    def __init__(self, model=None, args: RISEConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        args = args or RISEConfig()
        src = train_dataset if train_dataset is not None else args.dataset
        if src is None:
            raise ValueError("no training data: pass train_dataset (trajectories) or set `dataset` to a "
                             "trajectories .jsonl written by `ponder rise`")
        records = rise.load_trajectories(src) if isinstance(src, str) else list(src)
        stats = None
        if records and isinstance(records[0], dict) and "attempts" in records[0]:
            records, stats = rise.convert(records, args.tau, args.criteria, args.remove_duplicates,
                                          args.only_success)
        if not records:
            counts = ", ".join(f"{k} {v}" for k, v in (stats or {}).items() if v) or "no records"
            raise DataError(f"no trajectory has an attempt to train on in "
                            f"{src if isinstance(src, str) else 'train_dataset'}: {counts}")
        super().__init__(model=model, args=args, train_dataset=records, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        if stats is not None:
            self.data_stats["train"].update(stats)
