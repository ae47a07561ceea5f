"""LaTRO — Latent Reasoning Optimization (Chen et al., arXiv 2411.04282; papers.md §4): the public scoring
function and the small pure functions the trainer is made of.

The objective (Eq. 3) treats the rationale z as a latent variable and the model as its own reward:

    J(θ) = E_(x,y) [ E_{z~π_θ(·|x)} [ log π_θ(y | x⊕z) ] − β · KL[ π_θ(z|x) || π₀(z|x) ] ]

and its gradient is estimated from K rationales per question (Eq. 4, papers.md §4.4):

    ∇J ≈ 1/(N·K) Σ_i Σ_k [ A_k^(i) · ∇ log π_θ(z_k^(i)|x_i)  +  ∇ log π_θ(y_i | x_i⊕z_k^(i)) ]
    r_k = log π_θ(y | x⊕z_k) − β · (log π_θ(z_k|x) − log π₀(z_k|x)),   A_k = r_k − mean_{j≠k} r_j  (RLOO)

Both log π(z|x) and log π(y|x⊕z) are sums over tokens and come from ONE causal pass over ``[x ⊕ z ⊕ y]``
(π(z|x) does not depend on the y appended after it) — `score` / `score_ids`. The official code uses separate
passes over ``[x ⊕ z]`` and ``[x ⊕ z ⊕ y]`` (`score_separate` here, the baseline of ``bench/latro.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ponder.logprobs import logits_at, logprobs_of, reduce

# papers.md §4.7 (GSM8K, zero-shot, chat template) and the target y = "The answer is {gold}." + end-of-turn.
PROMPT_TEMPLATE = "{question} Let's think step by step."
ANSWER_TEMPLATE = "The answer is {answer}."
# papers.md §4.5: the official stop sequences (the function-call variants are left out). A rationale ends where
# the earliest of them begins; longer strings that start earlier ("Therefore, the answer is") take the lead-in
# words out of z as well.
STOP_STRINGS = ("The answer is", " the answer is", "so the final answer is", "So, the answer is",
                "Therefore, the answer is", "Answer:", " Answer:", "\nAnswer:")
LAYOUTS = ("split", "left", "right")


# ----------------------------------------------------------------------------------------------------------
# tokens
# ----------------------------------------------------------------------------------------------------------


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """x: the chat-templated user message with the generation prompt (= ``apply_chat_template(...,
    add_generation_prompt=True)``; ponder's ChatML template when the tokenizer has none)."""
    from ponder.chat import generation_prompt
    return generation_prompt(tokenizer, [{"role": "user", "content": prompt}])


def answer_ids(tokenizer, answer: str, eot: int | None = None) -> list[int]:
    """y: the answer text (e.g. "The answer is 42.") followed by the end-of-turn token."""
    if eot is None:
        from ponder.chat import end_of_turn_id
        eot = end_of_turn_id(tokenizer)
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [eot]


def rationale_of(sample, eos_ids: Sequence[int] = ()) -> tuple[list[int], bool]:
    """(z ids, stopped) from a `ponder.rollout.Sample` drawn with the answer template as a stop string.

    finish ``stop``: z is everything before the stop string (the rollout has already cut the stop text, and a
    token in which the stop string begins); ``eos``: z without the end-of-turn token — y continues the turn —
    and the rationale counts as stopped (eos is a stop token in the official code, papers.md §4.5);
    ``length``: the rationale reached L without stopping — it gets the non-stop penalty."""
    ids = list(sample.ids)
    if sample.finish_reason == "eos":
        while ids and ids[-1] in eos_ids:
            ids.pop()
        return ids, True
    return ids, sample.finish_reason == "stop"


# ----------------------------------------------------------------------------------------------------------
# fused scoring
# ----------------------------------------------------------------------------------------------------------


def pack(xs: Sequence[Sequence[int]], zs: Sequence[Sequence[int]], ys: Sequence[Sequence[int]], pad_id: int,
         layout: str = "split"):
    """Rows ``[x z y]`` as one padded batch.

    layout: ``split`` — x left-padded to a common width and ``z y`` right-padded (TRL's prompt/completion
    layout: every z starts in the same column, so logits are needed only from there on and ``[x z]`` is a
    column prefix); ``left`` — whole rows left-padded (the official code's pad-to-the-left re-arrangement);
    ``right`` — whole rows right-padded. Returns (input_ids, attention_mask, position_ids, z_pairs, y_pairs,
    first) with pairs (3, P) = (row, predictor column, target column) and `first` the first predictor column.
    Position ids count real tokens only, so padding never shifts RoPE positions."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not (len(xs) == len(zs) == len(ys)):
        raise ValueError(f"prompts, rationales and answers differ in number: {len(xs)}, {len(zs)}, {len(ys)}")
    if any(len(x) == 0 for x in xs):
        raise ValueError("an empty prompt x: there is no position to predict the first rationale token from")
    lx = [len(x) for x in xs]
    lzy = [len(z) + len(y) for z, y in zip(zs, ys)]
    if layout == "split":
        wx = max(lx)
        width = wx + max(lzy)
        starts = [wx - n for n in lx]
    else:
        width = max(a + b for a, b in zip(lx, lzy))
        starts = [width - a - b if layout == "left" else 0 for a, b in zip(lx, lzy)]
    ids = torch.full((len(xs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(xs), width), dtype=torch.long)
    zp, yp = [], []
    for r, (x, z, y, s) in enumerate(zip(xs, zs, ys, starts)):
        row = list(x) + list(z) + list(y)
        ids[r, s:s + len(row)] = torch.tensor(row, dtype=torch.long)
        att[r, s:s + len(row)] = 1
        zs_ = s + len(x)
        zp += [(r, c - 1, c) for c in range(zs_, zs_ + len(z))]
        yp += [(r, c - 1, c) for c in range(zs_ + len(z), zs_ + len(z) + len(y))]
    pos = (att.cumsum(1) - 1).clamp(min=0)
    first = min(s + n - 1 for s, n in zip(starts, lx))

    def pairs(p):
        return torch.tensor(p, dtype=torch.long).T.reshape(3, -1) if p else torch.zeros((3, 0), dtype=torch.long)
    return ids, att, pos, pairs(zp), pairs(yp), first


def _sums(model, ids, att, pos, pair_sets, first: int, n: int) -> list[torch.Tensor]:
    """One forward over `ids`; for each (3, P) pair set, the per-row sum of log p(target | predictor).
    Logits are computed only from column `first` on (`logits_to_keep`), which is where every target lives."""
    device = next(model.parameters()).device
    allp = torch.cat(pair_sets, dim=1).to(device)
    keep = ids.shape[1] - first
    logits = logits_at(model, ids.to(device), (allp[0], allp[1] - first), att.to(device), pos.to(device),
                       logits_to_keep=keep)
    lp = logprobs_of(logits, ids.to(device)[allp[0], allp[2]])
    out, at = [], 0
    for p in pair_sets:
        k = p.shape[1]
        out.append(reduce(lp[at:at + k], allp[0, at:at + k], n))
        at += k
    return out


def score_ids(model, xs: Sequence[Sequence[int]], zs: Sequence[Sequence[int]], ys: Sequence[Sequence[int]],
              pad_id: int, layout: str = "split") -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π(z|x), Σ log π(y|x⊕z)) per sample from ONE causal pass over the padded ``[x z y]`` rows.
    Gradients flow (wrap in ``torch.no_grad()`` for rewards). An empty y gives 0 and makes this the
    ``[x z]``-only pass (the reference model's KL term needs nothing else)."""
    ids, att, pos, zp, yp, first = pack(xs, zs, ys, pad_id, layout)
    lz, ly = _sums(model, ids, att, pos, [zp, yp], first, len(xs))
    return lz, ly


def score_separate(model, xs, zs, ys, pad_id: int, layout: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's way (papers.md §4.8): log π(z|x) from a pass over ``[x z]`` and log π(y|x⊕z)
    from a second pass over ``[x z y]``, both left-padded. Same numbers as `score_ids`, ~2x the compute."""
    empty = [[] for _ in xs]
    ids, att, pos, zp, _, first = pack(xs, zs, empty, pad_id, layout)
    (lz,) = _sums(model, ids, att, pos, [zp], first, len(xs))
    ids, att, pos, _, yp, _ = pack(xs, zs, ys, pad_id, layout)
    (ly,) = _sums(model, ids, att, pos, [yp], int(yp[1].min()) if yp.shape[1] else 0, len(xs))
    return lz, ly


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def score(model, tokenizer, prompts: Sequence[str], rationales: Sequence[str], answers: Sequence[str],
          layout: str = "split", batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LaTRO's two sums for each sample, from ONE fused causal pass over ``[x ⊕ z ⊕ y]``.

    prompts: user-message contents (the CoT trigger already in them); x = the chat template with the
    generation prompt. rationales: z = ``tokenizer(rationale, add_special_tokens=False)``. answers: the
    answer texts (e.g. "The answer is 42."); y = their tokens + the end-of-turn token. The pieces are
    concatenated at the token level, as the official code does. Returns (logp_z, logp_y), 1-D tensors with
    Σ_t log π(z_t | x, z_<t) and Σ_t log π(y_t | x⊕z, y_<t). Gradients flow unless called under no_grad.
    batch_size: score in chunks of this many samples (memory), default all at once.
    """
    from ponder.chat import end_of_turn_id
    if not (len(prompts) == len(rationales) == len(answers)):
        raise ValueError(f"prompts, rationales and answers differ in number: {len(prompts)}, {len(rationales)}, "
                         f"{len(answers)}")
    eot = end_of_turn_id(tokenizer)
    xs = [prompt_ids(tokenizer, p) for p in prompts]
    zs = [list(tokenizer(z, add_special_tokens=False)["input_ids"]) if z else [] for z in rationales]
    ys = [answer_ids(tokenizer, a, eot) for a in answers]
    step = batch_size or max(1, len(xs))
    parts = [score_ids(model, xs[i:i + step], zs[i:i + step], ys[i:i + step], _pad_id(tokenizer), layout)
             for i in range(0, len(xs), step)]
    if not parts:
        empty = torch.zeros(0)
        return empty, empty
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ----------------------------------------------------------------------------------------------------------
# rewards, advantages, loss (pure functions on 1-D tensors of per-rollout values)
# ----------------------------------------------------------------------------------------------------------


def nonstop_penalty(rewards: torch.Tensor, stopped: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Rationales that reached the length limit without a stop get γ × the batch mean reward (papers.md §4.5,
    following TRL's RLOO penalty; the official code uses γ = 2 and the mean over the local batch). The
    self-rewards are log-likelihoods (negative), so this doubles the badness of an average rationale."""
    stopped = stopped.to(torch.bool)
    if bool(stopped.all()):
        return rewards
    return torch.where(stopped, rewards, gamma * rewards.mean())


def self_rewards(logp_y: torch.Tensor, logp_z: torch.Tensor, ref_logp_z: torch.Tensor | None,
                 stopped: torch.Tensor, beta: float, gamma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward, kl) per rollout, detached: r = penalised log π(y|x⊕z) − β·(log π(z|x) − log π₀(z|x)).
    kl is the single-sample sequence-level estimate log π(z|x) − log π₀(z|x) folded into the reward
    (papers.md §4.8 step 4); zero without a reference model (β = 0)."""
    logp_y, logp_z = logp_y.detach(), logp_z.detach()
    kl = logp_z - ref_logp_z.detach() if ref_logp_z is not None else torch.zeros_like(logp_z)
    return nonstop_penalty(logp_y, stopped, gamma) - beta * kl, kl


def loss_terms(logp_z: torch.Tensor, logp_y: torch.Tensor, advantages: torch.Tensor,
               sft_weight: float = 1.0) -> torch.Tensor:
    """Per-rollout surrogate loss whose gradient is minus the rollout's Eq. 4 term:
    −A·Σlog π(z|x) + sft_weight·(−Σ log π(y|x⊕z)). Averaging over the N·K rollouts of an optimizer step gives
    the official ``rloo_loss + sft_penalty · sft_loss`` (both means over rollouts). sft_weight = 1 is Eq. 4;
    the official code's default (sft_penalty) is 0: only the rationale term."""
    loss = -advantages.detach() * logp_z
    if sft_weight:
        loss = loss - sft_weight * logp_y
    return loss


# ----------------------------------------------------------------------------------------------------------
# `ponder demo` hook (issue 7)
# ----------------------------------------------------------------------------------------------------------


def demo(run_dir, base: str, problems: list, quick: bool = False, *, steps: int | None = None,
         questions: int | None = None, k: int = 8, lr: float | None = None, sft_weight: float = 0.0,
         sft_lr: float | None = None, samples: int = 8, seed: int = 0) -> dict:
    """A short version of the testbed experiment for ``ponder demo``: base model vs plain SFT on gold rationales
    vs LaTRO, the two SFT/LaTRO runs with the same data budget (the same number of training questions), greedy
    accuracy and maj@k on the given held-out `problems`. Writes ``latro_demo.png`` (training curves and the
    accuracies) into `run_dir`. quick=True: a few steps on at most 8 problems (checks the plumbing only).
    The keyword arguments make it the full testbed experiment of docs/results/latro.md (e.g. steps=150)."""
    import time
    from pathlib import Path

    from ponder import data, metrics, models
    from ponder.trainers.latro import LaTROConfig, LaTROTrainer, plot
    from ponder.trainers.sft import SFTConfig, SFTTrainer

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Full mode: DEMO_STEPS updates of DEMO_QUESTIONS questions x K rationales (the testbed config's recipe,
    # shortened); sft_weight = 0 (the official default; see docs/results/latro.md for Eq. 4's sft_weight = 1).
    if quick:
        steps, questions, k, samples, problems = 2, 2, 2, 2, list(problems)[:8]
    steps, questions = steps or DEMO_STEPS, questions or DEMO_QUESTIONS
    lr, sft_lr = lr or DEMO_LR, sft_lr or DEMO_SFT_LR
    n_train = steps * questions
    common = dict(report_to=[], disable_tqdm=True, save_strategy="no", logging_steps=1 if quick else 5,
                  lr_scheduler_type="constant", seed=seed)
    timings, evals = {}, {}

    def evaluate(model, tok):
        model.eval()
        r = metrics.evaluate(model, tok, problems, samples=samples, max_new_tokens=96, batch_size=128, seed=seed)
        return {"greedy": r["greedy_accuracy"], "maj": r[f"maj@{samples}"]}

    model, tok = models.load(str(base))
    t = time.time()
    evals["base"] = evaluate(model, tok)
    timings["eval_base"] = time.time() - t

    # LaTRO: K self-sampled rationales per question, self-reward log p("The answer is {gold}." | x, z).
    t = time.time()
    cfg = LaTROConfig(output_dir=str(run_dir / "latro"), model=str(base), num_generations=k,
                      per_device_train_batch_size=questions * k, max_rationale_length=64, max_steps=steps,
                      learning_rate=lr, beta=0.05, sft_weight=sft_weight, prompt_template="{question}",
                      stop=["The answer is"], rollout_batch_size=128, **common)
    train = data.load_problems("testbed", n=n_train, split="train", seed=seed + 1)
    tr = LaTROTrainer(model=model, args=cfg, train_dataset=train, processing_class=tok)
    tr.train()
    timings["train_latro"] = time.time() - t
    t = time.time()
    evals["latro"] = evaluate(tr.model, tok)
    timings["eval_latro"] = time.time() - t
    history = tr.state.log_history

    # SFT on gold rationales: the same questions, one gold rationale each, batches of `questions`.
    t = time.time()
    sft_model, _ = models.load(str(base))
    scfg = SFTConfig(output_dir=str(run_dir / "sft"), model=str(base), per_device_train_batch_size=questions,
                     max_steps=steps, learning_rate=sft_lr, **common)
    conv = gold_conversations(train)
    st = SFTTrainer(model=sft_model, args=scfg, train_dataset=conv, processing_class=tok)
    st.train()
    timings["train_sft"] = time.time() - t
    t = time.time()
    evals["sft"] = evaluate(st.model, tok)
    timings["eval_sft"] = time.time() - t

    maj = f"maj@{samples}"
    curve = history + [{"step": 0, "eval_greedy_accuracy": evals["base"]["greedy"], f"eval_{maj}": evals["base"]["maj"]},
                       {"step": steps, "eval_greedy_accuracy": evals["latro"]["greedy"],
                        f"eval_{maj}": evals["latro"]["maj"]}]
    png = plot(curve, run_dir / "latro_demo.png",
               f"LaTRO on the testbed: {steps} steps x {questions} questions x K={k}",
               baselines={"SFT greedy": evals["sft"]["greedy"], f"SFT {maj}": evals["sft"]["maj"]})
    names = {"base": "testbed (base)", "sft": f"SFT on gold rationales ({n_train} questions)",
             "latro": f"LaTRO ({n_train} questions x K={k})"}
    rows = [[names[m], evals[m]["greedy"], evals[m]["maj"]] for m in ("base", "sft", "latro")]
    wins = {(o, name): evals["latro"][m] > evals[o][m] for o in ("base", "sft")
            for name, m in (("greedy", "greedy"), (maj, "maj"))}
    verdict = ("appeared" if all(wins.values()) else "partly appeared" if any(wins.values()) else "did not appear")
    detail = "; ".join(f"LaTRO > {'SFT' if o == 'sft' else 'base'} on {key}: {'yes' if w else 'no'}"
                       for (o, key), w in wins.items())
    notes = [f"The paper's direction (LaTRO > base and LaTRO > SFT) {verdict} in this run on {len(problems)} "
             f"held-out problems ({detail}).",
             f"LaTRO here uses sft_weight = {sft_weight:g} (the official code's default is 0, the paper's Eq. 4 is "
             "1; on the testbed weight 1 makes the model hedge its answers and accuracy drops, docs/results/latro.md).",
             "SFT and LaTRO train on the same questions; SFT gets one gold rationale per question (the testbed's "
             "own 'direct' format), "
             f"LaTRO samples K = {k} of its own and is rewarded by log p(gold answer | rationale)."]
    final = next((h for h in reversed(history) if "reward" in h), {})
    return {"title": "LaTRO: self-rewarding latent reasoning (testbed)",
            "columns": ["model", "greedy accuracy", maj], "rows": rows, "plots": [png.name], "notes": notes,
            "metrics": {"evals": evals, "seconds": timings, "steps": steps, "train_questions": n_train, "k": k,
                        "lr": lr, "sft_lr": sft_lr, "sft_weight": sft_weight, "final_reward": final.get("reward"),
                        "final_kl": final.get("kl")}}


# LaTRO's lr: 1e-5 kept the testbed's accuracy and improved it a little; 5e-5 and 2e-4 drifted (KL of several
# nats) and lost accuracy. SFT on gold rationales gets its best of 1e-5, 5e-5, 2e-4 (docs/results/latro.md).
DEMO_STEPS, DEMO_QUESTIONS, DEMO_LR, DEMO_SFT_LR = 30, 4, 1e-5, 5e-5


def gold_conversations(problems: list) -> list[list[dict]]:
    """Testbed problems with their gold rationale in the ``direct`` format the testbed was pre-trained on
    (SFT on a mixture of the four strategies first costs accuracy: it teaches new formats, not arithmetic)."""
    from ponder import testbed
    out = []
    for p in problems:
        reasoning, ans = testbed.solve(testbed.Arith(*(int(p.meta[k]) for k in "abc")), "direct")
        out.append([{"role": "user", "content": p.question},
                    {"role": "assistant", "reasoning": reasoning, "content": testbed.answer_text(ans)}])
    return out
