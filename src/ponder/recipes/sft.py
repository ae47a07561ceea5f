"""`ponder sft`: supervised fine-tuning on conversations (assistant-only loss, per-message weights, LoRA)."""

from __future__ import annotations

from ponder.recipes.common import run_training
from ponder.trainers.sft import SFTConfig, SFTTrainer


def run_sft(config_path, overrides: list[str]):
    return run_training(SFTConfig, SFTTrainer, config_path, overrides, "sft")[0]
