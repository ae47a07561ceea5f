"""LaTRO trainer (arXiv 2411.04282, docs/methods.md §4): self-rewarding latent reasoning optimisation.

Per optimizer micro-step, on the prompts of the batch (TRL's shape: rollouts inside the training step):
1. K rationales per question from the current policy (no grad; temperature 1, at most L tokens, stopped at the
   answer template or eos; the stop text is not part of z) — `ponder.rollout.sample`;
2. ONE forward with grad over the packed ``[x z y]`` rows gives Σlog π(z|x) and Σlog π(y|x⊕z)
   (`ponder.latro.score_ids`); one more pass without grad over ``[x z]`` gives Σlog π₀(z|x) from the
   reference model (a frozen copy, or with LoRA the same model with its adapter disabled);
3. self-reward r = log π(y|x⊕z) (non-stop penalty γ × batch mean) − β·(log π(z|x) − log π₀(z|x)), RLOO
   leave-one-out advantages per question;
4. loss = mean over the step's N·K rollouts of −A·Σlog π(z|x) + sft_weight·(−Σlog π(y|x⊕z)) (Eq. 4 and the
   official code's averaging: means over rollouts; the denominator spans the whole optimizer batch, so
   gradient accumulation and several processes give the same update).

The official code samples an update's rollouts once and then optimises over micro-batches; here every
micro-batch samples its own rollouts with the same (not yet updated) weights, which is the same on-policy
estimator (a single gradient step per batch, no PPO ratio) except that the non-stop penalty's batch mean is
over the micro-batch. Batch arithmetic follows TRL's RLOOTrainer: `per_device_train_batch_size` counts
rollouts (a multiple of `num_generations`); `num_train_epochs` counts passes over the questions (the official
code's "epochs" count rollouts: its GSM8K "6 epochs" are ~0.37 passes, docs/methods.md §4.6).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from transformers import TrainingArguments

from ponder import latro, metrics, rollout
from ponder.advantages import rloo_advantages
from ponder.chat import end_of_turn_id, pad_id
from ponder.data import DataError, Problem, resolve_problems
from ponder.prompts import check_template
from ponder.trainers.base import PonderTrainer, cpu_processes, model_and_tokenizer


@dataclass
class LaTROConfig(TrainingArguments):
    """Defaults are the paper's GSM8K recipe (docs/methods.md §4.6): K = 16, 48 rollouts per device per update,
    lr 5e-7 (no warm-up, linear decay), β = 0.05, L = 500, temperature 1, γ = 2."""
    model: str = field(default="testbed", metadata={"help": "model spec for ponder.models.load (CLI runs)"})
    dataset: str | None = field(default=None, metadata={"help": "problems: testbed | rg:<task> | .jsonl | hf:<name>"})
    dataset_split: str = field(default="train", metadata={"help": "split of `dataset` to train on"})
    n_train: int | None = field(default=None, metadata={"help": "number of training problems (None: all)"})
    eval_problems: str | None = field(default=None, metadata={"help": "held-out problems (default: `dataset`)"})
    eval_split: str = field(default="test", metadata={"help": "split of `eval_problems`"})
    n_eval: int = field(default=200, metadata={"help": "held-out problems for greedy accuracy and maj@k"})
    eval_samples: int = field(default=8, metadata={"help": "samples per problem (T=1) for maj@k; 0: greedy only"})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": "default: max_rationale_length + 32"})
    prompt_template: str = field(default=latro.PROMPT_TEMPLATE, metadata={"help": "user message; {question}"})
    answer_template: str = field(default=latro.ANSWER_TEMPLATE, metadata={"help": "the target y; {answer}"})
    num_generations: int = field(default=16, metadata={"help": "K rationales per question (the paper's rloo_k)"})
    max_rationale_length: int = field(default=500, metadata={"help": "L: most new tokens in a rationale"})
    temperature: float = field(default=1.0, metadata={"help": "rollout sampling temperature"})
    stop: list[str] = field(default_factory=lambda: list(latro.STOP_STRINGS),
                            metadata={"help": "strings that end a rationale (answer template starts)"})
    beta: float = field(default=0.05, metadata={"help": "KL coefficient (0.05 GSM8K, 0.25 ARC); 0: no ref"})
    nonstop_penalty: float = field(default=2.0, metadata={"help": "γ: reward of a rationale with no stop = γ × "
                                                                   "batch mean reward"})
    sft_weight: float = field(default=1.0, metadata={"help": "weight of −Σlog π(y|x⊕z): 1 = Eq. 4; the official "
                                                              "code's sft_penalty default is 0"})
    rollout_batch_size: int = field(default=64, metadata={"help": "sequences per generate() call"})
    dtype: str = field(default="float32", metadata={"help": "model dtype (fp32 on CPU)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run Python code a model folder ships (custom "
                                                                     "modelling); off unless you set it"})
    lora: dict | None = field(default=None, metadata={"help": "PEFT LoRA options, e.g. {r: 16, alpha: 32}"})
    learning_rate: float = field(default=5e-7, metadata={"help": "AdamW learning rate (paper: 5e-7)"})
    per_device_train_batch_size: int = field(default=48, metadata={"help": "rollouts per device per micro-step "
                                                                          "(a multiple of num_generations)"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the prompt/answer ids"})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "batches are token-id lists"})

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (RLOO needs a leave-one-out baseline), got "
                             f"{self.num_generations}")
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple "
                             f"of num_generations ({self.num_generations}): it counts rollouts, K per question")
        if self.max_rationale_length < 1:
            raise ValueError("max_rationale_length must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (LaTRO samples rationales; the paper uses 1.0)")
        if self.beta < 0 or self.sft_weight < 0:
            raise ValueError("beta and sft_weight must be >= 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check_template(self.prompt_template, ("question",), "prompt_template")
        check_template(self.answer_template, ("answer",), "answer_template")
        if "{question}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{question}}, got {self.prompt_template!r}")
        if "{answer}" not in self.answer_template:
            raise ValueError(f"answer_template must contain {{answer}}, got {self.answer_template!r}")
        if self.output_dir is None:
            self.output_dir = "runs/latro"
        cpu_processes(self)
        super().__post_init__()


class GroupSampler(torch.utils.data.Sampler):
    """Each question index K times in a row, questions in a seeded random order that changes with the epoch
    (`set_epoch`, called by the Trainer), so batches of a multiple of K rollouts hold whole groups."""

    def __init__(self, n: int, k: int, seed: int = 0, shuffle: bool = True):
        self.n, self.k, self.seed, self.shuffle, self.epoch = n, k, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n * self.k

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        for i in order:
            for _ in range(self.k):
                yield i


def encode_problems(tokenizer, problems: list[Problem], prompt_template: str, answer_template: str
                    ) -> list[dict[str, Any]]:
    """Per problem: x (chat-templated prompt ids) and y (answer ids + end-of-turn)."""
    eot = end_of_turn_id(tokenizer)
    out = []
    for i, p in enumerate(problems):
        try:
            x = latro.prompt_ids(tokenizer, prompt_template.format(question=p.question))
            y = latro.answer_ids(tokenizer, answer_template.format(answer=p.answer), eot)
        except (KeyError, IndexError) as e:
            raise DataError(f"problem {p.id}: the prompt/answer template has an unknown field {e}") from None
        out.append({"prompt_ids": x, "answer_ids": y, "index": i})
    return out


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {"prompt_ids": [b["prompt_ids"] for b in batch], "answer_ids": [b["answer_ids"] for b in batch],
            "index": torch.tensor([b["index"] for b in batch]), "units": torch.ones(len(batch), dtype=torch.long)}


def disable_dropout(model) -> None:
    """LaTRO's log-probs are exact sums over sampled tokens; dropout would make reward and loss noisy (the
    official code and TRL disable it in the policy and the reference)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


class LaTROTrainer(PonderTrainer):
    """`Trainer` for LaTRO (TRL-shaped: LaTROTrainer + LaTROConfig). train_dataset: problems (`Problem`s or
    dicts with question/answer) or a spec string; model: a model or a spec for `ponder.models.load`;
    eval_dataset: held-out problems for the periodic greedy-accuracy / maj@k evaluation (`eval_strategy`)."""

    def __init__(self, model=None, args: LaTROConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, ref_model=None, **kwargs):
        args = args or LaTROConfig()
        model, processing_class = model_and_tokenizer("LaTROTrainer", model, processing_class, args)
        tok = processing_class
        disable_dropout(model)
        # Reference π₀ = the initial policy. With LoRA, the base weights are π₀: disable the adapter for the
        # reference pass instead of holding a second copy.
        self.ref_model = None
        if args.beta > 0 and not isinstance(model, PeftModel):
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(model)
            self.ref_model.eval().requires_grad_(False)
            disable_dropout(self.ref_model)
        self.train_problems = resolve_problems(train_dataset if train_dataset is not None else args.dataset,
                                               args.n_train, args.dataset_split, "train_dataset")
        if not self.train_problems:
            raise DataError("no training problems")
        # Held-out problems are loaded now when evaluation is scheduled (the Trainer wants an eval_dataset then),
        # else on the first `evaluate()` call.
        self._eval_source = eval_dataset if eval_dataset is not None else (args.eval_problems or args.dataset)
        self.eval_problems: list[Problem] = []
        if eval_dataset is not None or args.eval_strategy != "no" or args.eval_on_start:
            self.eval_problems = resolve_problems(self._eval_source, args.n_eval, args.eval_split, "eval_dataset")
        train = encode_problems(tok, self.train_problems, args.prompt_template, args.answer_template)
        self.data_stats = {"train": {"problems": len(train), "eval_problems": len(self.eval_problems)}}
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._micro = (-1, 0)  # (global_step, micro-steps done in it): seeds the rollouts, so resume repeats them
        self._eos = sorted({end_of_turn_id(tok), *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
        super().__init__(model=model, args=args, train_dataset=train, eval_dataset=self.eval_problems or None,
                         processing_class=tok, data_collator=collate, **kwargs)
        if self.ref_model is not None:
            self.ref_model.to(self.accelerator.device)

    # -- data ---------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        return GroupSampler(len(ds), self.args.num_generations, seed=self.args.seed)

    # -- the step -----------------------------------------------------------------------------------------

    def _rollout_seed(self) -> int:
        step, done = self._micro
        if step != self.state.global_step:
            step, done = self.state.global_step, 0
        self._micro = (step, done + 1)
        return ((self.args.seed * 1_000_003 + step) * 1024 + done) * 64 + self.accelerator.process_index

    def rollouts(self, model, prompt_ids: list[list[int]]):
        """K rationales for each prompt: (xs, zs, stopped) with one entry per rollout, grouped by prompt."""
        a = self.args
        samples = rollout.sample(model, self.processing_class, prompt_ids, n=a.num_generations,
                                 max_new_tokens=a.max_rationale_length, temperature=a.temperature, stop=a.stop,
                                 seed=self._rollout_seed(), batch_size=a.rollout_batch_size, progress=False)
        xs, zs, stopped = [], [], []
        for x, row in zip(prompt_ids, samples):
            for s in row:
                z, ok = latro.rationale_of(s, self._eos)
                xs.append(x)
                zs.append(z)
                stopped.append(ok)
        return xs, zs, torch.tensor(stopped)

    @torch.no_grad()
    def ref_logp_z(self, model, xs, zs) -> torch.Tensor:
        """Σ log π₀(z|x): a pass over [x z] only (an empty y) with the frozen copy or the disabled adapter."""
        empty = [[] for _ in xs]
        pad = pad_id(self.processing_class)
        if self.ref_model is not None:
            return latro.score_ids(self.ref_model, xs, zs, empty, pad)[0]
        with model.disable_adapter():
            return latro.score_ids(model, xs, zs, empty, pad)[0]

    def weighted_loss_sum(self, model, inputs):
        a, k = self.args, self.args.num_generations
        prompts, answers = inputs["prompt_ids"], inputs["answer_ids"]
        idx = inputs["index"].view(-1, k)
        if not bool((idx == idx[:, :1]).all()):
            raise RuntimeError("a batch does not hold whole groups of num_generations rollouts per question; use "
                               "LaTROTrainer's sampler (per_device_train_batch_size a multiple of num_generations)")
        policy = self.accelerator.unwrap_model(model)
        xs, zs, stopped = self.rollouts(policy, prompts[::k])
        ys = [y for y in answers[::k] for _ in range(k)]
        stopped = stopped.to(self.accelerator.device)
        logp_z, logp_y = latro.score_ids(model, xs, zs, ys, pad_id(self.processing_class))
        ref = self.ref_logp_z(policy, xs, zs) if a.beta > 0 else None
        reward, kl = latro.self_rewards(logp_y, logp_z, ref, stopped, a.beta, a.nonstop_penalty)
        adv = rloo_advantages(reward.view(-1, k)).view(-1)
        loss = latro.loss_terms(logp_z, logp_y, adv, a.sft_weight)
        self._record(logp_y=logp_y.detach(), reward=reward, kl=kl, adv=adv, stopped=stopped, zs=zs,
                     logp_z=logp_z.detach())
        return loss.sum()

    # -- logging and evaluation ---------------------------------------------------------------------------

    def _record(self, logp_y, reward, kl, adv, stopped, zs, logp_z):
        groups = adv.view(-1, self.args.num_generations)
        vals = torch.stack([
            logp_y.mean(),                                   # self-reward Σ log π(y|x⊕z)
            logp_y.exp().mean(),                             # π(y|x⊕z): probability of the gold answer
            reward.mean(),                                   # after the non-stop penalty and the KL term
            kl.mean(),
            groups.std(dim=1, unbiased=False).mean(),        # advantage spread within a question's group
            (~stopped).to(logp_y.dtype).mean(),
            logp_y.new_tensor(sum(len(z) for z in zs) / len(zs)),
            logp_z.mean(),
        ]).double()
        vals = self.accelerator.gather(vals[None]).mean(0)
        for name, v in zip(("reward", "answer_prob", "reward_total", "kl", "advantage_std", "nonstop_fraction",
                            "rationale_length", "logp_z"), vals.tolist()):
            self._metrics[name].append(v)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and not any(k.startswith("eval_") for k in logs):
            for key, vals in self._metrics.items():
                logs[key] = sum(vals) / len(vals)
            self._metrics.clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Greedy accuracy and maj@k (k = eval_samples, temperature 1) on held-out problems, the paper's two
        inference modes (Table 2); logged, and usable as `metric_for_best_model` (e.g. eval_greedy_accuracy)."""
        a = self.args
        if eval_dataset is not None:
            problems = resolve_problems(eval_dataset, a.n_eval, a.eval_split, "eval_dataset")
        else:
            if not self.eval_problems:
                self.eval_problems = resolve_problems(self._eval_source, a.n_eval, a.eval_split, "eval_dataset")
            problems = self.eval_problems
        model = self.accelerator.unwrap_model(self.model)
        r = metrics.evaluate(model, self.processing_class, problems, samples=a.eval_samples, temperature=1.0,
                             max_new_tokens=a.eval_max_new_tokens or a.max_rationale_length + 32,
                             batch_size=a.rollout_batch_size, seed=a.seed, prompt=a.prompt_template)
        r.pop("records")
        out = {f"{metric_key_prefix}_{k}": float(v) for k, v in r.items() if k != "n"}
        self.log(out)
        self.control = self.callback_handler.on_evaluate(a, self.state, self.control, out)
        return out
