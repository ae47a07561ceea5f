"""What every trainer shares: `PonderTrainer` (HF `Trainer` with an exact loss denominator, atomic
checkpoints, a loud stop on a non-finite loss, and the whole run's train_loss after a resume), loading (model,
tokenizer) from a config, the padding/packing collators, and reporting of data counts. Trainers are TRL-shaped
(`XTrainer` + `XConfig`, configs extend `TrainingArguments`)."""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import PeftModel
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from ponder import ui
from ponder.engine import models
from ponder.engine.data import DataError, load_conversations

#: Written into every checkpoint: the sum of the per-step losses so far, so a resumed run reports the
#: train_loss of the whole run (HF's covers only the steps of the last `train()` call).
LOSS_FILE = "ponder_loss.json"


def cpu_processes(args) -> None:
    """Several processes on a machine without a GPU (``accelerate launch --multi_gpu --num_processes 2`` or
    ``torchrun``): run them as CPU processes over gloo (accelerate's MULTI_CPU; its own ``--cpu`` launch needs
    mpirun). Called by the configs before `TrainingArguments` sets up the devices."""
    if not args.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        args.use_cpu = True


def check_flex_trainable(args) -> None:
    """FlexAttention has no backward on CPU (torch 2.13 raises NotImplementedError at the first training step):
    a training config asking for it on a machine without a CUDA GPU is refused when it is read, in one line
    naming the option and the values that work (docs/errors.md `flex-attention-on-cpu`)."""
    if not (args.use_cpu or not torch.cuda.is_available()):
        return
    if getattr(args, "attention", None) == "flex":
        raise ValueError("attention=flex cannot train on CPU: FlexAttention has no backward on CPU in torch "
                         f"{torch.__version__.split('+')[0]}; use one of auto, sparse, dense (flex needs a CUDA GPU)")
    if getattr(args, "attn_implementation", None) == "flex_attention":
        raise ValueError("attn_implementation=flex_attention cannot train on CPU: FlexAttention has no backward on "
                         f"CPU in torch {torch.__version__.split('+')[0]}; use sdpa or eager (flex_attention needs "
                         "a CUDA GPU)")


class TrainingStopped(ValueError):
    """A run that cannot go on (a non-finite loss, a full disk); the message says where and what is intact."""


def pad_collate(pad_id: int):
    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        att = torch.zeros((len(batch), n), dtype=torch.long)
        w = torch.zeros((len(batch), n), dtype=torch.float64)
        for r, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[r, :k] = torch.tensor(b["input_ids"])
            att[r, :k] = 1
            w[r, :k] = torch.tensor(b["weights"], dtype=torch.float64)
        return {"input_ids": ids, "attention_mask": att, "weights": w,
                "units": torch.tensor([b["units"] for b in batch])}
    return collate


def pack_collate(pad_id: int, row_length: int):
    """Pack a batch into rows of at most `row_length` tokens (first-fit, longest first) with position ids
    restarting at each example and no attention mask: transformers then builds a block-diagonal causal mask,
    so packed examples never see each other and the loss equals the padded batch's, with little padding."""
    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cap = max(row_length, max(len(b["input_ids"]) for b in batch))
        rows: list[list[dict[str, Any]]] = []
        fill: list[int] = []
        for b in sorted(batch, key=lambda b: -len(b["input_ids"])):
            n = len(b["input_ids"])
            r = next((i for i, f in enumerate(fill) if f + n <= cap), None)
            if r is None:
                rows.append([])
                fill.append(0)
                r = len(rows) - 1
            rows[r].append(b)
            fill[r] += n
        width = max(fill)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        w = torch.zeros((len(rows), width), dtype=torch.float64)
        for r, row in enumerate(rows):
            at = 0
            for b in row:
                k = len(b["input_ids"])
                ids[r, at:at + k] = torch.tensor(b["input_ids"])
                pos[r, at:at + k] = torch.arange(k)
                w[r, at:at + k] = torch.tensor(b["weights"], dtype=torch.float64)
                at += k
            pos[r, at:] = torch.arange(width - at)  # padding: a separate "sequence", never trained
        return {"input_ids": ids, "position_ids": pos, "weights": w,
                "units": torch.tensor([b["units"] for b in batch])}
    return collate


class ConsoleLog(TrainerCallback):
    """What a user sees while a trainer runs: one progress bar carrying the latest loss, not the raw log
    dictionaries. Every log dictionary goes to ``output_dir/log.jsonl`` (and TensorBoard when `report_to` has
    it), written by the main process only."""

    def __init__(self, title: str):
        self.title, self.bar, self.last = title, None, ""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = ui.Bar(self.title, state.max_steps, "steps")
            self.bar.advance(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.advance(1, f"{self.title}{self.last}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self.last = f" (loss {ui.fmt(float(logs['loss']))})"
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


#: The transformers release whose private `Trainer` internals `PonderTrainer` relies on (pyproject.toml pins it):
#: the methods it overrides or calls and the attributes it reads. Another release may rename or re-sign them and
#: nothing would fail loudly — a resumed run's loss or an exact denominator would just be wrong.
TRANSFORMERS_PINNED = "5.23"
TRAINER_PRIVATE_METHODS = ("_get_num_items_in_batch", "_maybe_log_save_evaluate", "_run_epoch", "_save_checkpoint",
                           "_get_output_dir", "_get_learning_rate")
TRAINER_PRIVATE_ATTRIBUTES = ("_total_loss_scalar", "_tr_loss", "_initial_global_step")


def check_transformers(version: str = transformers.__version__) -> None:
    """Refuse, in one line, a transformers release other than the pinned one (or one missing a private method
    `PonderTrainer` overrides). ``PONDER_ANY_TRANSFORMERS=1`` turns the refusal into a warning."""
    missing = [m for m in TRAINER_PRIVATE_METHODS if not hasattr(Trainer, m)]
    if version.split(".")[:2] == TRANSFORMERS_PINNED.split(".") and not missing:
        return
    msg = (f"ponder's trainers override private transformers.Trainer methods ({', '.join(TRAINER_PRIVATE_METHODS)}) "
           f"and read private attributes ({', '.join(TRAINER_PRIVATE_ATTRIBUTES)}) as they are in transformers "
           f"{TRANSFORMERS_PINNED}.x; found {version}" + (f", without {', '.join(missing)}" if missing else "")
           + f". Install transformers=={TRANSFORMERS_PINNED}.* (pyproject.toml), or set PONDER_ANY_TRANSFORMERS=1 "
           "to try anyway")
    if os.environ.get("PONDER_ANY_TRANSFORMERS") == "1":
        ui.warn(msg)
        return
    raise RuntimeError(msg)


class PonderTrainer(Trainer):
    """HF Trainer with atomic checkpoints and a loss whose denominator spans the whole optimizer batch
    (`units` per example). Subclasses implement `weighted_loss_sum(model, inputs)` -> the sum of weighted
    per-token losses of the micro-batch (divided here by the optimizer batch's units)."""

    def __init__(self, *args, **kwargs):
        check_transformers()
        super().__init__(*args, **kwargs)
        # our progress bar and log file instead of transformers' printed log dictionaries
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        self.add_callback(ConsoleLog(type(self).__name__.removesuffix("Trainer")))
        self.loss_is_scaled_for_ga = True  # our loss is already divided by the optimizer-batch units
        self._loss_before = 0.0           # sum of per-step losses of the segments before a resume
        self._nonfinite: str | None = None
        self._whole_loss: float | None = None
        self._micro = (-1, 0)             # (global_step, micro-steps begun in it): see `slot`

    def _get_num_items_in_batch(self, batch_samples, device):
        units = sum(int(b["units"].sum()) for b in batch_samples)
        units = torch.tensor(units, device=device)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            units = self.accelerator.gather(units).sum()
        return units

    def weighted_loss_sum(self, model, inputs) -> torch.Tensor:
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total = self.weighted_loss_sum(model, inputs)
        if num_items_in_batch is None:  # evaluation: normalise within the batch
            return total / inputs["units"].sum().clamp(min=1)
        loss = total / num_items_in_batch.clamp(min=1)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return loss

    # ---- divergence: stop loudly, naming the step and the learning rate ---------------------------------

    def _stop_message(self, what: str, step: int) -> str:
        return (f"{what} at step {step} (learning rate {self._get_learning_rate():.3g}): the "
                "run diverged and was stopped; nothing was saved as final (earlier checkpoints are kept). Lower "
                "learning_rate or check the data")

    @property
    def slot(self) -> int:
        """The place of this process's micro-batch in the optimizer step's global batch: micro-step × processes
        + rank. A batch of data has the same slot however the global batch is split between processes and
        gradient accumulation (accelerate deals per-device batches to the ranks in turn), so sampling seeded by
        (seed, step, slot) gives the same rollouts for 2 processes × 1 micro-step as for 1 × 2, and again after a
        resume (nothing depends on a consumed RNG stream)."""
        return self._micro[1] * self.accelerator.num_processes + self.accelerator.process_index

    def training_step(self, model, inputs, num_items_in_batch=None):
        step, begun = self._micro
        self._micro = (self.state.global_step, begun + 1 if step == self.state.global_step else 0)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1:
            # The micro-step's loss over the whole global batch, the same on every process: the logged losses and
            # train_loss equal one process's (HF adds the not-yet-logged part of the loss per process), and a
            # non-finite loss anywhere stops every process at the same step.
            loss = self.accelerator.reduce(loss, "mean")
        if not bool(torch.isfinite(loss)):
            where = "" if self.accelerator.num_processes == 1 else " (on some process)"
            self._nonfinite = self._stop_message(f"non-finite loss ({float(loss)}){where}", self.state.global_step + 1)
            raise TrainingStopped(self._nonfinite)
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        # the gradient norm is computed on the all-reduced gradients: the same on every process
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            # before logging and saving: the diverged weights never reach a checkpoint
            raise TrainingStopped(self._stop_message(f"non-finite gradient norm ({float(grad_norm)})",
                                                     self.state.global_step))
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _run_epoch(self, *args, **kwargs):
        # transformers 5.23 checks for the end of training only after a step, so a run resumed from a checkpoint
        # at max_steps (killed after its last checkpoint, before `final` was saved) would train one step more
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    # ---- the whole run's train_loss across resumes -------------------------------------------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._loss_before, self._whole_loss, self._nonfinite = 0.0, None, None
        ckpt = resume_from_checkpoint
        if ckpt is True:
            ckpt = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        if isinstance(ckpt, (str, os.PathLike)) and os.path.isfile(os.path.join(ckpt, LOSS_FILE)):
            with open(os.path.join(ckpt, LOSS_FILE)) as f:
                self._loss_before = float(json.load(f)["loss_sum"])
        out = super().train(resume_from_checkpoint, *args, **kwargs)
        if self._whole_loss is not None:
            out.metrics["train_loss"] = self._whole_loss
            out = out._replace(training_loss=self._whole_loss)
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs and self.state.global_step > 0:
            steps_now = self.state.global_step - self._initial_global_step
            self._whole_loss = (self._loss_before + logs["train_loss"] * steps_now) / self.state.global_step
            logs["train_loss"] = self._whole_loss
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        save_merged(self, output_dir, _internal_call)

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint into a staging folder, then rename it into place: a crash never leaves a
        half-written checkpoint-N that resume would pick up, and a failed write (a full disk) leaves the
        previous checkpoints as they were. Several processes: every process writes its part (its RNG state;
        sharded weights and optimizer under FSDP/DeepSpeed) into the staging folder between two barriers, and
        rank 0 renames it once all are done."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, ".staging")

        def intact() -> str:
            kept = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
            return (f"the previous checkpoint {os.path.basename(kept)} is intact (resume with "
                    "resume_from_checkpoint=last)" if kept else "no checkpoint was written")

        with atomic_dir(os.path.join(run_dir, name), os.path.join(staging, name), self.args.should_save,
                        self.accelerator.wait_for_everyone, f"{name} to {run_dir}", intact, root=staging):
            self._get_output_dir = lambda trial=None: staging  # type: ignore[method-assign]
            try:
                super()._save_checkpoint(model, trial)
            finally:
                del self._get_output_dir
            if self.args.should_save:
                # HF's running sums of this train() call: drained at each log, plus what is not logged yet
                # (the same on every process: `training_step` reduces the loss)
                loss_sum = self._loss_before + self._total_loss_scalar + float(getattr(self, "_tr_loss", 0.0))
                with open(os.path.join(staging, name, LOSS_FILE), "w") as f:
                    json.dump({"loss_sum": loss_sum, "global_step": self.state.global_step}, f)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()


@contextlib.contextmanager
def atomic_dir(final: str | Path, staging: str | Path, main: bool, barrier: Callable[[], Any], what: str,
               intact: Callable[[], str], root: str | Path | None = None) -> Iterator[Path]:
    """Write the folder `final` atomically (checkpoints, final models): the body writes `staging` (every process
    its part, between two barriers), then rank 0 (`main`) renames it into place. A crash never leaves a
    half-written `final`; a failed write (OSError: a full disk) removes the staging folder and stops the run
    saying what could not be written (`what`) and what is intact (`intact()`); Ctrl-C removes it too. `root`:
    the folder around `staging` to remove afterwards (default `staging` itself)."""
    root = Path(root if root is not None else staging)
    if main:
        shutil.rmtree(root, ignore_errors=True)
    barrier()  # nobody writes into the staging folder before it is fresh
    try:
        yield Path(staging)
        barrier()  # every process's part is in the staging folder
        if main:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staging, final)
            shutil.rmtree(root, ignore_errors=True)
    except OSError as e:
        if main:
            shutil.rmtree(root, ignore_errors=True)
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise TrainingStopped(f"could not write {what}: {why}; {intact()}") from None
    except BaseException:  # Ctrl-C while writing: nothing half-written is left behind
        if main:
            shutil.rmtree(root, ignore_errors=True)
        raise


def model_and_tokenizer(trainer: str, model, processing_class, args, lora: bool = True):
    """The (model, tokenizer) a trainer works on. `model` None or a spec string: loaded by `ponder.models.load`
    with the config's dtype, attention and (if `lora`) LoRA; a model object: the config's LoRA applied (if
    `lora`), and its tokenizer must be given."""
    if isinstance(model, str) or model is None:
        return models.load(model or args.model, dtype=args.dtype, lora=args.lora if lora else None,
                           attn_implementation=getattr(args, "attn_implementation", None),
                           trust_remote_code=getattr(args, "trust_remote_code", False))
    if lora and args.lora is not None:
        model = models.apply_lora(model, args.lora)
    if processing_class is None:
        raise ValueError(f"{trainer} needs the tokenizer (processing_class) when given a model object")
    return model, processing_class


#: Where a final model keeps the PEFT adapter it was merged from (PEFT users load it with
#: `PeftModel.from_pretrained(base, final / ADAPTER_DIR)`; `recipes.rise` resumes from it).
ADAPTER_DIR = "adapter"


def save_merged(trainer, output_dir, internal: bool) -> None:
    """Checkpoints keep PEFT adapters (for resume); a final model of a PEFT run is saved merged — a plain
    `save_pretrained` model that `ponder eval`, `ponder.models.load`, transformers and vLLM read directly — with
    the adapter itself beside it in ``ADAPTER_DIR``. The merge is done on a copy: the trainer's model keeps its
    adapters (RISE's next iteration and a resumed run go on training them)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if internal or not isinstance(model, PeftModel):
        return Trainer.save_model(trainer, output_dir, _internal_call=internal)
    output_dir = output_dir or trainer.args.output_dir
    if trainer.args.should_save:
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(output_dir)
        trainer.processing_class.save_pretrained(output_dir)
        model.save_pretrained(os.path.join(output_dir, ADAPTER_DIR))


def fit_context(model, max_length: int) -> int:
    """`max_length` capped at the model's context: longer examples are then skipped and counted, never trained
    at positions the model was not built for."""
    ctx = models.context_length(model)
    if ctx is not None and max_length > ctx:
        ui.warn(f"max_length {max_length} is longer than the model's context ({ctx} tokens); examples longer "
                f"than {ctx} tokens are skipped and counted")
        return ctx
    return max_length


def resolve_conversations(ds, split: str):
    """Conversations from a data spec string (`ponder.data.load_conversations`) or as given."""
    if ds is None:
        raise ValueError("no training data: pass train_dataset or set `dataset` in the config")
    if isinstance(ds, str):
        return load_conversations(ds, split=split)
    return ds


def source_name(spec, default: str = "train_dataset") -> str:
    """How data errors name the data: the spec string, or `default` for in-memory data."""
    return spec if isinstance(spec, str) else default


#: Counted skips and how they are reported.
SKIPS = {"skipped_too_long": "longer than max_length{limit}", "skipped_no_trained_tokens": "with nothing to train "
         "(no assistant turn of weight > 0)", "skipped_more_traces_than_tags": "with more traces than tags"}


def no_examples_left(what: str, where: str, stats: Counter, max_length: int | None = None) -> DataError:
    """The error when every example was skipped: how many were read and why each was skipped."""
    limit = f" ({max_length} tokens)" if max_length else ""
    skipped = {k: stats.get(k, 0) for k in SKIPS if stats.get(k, 0)}
    read = stats.get("examples", 0) + sum(skipped.values())
    why = "; ".join(f"{n} {SKIPS[k].format(limit=limit)}" for k, n in skipped.items())
    return DataError(f"no trainable {what} left in {where}: {read} read" + (f", skipped {why}" if why else ""))


def report_stats(stats: dict[str, Counter]) -> None:
    """One line per split: examples kept and every counted skip."""
    for split, c in stats.items():
        msg = f"{split}: {c['examples']} examples"
        if c["skipped_too_long"]:
            msg += f", skipped {c['skipped_too_long']} longer than max_length"
        if c["skipped_no_trained_tokens"]:
            msg += f", skipped {c['skipped_no_trained_tokens']} with nothing to train"
        if c["skipped_blank_lines"]:
            msg += f", skipped {c['skipped_blank_lines']} blank lines"
        if c["hidden_reasoning_turns"]:
            msg += (f", {c['hidden_reasoning_turns']} history turns with reasoning not trained "
                    "(use `ponder onepass` to train them)")
        ui.info(msg)
