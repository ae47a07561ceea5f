"""The configs' shared vocabulary: `PonderConfig` (what every run has: the model, its data, dtype, LoRA,
attention, outputs), `SupervisedConfig` (what the supervised trainers add: the token loss and the layout) and
`SamplingConfig` (what the RL trainers add: how rollouts are sampled), plus the field definitions more than one
method's config declares. Every method's config sits on one of them, never on another method's (TRL's shape:
one ``XConfig`` per trainer on a shallow base), so the same idea has the same name everywhere:

- ``dataset`` the source of problems or conversations, ``n_train`` how many to train on, ``data_seed`` the
  seed of generated problems (and of the data order); ``eval_dataset`` / ``n_eval`` the held-out ones;
- ``num_generations`` the group size G, ``max_new_tokens`` the rollout budget, ``rollout_batch_size`` the
  sequences per sampling batch.

Old names still load (``ponder.config.ALIASES``) with a one-line notice naming the new one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

from ponder.config import check_choice, renamed
from ponder.engine import rollout, runtime
from ponder.engine.chat import HISTORY_REASONING
from ponder.methods.advantages import NAN_REWARDS
from ponder.trainers.base import check_flex_trainable, cpu_processes


def config(cls):
    """`dataclass`, with an ``__init__`` that also takes the deprecated field names (``dataset_size=...``)."""
    cls = dataclass(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **renamed(type(self), kwargs))

    cls.__init__ = __init__
    return cls


def option(default: Any, help: str) -> Any:
    """A dataclass field with its help text (what `ponder <method> --help` prints)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# Field definitions shared by configs that do not share a base (the supervised ones, the forking ones).
def max_length(): return option(2048, "longer examples are skipped and counted")
def loss_normalization(default="tokens", help="tokens | messages"): return option(default, help)
def history_reasoning(default="strip", help="strip (later turns do not see earlier reasoning, as at inference) | "
                      "keep (they do); a record's meta.history_reasoning overrides it"): return option(default, help)
def packing(): return option(False, "pack examples into rows (block-diagonal attention)")
def packing_length(): return option(512, "tokens per packed row")
def attention(): return option("auto", "auto | sparse | dense | flex (no CPU backward)")
def num_tags(help="N forking tokens <think1>..<thinkN>"): return option(6, help)
def token_init(): return option("auto", "auto | mean | mean+noise | <an existing token>")
def eval_per_tag(): return option(2, "samples per tag of the evaluation (k = N * eval_per_tag)")
def tags_only(): return option(False, "train only the forking-token rows (PEFT TrainableTokens); with lora: adapters + "
                                  "tag rows")


def resolve_dtype(args) -> None:
    """``dtype: auto`` -> fp32 weights, plus HF's bf16 mixed precision (autocast, fp32 master weights and
    optimizer) where `runtime.bf16_pays`; on a CPU that also needs ``use_cpu`` (HF refuses bf16 without a GPU
    otherwise). An explicit ``bf16``/``fp16`` is kept."""
    if args.dtype != "auto":
        return
    args.dtype = "float32"
    if not (args.bf16 or args.fp16) and runtime.bf16_pays():
        args.bf16 = True
        if not torch.cuda.is_available():
            args.use_cpu = True


@config
class PonderConfig(TrainingArguments):
    """What every run has: the model and how it is loaded, the data source, the output directory."""
    ALIASES: ClassVar[dict[str, str]] = {}
    #: ``output_dir`` when none is given: runs/<method>
    method: ClassVar[str] = "run"
    # -- model
    model: str = option("testbed", "model spec for ponder.models.load (CLI runs)")
    dtype: str = option("float32", "weights' dtype: float32 | bfloat16 | ... | auto (fp32 weights with bf16 autocast "
                                   "where it is measured faster: AMX / AVX512-BF16 CPUs, bf16 GPUs; docs/methods.md "
                                   "§6.5)")
    trust_remote_code: bool = option(False, "run Python code a model folder ships (custom modelling); off unless you "
                                        "set it")
    lora: dict | None = option(None, "PEFT LoRA options, e.g. {r: 16, alpha: 32}")
    attn_implementation: str | None = option(None, "sdpa | eager | flex_attention (GPU: the one-pass BlockMask); "
                                               "default: ponder.models.load's")
    # -- data
    dataset: str | None = option(None, "data: testbed | rg:<task> | .jsonl | hf:<name> | directory")
    remove_unused_columns: bool = option(False, "keep ponder's own batch fields")
    # -- outputs
    report_to: None | str | list[str] = option("tensorboard", "tensorboard | wandb | none")

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = f"runs/{self.method}"
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; silence the per-run warning
        resolve_dtype(self)
        cpu_processes(self)
        check_flex_trainable(self)
        super().__post_init__()


@config
class SupervisedConfig(PonderConfig):
    """What the supervised trainers (SFT, one-pass, SSFT) add: the token loss and how examples are laid out."""
    max_length: int = max_length()
    loss_normalization: str = loss_normalization()
    packing: bool = packing()
    packing_length: int = packing_length()

    def __post_init__(self):
        check_supervised(self)
        super().__post_init__()


@config
class SamplingConfig(PonderConfig):
    """What the RL trainers add: the training problems and how rollouts are sampled from them."""
    dataset: str | None = option("testbed", "problems: testbed | rg:<task> | .jsonl | hf:<name>")
    dataset_split: str = option("train", "split of `dataset` to train on")
    n_train: int | None = option(512, "number of training problems (None: all)")
    num_generations: int = option(8, "G: rollouts per problem (the advantage group)")
    temperature: float = option(1.0, "rollout sampling temperature")
    max_new_tokens: int = option(128, "rollout length budget (per attempt)")
    rollout_batch_size: int = option(64, "sequences per sampling batch")
    rollout_backend: str = option("auto", "sampler: auto | generate | lean | vllm | vllm-server (docs/methods.md §6)")
    rollout_dtype: str = option("auto", "rollouts' precision: auto (bfloat16 when training runs under bf16 autocast "
                                        "and the backend is lean or generate, else float32) | float32 | bfloat16 "
                                        "(a bf16 copy of the weights; docs/methods.md §6.5)")
    nan_rewards: str = option("raise", "raise | skip (a NaN or ±inf reward leaves its group's mean and std, advantage "
                                   "0, counted)")
    dataloader_pin_memory: bool = option(False, "batches are index / token-id lists")

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (the advantage is relative to the group), got "
                             f"{self.num_generations}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 ({type(self).__name__} samples its rollouts), got "
                             f"{self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_choice("nan_rewards", self.nan_rewards, NAN_REWARDS)
        rollout.check_dtype(self.rollout_dtype, self.rollout_backend)  # first: its message needs no vLLM
        rollout.check_backend(self.rollout_backend)
        super().__post_init__()
        self.rollout_dtype = rollout.resolve_dtype(self.rollout_dtype, self.rollout_backend, bool(self.bf16))

    def problem_seed(self, default: int = 0) -> int:
        """The seed of generated problems: ``data_seed``, else `default`."""
        return self.data_seed if self.data_seed is not None else default


def check_unit_size(unit_size: int | None) -> None:
    if unit_size is not None and unit_size < 1:
        raise ValueError(f"unit_size must be >= 1 (or unset: one work unit per process), got {unit_size}")


def check_supervised(cfg) -> None:
    """The checks of the supervised fields (`max_length`, `loss_normalization`, `history_reasoning`)."""
    check_choice("loss_normalization", cfg.loss_normalization, ("tokens", "messages"))
    if hasattr(cfg, "history_reasoning"):
        check_choice("history_reasoning", cfg.history_reasoning, HISTORY_REASONING)

