"""`ponder testbed build`: pre-train the testbed model from scratch (the only code that does), and ship it.

The recipe: the SFT trainer on `ponder.testbed.pretraining_conversations` (two strategies, retry episodes in
both history views), until greedy accuracy on fresh validation problems reaches a middling target (so that
every method has room to help), at most `max_steps`. The shipped v2 weights stopped at step 720 (27 min on one
core of a loaded 2-core box).
Deterministic for a seed on one machine; CPUs differ in their float rounding, so two machines may stop at
different steps — which is why the weights built here ship with the package (``--ship``) and every machine
starts from the same model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, TrainerCallback

from ponder.engine import rollout, testbed
from ponder.engine.models import tiny_config
from ponder.methods import verify
from ponder.trainers.sft import SFTConfig, SFTTrainer


class StopAtAccuracy:
    """Every `every` steps from `start`, greedy accuracy on validation problems (fresh training-distribution
    problems, never the held-out test set); stop once it reaches `target`. The step at which a 2M model
    "gets" the arithmetic varies a lot with the data order (seen: 9-57% greedy at equal steps), so the build
    trains until it is middling instead of for a fixed number of steps. Deterministic for a given seed."""

    def __init__(self, tokenizer, target: float, start: int, every: int, n: int = 100, seed: int = 777):
        self.tok, self.target, self.start, self.every = tokenizer, target, start, every
        self.problems = testbed.problems(n, seed=seed, split="train")
        self.history: list[tuple[int, float]] = []
        outer = self

        class CB(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                step = state.global_step
                if step >= outer.start and (step - outer.start) % outer.every == 0:
                    acc = outer.accuracy(model)
                    outer.history.append((step, acc))
                    if acc >= outer.target:
                        control.should_training_stop = True
        self.callback = CB()

    def accuracy(self, model) -> float:
        out = rollout.sample(model, self.tok, [p["question"] for p in self.problems], temperature=0.0,
                             max_new_tokens=48, batch_size=len(self.problems), progress=False)
        return sum(verify.is_correct(p, s[0].text) for p, s in zip(self.problems, out)) / len(self.problems)


def build(out: Path, max_steps: int = 1200, target: float = 0.35, batch_size: int = 64, lr: float = 3e-3,
          seed: int = 0, log: bool = True) -> dict[str, Any]:
    """Pre-train the testbed model from scratch with ponder's SFT trainer (until validation greedy accuracy
    reaches `target`, at most `max_steps`) and save it atomically to `out`."""
    t0 = time.time()
    out = Path(out)
    tok = testbed.build_tokenizer()
    cfg = tiny_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **testbed.MODEL_CONFIG)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    convs = testbed.pretraining_conversations(max_steps * batch_size, seed=seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = SFTConfig(output_dir=str(tmp / "trainer"), max_steps=max_steps, per_device_train_batch_size=batch_size,
                     learning_rate=lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                     warmup_steps=30, weight_decay=0.01, adam_beta2=0.98, max_grad_norm=1.0, logging_steps=25,
                     save_strategy="no", report_to=[], seed=seed, train_sampling_strategy="random",
                     packing=True, packing_length=256, disable_tqdm=not log, max_length=512)
    stopper = StopAtAccuracy(tok, target, start=240, every=40)
    trainer = SFTTrainer(model=model, args=args, train_dataset=convs, processing_class=tok,
                         callbacks=[stopper.callback])
    result = trainer.train()
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = {"version": testbed.VERSION, "steps": result.global_step, "max_steps": max_steps, "target": target,
            "validation_accuracy": stopper.history, "batch_size": batch_size, "lr": lr, "seed": seed,
            "train_loss": result.training_loss, "params": sum(p.numel() for p in model.parameters()),
            "build_seconds": time.time() - t0}
    (tmp / "testbed.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return info


def ship(src: Path, dest: Path = testbed.WEIGHTS) -> dict[str, Any]:
    """Copy a built testbed into the package (model.safetensors, config, tokenizer, testbed.json) and record
    the weights' SHA-256 in testbed.json, which `ponder.testbed.weights_dir` checks on every load."""
    src, dest = Path(src), Path(dest)
    info = json.loads((src / "testbed.json").read_text())
    info["sha256"] = testbed.file_sha256(src / "model.safetensors")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    (tmp / "testbed.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return info
