"""LaTRO trainer (arXiv 2411.04282, docs/methods.md §4): self-rewarding latent reasoning optimisation, and the
likelihood-reward family on the same engine (docs/methods.md §4.12-§4.16).

One optimizer update, the official code's shape (sample the update's rollouts, reward them all, then optimise
over micro-batches):
1. at the start of the update (`get_batch_samples`, which sees all of its `gradient_accumulation_steps`
   micro-batches), K rationales per question for every question of the update from the current policy (no
   grad; temperature 1, at most L tokens, stopped at the answer template or eos; the stop text is not part of
   z) — `ponder.rollout.sample`, one call per micro-batch seeded by (seed, step, slot = micro-step × processes
   + rank), so that 2 processes × 1 micro-batch sample what 1 process × 2 samples, and a resumed run what the
   uninterrupted one did;
2. the rewards of ALL the update's rollouts: R(y|x⊕z) (`reward`, `ponder.latro.answer_score`; or a 0/1
   verifier), the non-stop penalty with the mean over the whole update, − β·(log π(z|x) − log π₀(z|x)) with
   π₀ the reference model (a frozen copy, or with LoRA the same model with its adapter disabled); RLOO (or
   GRPO) advantages per question, optionally normalised over the update as TRL's RLOO does;
3. per micro-batch, ONE forward with grad over the prefix trees x -> z_k -> y_k (`ponder.latro.score_ids`: a
   question's x forwarded once for its K rationales; the reference pass is the same trees without y) and the
   loss −A·Σlog π(z|x) − sft_weight·R(y|x⊕z), summed; the denominator counts the rollouts of the whole
   optimizer batch, so gradient accumulation and several processes give the same update.
Several processes: step 2 runs over the rollouts of every process, gathered in slot order (`_whole_update`):
the penalty's mean, the std filter and the advantage normalisation span the global update, and every process
computes what one process accumulating the same global batch computes (the official code's mean is per
process: the same with one process).
When an update is a single micro-batch (and no std filter needs the rewards first), the rewards come from the
training forward itself (the same numbers; one pass fewer).

Batch arithmetic follows TRL's RLOOTrainer: `per_device_train_batch_size` counts rollouts (a multiple of
`num_generations`); `num_train_epochs` counts passes over the questions (the official code's "epochs" count
rollouts: its GSM8K "6 epochs" are ~0.37 passes, docs/methods.md §4.6).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ponder.config import check_choice
from ponder.engine import dist, rollout
from ponder.engine.chat import end_of_turn_id, pad_id
from ponder.engine.data import DataError, Problem, input_skips, resolve_problems
from ponder.engine.prompts import check_template
from ponder.methods import latro, metrics, verify
from ponder.methods.advantages import (
    finite_rewards,
    group_normalized,
    normalize_advantages,
    rloo_advantages,
)
from ponder.trainers.base import PonderTrainer, model_and_tokenizer
from ponder.trainers.configs import SamplingConfig, config, option
from ponder.trainers.rl import disable_dropout, reference_forward, reference_model, update_seed

ADVANTAGES = ("rloo", "grpo")


@config
class LaTROConfig(SamplingConfig):
    """Defaults are the paper's GSM8K recipe (docs/methods.md §4.6): K = 16, 48 rollouts per device per update,
    lr 5e-7 (no warm-up, linear decay), β = 0.05, L = 500, temperature 1, γ = 2, reward Σ log π(y|x⊕z)."""
    ALIASES: ClassVar[dict[str, str]] = {"eval_problems": "eval_dataset"}  # here it was a source, not a count
    method: ClassVar[str] = "latro"
    # -- data
    dataset: str | None = option(None, "problems: testbed | rg:<task> | .jsonl | hf:<name>")
    n_train: int | None = option(None, "number of training problems (None: all)")
    # -- evaluation
    eval_dataset: str | None = option(None, "held-out problems (default: `dataset`)")
    eval_split: str = option("test", "split of `eval_dataset`")
    n_eval: int = option(200, "held-out problems for greedy accuracy and maj@k")
    eval_samples: int = option(8, "samples per problem (T=1) for maj@k; 0: greedy only")
    eval_max_new_tokens: int | None = option(None, "default: max_new_tokens + 32")
    # -- rationale and answer
    prompt_template: str = option(latro.PROMPT_TEMPLATE, "user message with {question} (and {options} for "
                                                          "multiple choice), or a name: gsm8k | arc")
    answer_template: str = option(latro.ANSWER_TEMPLATE, "the target y; {answer}")
    reward: str = option("logprob", "logprob (LaTRO) | mean_logprob | prob (VeriFree) | mean_prob (RLPR) | "
                                    "verifier (0/1: plain RLOO)")
    num_generations: int = option(16, "K rationales per question (the paper's rloo_k)")
    max_new_tokens: int = option(500, "L: most new tokens in a rationale (with reward: verifier, in the whole "
                                      "completion)")
    stop: list[str] = option(list(latro.STOP_STRINGS), "strings that end a rationale (answer template starts)")
    # -- loss
    beta: float = field(default=0.05, metadata={"help": "KL coefficient (0.05 GSM8K, 0.25 ARC); 0: no ref"})
    nonstop_penalty: float = field(default=2.0, metadata={"help": "γ: reward of a rationale with no stop = γ × "
                                                                   "the update's mean reward (bounded rewards: 0)"})
    sft_weight: float = field(default=1.0, metadata={"help": "weight of the answer-side term −R(y|x⊕z): 1 = Eq. 4; "
                                                              "the official code's sft_penalty default is 0"})
    advantage: str = field(default="rloo", metadata={"help": "rloo (LaTRO, TRL) | grpo ((r − mean)/(std + 1e-6))"})
    normalize_advantages: bool = field(default=False, metadata={
        "help": "TRL RLOO's (A − mean)/(std + 1e-4) over the update's rollouts"})
    nan_rewards: str = field(default="raise", metadata={
        "help": "raise | skip (TRL: a NaN or ±inf reward leaves the baseline and gets advantage 0, counted)"})
    reward_span: str = field(default="answer", metadata={
        "help": "tokens of y that prob / mean_prob score: answer (the reference answer's own tokens, as RLPR and "
                "VeriFree) | full (y with the answer template and end-of-turn: ponder's old behaviour)"})
    rlpr_debias: bool = field(default=True, metadata={"help": "reward mean_prob: clip(r − r', 0, 1), r' without "
                                                                "a rationale from the initial model (RLPR Eqs. 3-4)"})
    std_filter_beta: float | None = field(default=None, metadata={
        "help": "drop groups with reward std < β·EMA (RLPR §2.4); None: 0.5 for mean_prob, else off (0)"})
    std_filter_ema: float = field(default=0.99, metadata={"help": "RLPR filter_ema_ratio"})
    std_filter_ema_start: int = field(default=6, metadata={"help": "RLPR filter_ema_start_step (updates from 1)"})
    std_filter_start: int = field(default=11, metadata={"help": "RLPR filter_start_step"})
    # -- optimisation
    learning_rate: float = field(default=5e-7, metadata={"help": "AdamW learning rate (paper: 5e-7)"})
    per_device_train_batch_size: int = field(default=48, metadata={"help": "rollouts per device per micro-step "
                                                                          "(a multiple of num_generations)"})

    def __post_init__(self):
        check_choice("reward", self.reward, latro.REWARDS)
        check_choice("advantage", self.advantage, ADVANTAGES)
        check_choice("reward_span", self.reward_span, latro.REWARD_SPANS)
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple "
                             f"of num_generations ({self.num_generations}): it counts rollouts, K per question")
        if self.beta < 0 or self.sft_weight < 0:
            raise ValueError("beta and sft_weight must be >= 0")
        if self.reward == "verifier" and self.sft_weight:
            raise ValueError("sft_weight must be 0 with reward: verifier (the answer-side term is the gradient of "
                             "a likelihood reward; a verifier's 0/1 has none)")
        if self.std_filter_beta is None:
            self.std_filter_beta = 0.5 if self.reward == "mean_prob" else 0.0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.prompt_template = latro.PROMPTS.get(self.prompt_template, self.prompt_template)
        check_template(self.prompt_template, ("question", "options"), "prompt_template")
        check_template(self.answer_template, ("answer",), "answer_template")
        if "{question}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{question}} or be one of {', '.join(latro.PROMPTS)}, "
                             f"got {self.prompt_template!r}")
        if "{answer}" not in self.answer_template:
            raise ValueError(f"answer_template must contain {{answer}}, got {self.answer_template!r}")
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
    """Per problem: x (chat-templated prompt ids), y (answer ids + end-of-turn) and the token span of the
    reference answer inside y (`ponder.latro.answer_span`)."""
    eot = end_of_turn_id(tokenizer)
    out = []
    for i, p in enumerate(problems):
        try:
            x = latro.prompt_ids(tokenizer, latro.render_prompt(prompt_template, p.question, p.meta.get("options")))
            y, span = latro.answer_span(tokenizer, answer_template, p.answer, eot)
        except (KeyError, IndexError) as e:
            raise DataError(f"problem {p.id}: the prompt/answer template has a field the problem lacks: {e}") from None
        out.append({"prompt_ids": x, "answer_ids": y, "answer_span": span, "index": i})
    return out


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {"prompt_ids": [b["prompt_ids"] for b in batch], "answer_ids": [b["answer_ids"] for b in batch],
            "index": torch.tensor([b["index"] for b in batch]), "units": torch.ones(len(batch), dtype=torch.long)}


@dataclass
class UpdateRollouts:
    """What the rewards and advantages of one update are computed from: the update's rollouts in order (this
    process's, or every process's in slot order under several processes)."""
    logp_z: torch.Tensor            # Σ log π(z|x) per rollout
    score: torch.Tensor             # the reward's score R per rollout
    stopped: torch.Tensor           # did the rationale end with a stop string
    ref: torch.Tensor | None        # Σ log π₀(z|x) (a KL term), else None
    index: list[int]                # the training problem of each rollout
    lengths: list[int]              # rationale lengths
    tokens: list[int]               # sampled tokens per plan
    starts: list[int]               # where each of this process's plans starts in the update


@dataclass
class Rollouts:
    """One micro-batch's rollouts (grouped by question, K in a row) and, once the update is rewarded, their
    advantages and weights (0 = dropped by the std filter)."""
    xs: list[list[int]]
    zs: list[list[int]]
    ys: list[list[int]]
    index: list[int]                    # training-problem index of each rollout
    stopped: torch.Tensor
    lengths: list[int]                  # rationale tokens (before the answer template)
    verifier: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    spans: list | None = None           # the token span of y the reward scores (None: all of y)

    def part(self, sl: slice) -> Rollouts:
        v = None if self.verifier is None else self.verifier[sl]
        return Rollouts(self.xs[sl], self.zs[sl], self.ys[sl], self.index[sl], self.stopped[sl], self.lengths[sl], v,
                        spans=None if self.spans is None else self.spans[sl])


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
        self.ref_model = reference_model(model, args.beta, ref_model)  # π₀; None with LoRA (adapter disabled)
        self.train_problems = resolve_problems(train_dataset if train_dataset is not None else args.dataset,
                                               args.n_train, args.dataset_split, "train_dataset", args.problem_seed())
        if not self.train_problems:
            raise DataError("no training problems")
        # Held-out problems are loaded now when evaluation is scheduled (the Trainer wants an eval_dataset then),
        # else on the first `evaluate()` call.
        self._eval_source = eval_dataset if eval_dataset is not None else (args.eval_dataset or args.dataset)
        self.eval_problems: list[Problem] = []
        if eval_dataset is not None or args.eval_strategy != "no" or args.eval_on_start:
            self.eval_problems = resolve_problems(self._eval_source, args.n_eval, args.eval_split, "eval_dataset")
        train = encode_problems(tok, self.train_problems, args.prompt_template, args.answer_template)
        # "eval" is filled by `evaluate` with the problems it evaluated (loaded lazily: not known here)
        self.data_stats: dict[str, dict[str, int]] = {"train": {"problems": len(train),
                                                                       **input_skips(self.train_problems)}}
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._plans: list[Rollouts] = []
        self._eos = sorted({end_of_turn_id(tok), *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
        self._filter_loaded = False
        self.std_filter = latro.StdFilter(args.std_filter_beta, args.std_filter_ema, args.std_filter_ema_start,
                                          args.std_filter_start)
        super().__init__(model=model, args=args, train_dataset=train, eval_dataset=self.eval_problems or None,
                         processing_class=tok, data_collator=collate, **kwargs)
        if self.ref_model is not None:
            self.ref_model.to(self.accelerator.device)
        self.no_rationale = None  # RLPR's r' per training question, once, with the initial model
        if args.reward == "mean_prob" and args.rlpr_debias:
            self.no_rationale = latro.no_rationale_scores(self.model, [t["prompt_ids"] for t in train],
                                                          [t["answer_ids"] for t in train], pad_id(tok),
                                                          args.rollout_batch_size,
                                                          [t["answer_span"] for t in train]
                                                          if args.reward_span == "answer" else None).double()

    # -- data ---------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        return GroupSampler(len(ds), self.args.num_generations, seed=self.args.seed)

    # -- one update: rollouts and rewards for all its micro-batches, then the micro-batch losses -------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The update's micro-batches (HF prefetches them all), with the update's rollouts sampled and — when the
        update has several micro-batches — rewarded before any of them is optimised."""
        batches = list(itertools.islice(epoch_iterator, num_batches))  # fewer at the end of the data
        if batches:
            self._plan_update(batches)
        return batches, self._get_num_items_in_batch(batches, device)

    def _plan_update(self, batches: list[dict[str, Any]]) -> None:
        k = self.args.num_generations
        prompts, answers, index, sizes = [], [], [], []
        for b in batches:
            idx = b["index"].view(-1, k)
            if not bool((idx == idx[:, :1]).all()):
                raise RuntimeError("a batch does not hold whole groups of num_generations rollouts per question; "
                                   "use LaTROTrainer's sampler (per_device_train_batch_size a multiple of "
                                   "num_generations)")
            prompts += b["prompt_ids"][::k]
            answers += b["answer_ids"][::k]
            index += idx[:, 0].tolist()
            sizes.append(idx.shape[0])
        policy = self.accelerator.unwrap_model(self.model)
        self._plans, at = [], 0
        for m, (b, n) in enumerate(zip(batches, sizes)):
            # one sampling call per micro-batch, seeded by its slot: the same rollouts for 2 processes x 1
            # micro-batch as for 1 x 2, and again after a resume
            self._plans.append(self.rollouts(policy, prompts[at:at + n], answers[at:at + n], index[at:at + n],
                                             seed=self._rollout_seed(m)))
            b["plan"] = len(self._plans) - 1
            at += n
        if len(batches) > 1 or self.std_filter.beta > 0:
            with torch.no_grad():
                scores = [self._score(policy, p) for p in self._plans]
            self._finish(self._plans, [s[0] for s in scores], [s[1] for s in scores])
            for b, p in zip(batches, self._plans):
                b["units"] = p.keep.round().long().cpu()

    def _rollout_seed(self, micro: int = 0) -> int:
        """The seed of micro-batch `micro` of this update (`rl.update_seed`)."""
        slot = micro * self.accelerator.num_processes + self.accelerator.process_index
        return update_seed(self.args.seed, self.state.global_step, slot)

    def rollouts(self, model, prompt_ids: list[list[int]], answer_ids: list[list[int]] | None = None,
                 index: list[int] | None = None, seed: int | None = None) -> Rollouts:
        """K rollouts for each prompt, grouped by prompt. LaTRO: rationales z cut at the answer template (y is
        the reference answer); ``reward: verifier``: whole completions (z holds the model's own answer and its
        end-of-turn token, y is empty) scored by `ponder.verify.score`."""
        a, k = self.args, self.args.num_generations
        verifier = a.reward == "verifier"
        samples = rollout.sample(model, self.processing_class, prompt_ids, n=k, max_new_tokens=a.max_new_tokens,
                                 temperature=a.temperature, stop=[] if verifier else a.stop,
                                 seed=self._rollout_seed() if seed is None else seed,
                                 batch_size=a.rollout_batch_size, progress=False,
                                 backend=a.rollout_backend, dtype=a.rollout_dtype)
        index = index if index is not None else list(range(len(prompt_ids)))
        answer_ids = answer_ids if answer_ids is not None else [[] for _ in prompt_ids]
        out = Rollouts([], [], [], [], torch.zeros(0), [], [] if verifier else None)
        if a.reward in latro.SPAN_REWARDS and a.reward_span == "answer":
            out.spans = []
        stopped = []
        for x, y, i, row in zip(prompt_ids, answer_ids, index, samples):
            for s in row:
                if verifier:
                    z, ok = list(s.ids), s.finish_reason != "length"
                    out.verifier.append(verify.score(self.train_problems[i], s.text))
                    out.lengths.append(latro.rationale_length(self.processing_class, z, a.stop))
                else:
                    z, ok = latro.rationale_of(s, self._eos)
                    out.lengths.append(len(z))
                out.xs.append(x)
                out.zs.append(z)
                out.ys.append([] if verifier else y)
                if out.spans is not None:  # the answer's span when y is this training problem's (else all of y)
                    item = self.train_dataset[i] if 0 <= i < len(self.train_dataset) else None
                    out.spans.append(item["answer_span"] if item and item["answer_ids"] == y else None)
                out.index.append(i)
                stopped.append(ok)
        out.stopped = torch.tensor(stopped)
        if verifier:
            out.verifier = torch.tensor(out.verifier, dtype=torch.float64)
        return out

    def _score(self, model, p: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ log π(z|x), R) for a micro-batch's rollouts: one forward over the trees x -> z_k -> y_k (gradients flow unless under no_grad)."""
        reward = "logprob" if self.args.reward == "verifier" else self.args.reward
        logp_z, score = latro.score_ids(model, p.xs, p.zs, p.ys, pad_id(self.processing_class), reward=reward,
                                        spans=p.spans)
        if p.verifier is not None:
            score = p.verifier.to(logp_z.device, logp_z.dtype)
        return logp_z, score

    def ref_logp_z(self, model, xs, zs) -> torch.Tensor:
        """Σ log π₀(z|x): a pass over [x z] only (an empty y) with the frozen copy or the disabled adapter."""
        empty, pad = [[] for _ in xs], pad_id(self.processing_class)
        return reference_forward(self.ref_model, model, lambda m: latro.score_ids(m, xs, zs, empty, pad)[0])

    def _finish(self, plans: list[Rollouts], logp_z: list[torch.Tensor], score: list[torch.Tensor]) -> None:
        """Rewards, the std filter and advantages over ALL the rollouts of the update (`plans`), written into
        the plans: the non-stop penalty's mean, the filter's statistics and the normalisation span the update —
        under several processes the whole global update, gathered in slot order (`_whole_update`), so every
        process computes what one process with the same global batch computes."""
        a, k = self.args, self.args.num_generations
        policy = self.accelerator.unwrap_model(self.model)
        lz = torch.cat(logp_z).detach()
        u = UpdateRollouts(
            logp_z=lz, score=torch.cat(score).detach(), stopped=torch.cat([p.stopped for p in plans]).to(lz.device),
            ref=torch.cat([self.ref_logp_z(policy, p.xs, p.zs) for p in plans]) if a.beta > 0 else None,
            index=[i for p in plans for i in p.index], lengths=[n for p in plans for n in p.lengths],
            tokens=[sum(len(z) for z in p.zs) for p in plans],
            starts=[sum(len(q.xs) for q in plans[:j]) for j in range(len(plans))])
        if self.accelerator.num_processes > 1:
            u = self._whole_update(plans, u)
        lz, sy, stopped, ref, index = u.logp_z, u.score, u.stopped, u.ref, u.index
        r0 = self.no_rationale[index].to(sy.device, sy.dtype) if self.no_rationale is not None else None
        ids = [self.train_problems[i].id for i in index]
        # every reward is checked before it enters an advantage: the score itself, then the total with the KL term
        sy, skipped = finite_rewards(sy, a.nan_rewards, a.reward, ids)
        reward, kl = latro.self_rewards(sy, lz, ref, stopped, a.beta, a.nonstop_penalty,
                                        bounded=a.reward in latro.BOUNDED_REWARDS, baseline=r0)
        skipped_score = torch.isnan(sy) & torch.isnan(reward)  # already counted (a non-stopped one gets the floor)
        reward, more = finite_rewards(torch.where(skipped_score, 0.0, reward), a.nan_rewards,
                                      f"{a.reward} − beta·KL", ids)
        reward = torch.where(skipped_score, torch.nan, reward)
        skipped += more
        groups = reward.view(-1, k)
        step = self.state.global_step + 1
        if not self._filter_loaded:  # resume: the filter's EMA was saved with the trainer state
            self.std_filter.load(self.state.stateful_callbacks.get("LaTROStdFilter"))
            self._filter_loaded = True
        stds = latro.group_std(groups)
        threshold = self.std_filter.threshold(step)
        self.std_filter.observe(step, stds)
        self.state.stateful_callbacks["LaTROStdFilter"] = self.std_filter.state()
        keep = (stds >= threshold) | (threshold <= 0)
        skip = a.nan_rewards == "skip"
        if a.advantage == "rloo":
            adv = rloo_advantages(groups, skip_nan=skip)
        else:
            adv = group_normalized(groups, eps=1e-6, unbiased=True, skip_nan=skip)
        adv = torch.where(keep[:, None], adv, torch.zeros_like(adv)).view(-1)
        keep = keep[:, None].expand(-1, k).reshape(-1).to(lz.dtype)
        if a.normalize_advantages:  # TRL normalises over the batch of every process: the whole update here
            adv = normalize_advantages(torch.where(keep > 0, adv, torch.full_like(adv, float("nan"))))
        adv = torch.nan_to_num(adv, nan=0.0)
        for p, at in zip(plans, u.starts):
            n = len(p.xs)
            p.advantages, p.keep = adv[at:at + n], keep[at:at + n]
        self._record(sy, reward, kl, adv, stopped, lz, u.lengths, sum(u.tokens), keep, threshold, skipped)

    def _whole_update(self, plans: list[Rollouts], u: UpdateRollouts) -> UpdateRollouts:
        """Every process's rollouts of this update (`u`: this process's), in slot order (micro-step × processes
        + rank: the order of one process accumulating the same global batch), and where each of this process's
        plans starts in it."""
        n_proc, rank = self.accelerator.num_processes, self.accelerator.process_index
        mine, at = {}, 0
        for m, p in enumerate(plans):
            sl = slice(at, at + len(p.xs))
            mine[m * n_proc + rank] = {"lz": u.logp_z[sl].cpu(), "sy": u.score[sl].cpu(), "stopped": u.stopped[sl].cpu(),
                                       "ref": None if u.ref is None else u.ref[sl].cpu(), "index": p.index,
                                       "lengths": u.lengths[sl], "tokens": u.tokens[m]}
            at = sl.stop
        every: dict[int, dict] = {}
        for part in dist.gather(mine):
            every.update(part)
        order = sorted(every)
        offsets = {s: sum(len(every[t]["index"]) for t in order[:j]) for j, s in enumerate(order)}
        dev = u.logp_z.device
        cat = {key: torch.cat([every[s][key] for s in order]).to(dev) for key in ("lz", "sy", "stopped")}
        return UpdateRollouts(
            logp_z=cat["lz"], score=cat["sy"], stopped=cat["stopped"],
            ref=None if u.ref is None else torch.cat([every[s]["ref"] for s in order]).to(dev),
            index=[i for s in order for i in every[s]["index"]], lengths=[n for s in order for n in every[s]["lengths"]],
            tokens=[every[s]["tokens"] for s in order], starts=[offsets[m * n_proc + rank] for m in range(len(plans))])

    def weighted_loss_sum(self, model, inputs):
        if "plan" not in inputs:  # a batch that did not come through get_batch_samples (e.g. a direct call)
            self._plan_update([inputs])
        p = self._plans[inputs["plan"]]
        logp_z, score = self._score(model, p)
        if p.advantages is None:  # a one-micro-batch update: rewards from this very pass
            self._finish([p], [logp_z], [score])
        # a skipped (non-finite) reward has no answer-side term either (checked by _finish: else it raised)
        score = torch.where(torch.isfinite(score), score, torch.zeros_like(score))
        loss = latro.loss_terms(logp_z, score, p.advantages.to(logp_z.device), self.args.sft_weight)
        return (loss * p.keep.to(loss.device)).sum()

    # -- logging and evaluation ---------------------------------------------------------------------------

    def _record(self, score, reward, kl, adv, stopped, logp_z, lengths, tokens, keep, threshold, skipped=0):
        vals = {
            "reward": score.nanmean(),                       # R: Σ log π(y|x⊕z) for LaTRO, or the chosen reward
            "reward_total": reward.nanmean(),                # after the penalty, de-biasing and the KL term
            "kl": kl.mean(),
            "advantage_std": adv.view(-1, self.args.num_generations).std(dim=1, unbiased=False).mean(),
            "nonstop_fraction": (~stopped.bool()).to(kl.dtype).mean(),
            "rationale_length": kl.new_tensor(sum(lengths) / len(lengths)),
            "rollout_tokens": kl.new_tensor(float(tokens)),
            "logp_z": logp_z.mean(),
            "kept_fraction": keep.mean(),
            "std_threshold": kl.new_tensor(threshold),
            "nonfinite_rewards": kl.new_tensor(float(skipped)),  # skipped under nan_rewards: skip (else it raised)
        }
        if self.args.reward in ("logprob", "prob"):          # π(y|x⊕z): the probability of the gold answer
            vals["answer_prob"] = score.exp().nanmean() if self.args.reward == "logprob" else score.nanmean()
        names = list(vals)
        t = torch.stack([vals[n].double() for n in names])  # over the whole update: the same on every process
        for name, v in zip(names, t.tolist()):
            self._metrics[name].append(v)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and not any(k.startswith("eval_") for k in logs):
            for key, vals in self._metrics.items():
                logs[key] = sum(vals) / len(vals)
            self._metrics.clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Greedy accuracy and maj@k (k = eval_samples, temperature 1) on held-out problems, the paper's two
        inference modes (Table 2), with the training prompt template; logged, and usable as
        `metric_for_best_model` (e.g. eval_greedy_accuracy)."""
        a = self.args
        if eval_dataset is not None:
            problems = resolve_problems(eval_dataset, a.n_eval, a.eval_split, "eval_dataset")
        else:
            if not self.eval_problems:
                self.eval_problems = resolve_problems(self._eval_source, a.n_eval, a.eval_split, "eval_dataset")
            problems = self.eval_problems
        try:
            rendered = [Problem(p.id, latro.render_prompt(a.prompt_template, p.question, p.meta.get("options")),
                                p.answer, p.meta) for p in problems]
        except KeyError as e:
            raise DataError(f"eval problems: the prompt template has a field the problems lack: {e}") from None
        model = self.accelerator.unwrap_model(self.model)
        r = metrics.evaluate(model, self.processing_class, rendered, samples=a.eval_samples, temperature=1.0,
                             max_new_tokens=a.eval_max_new_tokens or a.max_new_tokens + 32,
                             batch_size=a.rollout_batch_size, seed=a.seed)
        r.pop("records")
        self.data_stats["eval"] = {"problems": r["n"], **({"skipped_too_long": r["skipped_too_long"]}
                                                          if r.get("skipped_too_long") else {})}
        out = {f"{metric_key_prefix}_{k}": float(v) for k, v in r.items() if k != "n"}
        self.log(out)
        self.control = self.callback_handler.on_evaluate(a, self.state, self.control, out)
        return out
