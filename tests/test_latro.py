"""LaTRO: fused scoring equals separate passes (fp64), stop-string truncation, the non-stop penalty, RLOO, the
Monte-Carlo gradient estimate converging to the analytic gradient of Eq. 3 on a toy latent model, the trainer's
loss against an independent per-rollout reference, the LoRA reference model, exact resume, and the CLI."""

import json
import os
import random

import pytest
import torch

from ponder import latro, models, rollout
from ponder.advantages import rloo_advantages
from ponder.logprobs import token_logprobs
from ponder.recipes import latro as latro_recipe
from ponder.trainers import latro as latro_trainer
from ponder.trainers.latro import GroupSampler, LaTROConfig, LaTROTrainer, collate

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def tiny64():
    return models.load("tiny-random", dtype="float64")


def separate_reference(model, x, z, y):
    """Independent reference, one sample, no padding: Σ log p(z|x) from a forward over [x z] and
    Σ log p(y|x⊕z) from a forward over [x z y]."""
    xz = torch.tensor([x + z])
    lz = token_logprobs(model, xz, target_mask=torch.tensor([[False] * len(x) + [True] * len(z)])).sum()
    xzy = torch.tensor([x + z + y])
    ly = token_logprobs(model, xzy, target_mask=torch.tensor([[False] * (len(x) + len(z)) + [True] * len(y)])).sum()
    return lz, ly


def random_texts(rng, n):
    words = ["12", "+", "7*3", "=", "21.", " so", "<think>", "\n", "</think>", "apple", "x", "The answer is"]
    return ["".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for lo, hi in [(1, 6)] * n]


# ----------------------------------------------------------------------------------------------------------
# tokens
# ----------------------------------------------------------------------------------------------------------


def test_prompt_is_the_chat_template_with_generation_prompt(tb_tok, smol_tok):
    for tok in (tb_tok, smol_tok):
        msgs = [{"role": "user", "content": "Tom has 3 apples. Let's think step by step."}]
        ref = tok.apply_chat_template(msgs, add_generation_prompt=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert latro.prompt_ids(tok, msgs[0]["content"]) == list(ref)


def test_answer_ids_end_with_the_end_of_turn_token(tb_tok, smol_tok):
    assert latro.answer_ids(tb_tok, "The answer is 5.") == tb_tok("The answer is 5.", add_special_tokens=False)[
        "input_ids"] + [tb_tok.convert_tokens_to_ids(EOT)]
    assert len(tb_tok("The answer is", add_special_tokens=False)["input_ids"]) == 1  # one token in the testbed
    assert latro.answer_ids(smol_tok, "The answer is 5.")[-1] == smol_tok.convert_tokens_to_ids(EOT)


# ----------------------------------------------------------------------------------------------------------
# fused scoring
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["dense", "sparse", "auto"])
def test_fused_score_equals_separate_passes(tiny64, layout):
    model, tok = tiny64
    rng = random.Random(layout)
    # special-token strings in a user message are text (ponder.chat), unlike apply_chat_template's reference
    prompts = [p.replace("<think>", "").replace("</think>", "") for p in random_texts(rng, 7)]
    rationales = random_texts(rng, 7)
    rationales[2] = ""  # an empty rationale: log p(z|x) = 0, y follows x directly
    answers = [f"The answer is {rng.randint(0, 999)}." for _ in range(7)]
    lz, ly = latro.score(model, tok, prompts, rationales, answers, attention=layout)
    assert lz.shape == ly.shape == (7,) and lz.dtype == torch.float64
    eot = tok.convert_tokens_to_ids(EOT)
    for i, (p, r, a) in enumerate(zip(prompts, rationales, answers)):
        x = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
        z = tok(r, add_special_tokens=False)["input_ids"]
        y = tok(a, add_special_tokens=False)["input_ids"] + [eot]
        rz, ry = separate_reference(model, x, z, y)
        assert abs(lz[i].item() - rz.item()) <= 1e-9 and abs(ly[i].item() - ry.item()) <= 1e-9
    assert lz[2].item() == 0.0
    # rows of different lengths really were padded
    assert len({len(tok(p + r)["input_ids"]) for p, r in zip(prompts, rationales)}) > 1


def test_fused_gradients_and_official_two_pass_path(tiny64):
    model, tok = tiny64
    rng = random.Random(3)
    xs = [latro.prompt_ids(tok, p) for p in random_texts(rng, 5)]
    zs = [tok(r, add_special_tokens=False)["input_ids"] for r in random_texts(rng, 5)]
    ys = [latro.answer_ids(tok, f"The answer is {i}.") for i in range(5)]
    w = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.5], dtype=torch.float64)

    def grads(fn):
        model.zero_grad()
        lz, ly = fn()
        ((w * lz).sum() + (w.flip(0) * ly).sum()).backward()
        return lz.detach(), ly.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    fz, fy, fg = grads(lambda: latro.score_ids(model, xs, zs, ys, tok.pad_token_id))
    sz, sy, sg = grads(lambda: latro.score_separate(model, xs, zs, ys, tok.pad_token_id))

    def per_sample():
        out = [separate_reference(model, x, z, y) for x, z, y in zip(xs, zs, ys)]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
    rz, ry, rg = grads(per_sample)
    model.zero_grad()
    for a, b in [(fz, rz), (fy, ry), (sz, rz), (sy, ry)]:
        assert (a - b).abs().max() <= 1e-9
    # Llama's RMSNorm computes in fp32 even in an fp64 model, so the gradient of a sum and the sum of gradients
    # round differently (~1e-7); a real mistake (a detached or misaligned term) is O(1).
    scale = rg.abs().max()
    assert scale > 1e-3 and (fg - rg).abs().max() <= 1e-5 * scale and (sg - rg).abs().max() <= 1e-5 * scale


def test_score_rejects_mismatched_lengths(tiny64):
    model, tok = tiny64
    with pytest.raises(ValueError, match="differ in number"):
        latro.score(model, tok, ["a", "b"], ["z"], ["y", "y"])


# ----------------------------------------------------------------------------------------------------------
# stop strings and the non-stop penalty
# ----------------------------------------------------------------------------------------------------------


def test_stop_string_truncation_on_testbed_rollouts():
    """The testbed writes <think>…</think> then "The answer is N."; z must be exactly the think block."""
    model, tok = models.load("testbed")
    eot = tok.convert_tokens_to_ids(EOT)
    samples = rollout.sample(model, tok, ["12+34*5=?", "63+11*6=?"], n=4, max_new_tokens=64, stop=["The answer is"],
                             seed=0, progress=False)
    for s in (s for row in samples for s in row):
        z, stopped = latro.rationale_of(s, [eot])
        assert stopped and s.finish_reason == "stop"
        text = tok.decode(z)
        assert text.startswith("<think>\n") and text.endswith("</think>\n\n") and "The answer is" not in text
    # the same rollouts without a stop string run on to the answer and the end of turn
    full = rollout.sample(model, tok, ["12+34*5=?"], n=1, max_new_tokens=64, seed=0, progress=False)[0][0]
    assert full.finish_reason == "eos" and "The answer is" in full.text


def test_stop_string_cases_at_token_level(tb_tok, smol_tok):
    def cut(tok, text, stop, eos=()):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        got, txt, finish, idx, s = rollout._cut(tok, ids, set(eos), stop)
        sample = rollout.Sample(0, [], got, txt, finish, idx, s)
        z, stopped = latro.rationale_of(sample, list(eos))
        return tok.decode(z), stopped, finish

    stops = list(latro.STOP_STRINGS)
    # BPE: " The" is one token, so the stop string starts inside it and that token is dropped
    assert cut(smol_tok, "3 apples and 2 more. The answer is 5.", stops) == ("3 apples and 2 more.", True, "stop")
    # the earliest-starting stop string wins: the lead-in words leave z as well
    assert cut(smol_tok, "So 5. Therefore, the answer is 5.", stops)[0] == "So 5."
    assert cut(smol_tok, "x\nAnswer: 5", stops)[0] == "x"
    # no stop string within L: not stopped (gets the penalty)
    assert cut(smol_tok, "3 apples and 2 more apples", stops) == ("3 apples and 2 more apples", False, "length")
    # end of turn: stopped, and the end-of-turn token is not part of z
    eot = tb_tok.convert_tokens_to_ids(EOT)
    ids = tb_tok("<think>\nx\n</think>\n\n42", add_special_tokens=False)["input_ids"] + [eot]
    got, txt, finish, idx, s = rollout._cut(tb_tok, ids, {eot}, ["The answer is"])
    z, stopped = latro.rationale_of(rollout.Sample(0, [], got, txt, finish, idx, s), [eot])
    assert finish == "eos" and stopped and z == ids[:-1]


def test_nonstop_penalty_hand_values():
    r = torch.tensor([-1.0, -3.0, -2.0, -6.0])
    stopped = torch.tensor([True, False, True, True])
    # mean of the batch (-3) times gamma replaces the non-stopped reward
    assert latro.nonstop_penalty(r, stopped, 2.0).tolist() == [-1.0, -6.0, -2.0, -6.0]
    assert latro.nonstop_penalty(r, stopped, 1.5).tolist() == [-1.0, -4.5, -2.0, -6.0]
    assert latro.nonstop_penalty(r, torch.ones(4, dtype=torch.bool)).tolist() == r.tolist()
    # the KL term is added after the penalty: r - beta (logp_z - ref)
    logp_z, ref = torch.tensor([-5.0, -4.0, -3.0, -2.0]), torch.tensor([-4.0, -4.0, -4.0, -4.0])
    reward, kl = latro.self_rewards(r, logp_z, ref, stopped, beta=0.5, gamma=2.0)
    assert kl.tolist() == [-1.0, 0.0, 1.0, 2.0]
    assert reward.tolist() == [-0.5, -6.0, -2.5, -7.0]
    reward, kl = latro.self_rewards(r, logp_z, None, stopped, beta=0.0)
    assert kl.tolist() == [0.0] * 4 and reward.tolist() == [-1.0, -6.0, -2.0, -6.0]


def test_rloo_against_brute_force_leave_one_out():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 6, generator=g, dtype=torch.float64)
    a = rloo_advantages(r)
    for i in range(5):
        for k in range(6):
            others = [r[i, j] for j in range(6) if j != k]
            assert abs(a[i, k] - (r[i, k] - sum(others) / 5)) < 1e-12
    assert a.sum(1).abs().max() < 1e-12
    two = rloo_advantages(torch.tensor([[-3.0, -7.5]], dtype=torch.float64))
    assert two.tolist() == [[4.5, -4.5]]  # ±(r1 - r2)


# ----------------------------------------------------------------------------------------------------------
# the estimator on a toy latent model (docs/methods.md §4.10)
# ----------------------------------------------------------------------------------------------------------

X, Z, Y, BETA = 3, 4, 3, 0.3


def toy():
    g = torch.Generator().manual_seed(1)
    a0 = torch.randn(X, Z, generator=g, dtype=torch.float64)
    a = a0 + 0.7 * torch.randn(X, Z, generator=g, dtype=torch.float64)      # θ ≠ θ₀: the KL term matters
    b = 1.5 * torch.randn(X, Z, Y, generator=g, dtype=torch.float64)
    gold = torch.tensor([0, 2, 1])
    return a0, a, b, gold


def analytic(a0, a, b, gold, rloo_only: bool):
    """∇J of Eq. 3 (J = mean_x [ Σ_z π(z|x) log π(y|x,z) − β KL(π(·|x) || π₀(·|x)) ]) by autograd on the exact
    sum over z; rloo_only: the self-reward log π(y|x,z) held fixed (no gradient through it)."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    p, lp, lp0 = a.softmax(-1), a.log_softmax(-1), a0.log_softmax(-1)
    ly = b.log_softmax(-1).gather(-1, gold.view(X, 1, 1).expand(X, Z, 1)).squeeze(-1)  # (X, Z) log π(y*_x|x,z)
    if rloo_only:
        ly = ly.detach()
    j = ((p * ly).sum(-1) - BETA * (p * (lp - lp0)).sum(-1)).mean()
    ga, gb = torch.autograd.grad(j, [a, b], allow_unused=True)
    return ga, gb if gb is not None else torch.zeros_like(b)


def monte_carlo(a0, a, b, gold, sft_weight: float, m: int = 20000, k: int = 4, seed: int = 0):
    """M independent estimates of ∇J, each from one batch of K rationales per context through the trainer's
    functions (self_rewards -> rloo_advantages -> loss_terms, mean over rollouts). Each estimate gets its own
    copy of the tabular parameters, so one backward gives all M gradients. Returns (mean, standard error)."""
    g = torch.Generator().manual_seed(seed)
    ar = a.expand(m, X, Z).clone().requires_grad_()
    br = b.expand(m, X, Z, Y).clone().requires_grad_()
    zs = torch.multinomial(a.softmax(-1).repeat(m, 1), k, replacement=True, generator=g).view(m, X, k)
    logp_z = ar.log_softmax(-1).gather(-1, zs)                              # (m, X, k)
    ref = a0.log_softmax(-1).expand(m, X, Z).gather(-1, zs)
    ly_all = br.log_softmax(-1).gather(-1, gold.view(1, X, 1, 1).expand(m, X, Z, 1)).squeeze(-1)  # (m, X, Z)
    logp_y = ly_all.gather(-1, zs)
    lz, ly, lr = logp_z.reshape(-1), logp_y.reshape(-1), ref.reshape(-1)
    reward, _ = latro.self_rewards(ly, lz, lr, torch.ones_like(lz, dtype=torch.bool), BETA)
    adv = rloo_advantages(reward.view(-1, k)).view(-1)
    loss = latro.loss_terms(lz, ly, adv, sft_weight).view(m, X * k).mean(1).sum()
    grads = torch.autograd.grad(loss, [ar, br], allow_unused=True, materialize_grads=True)
    out = []
    for grad in (-grads[0], -grads[1]):
        out.append((grad.mean(0), grad.std(0) / m ** 0.5))
    return out


@pytest.mark.parametrize("sft_weight", [1.0, 0.0])
def test_estimator_converges_to_the_analytic_gradient(sft_weight):
    a0, a, b, gold = toy()
    want = analytic(a0, a, b, gold, rloo_only=sft_weight == 0)
    other = analytic(a0, a, b, gold, rloo_only=sft_weight != 0)
    est = monte_carlo(a0, a, b, gold, sft_weight)
    zmax, zother = 0.0, 0.0
    for (mean, se), w, o in zip(est, want, other):
        assert ((mean - w).abs() <= 5 * se + 1e-12).all(), ((mean - w) / se.clamp(min=1e-30)).abs().max()
        zmax = max(zmax, ((mean - w).abs() / se.clamp(min=1e-12)).max().item())
        zother = max(zother, ((mean - o).abs() / se.clamp(min=1e-12)).max().item())
    assert zmax < 5
    assert zother > 50  # the test can tell the two objectives apart
    # the estimate is precise: standard errors are small against the gradient
    assert max(se.max().item() for _, se in est) < 0.02 * max(w.abs().max().item() for w in want)


# ----------------------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------------------

PROBLEMS = [{"id": str(i), "question": f"{10 + i}+{20 + i}*{2 + i % 7}=?", "answer": str(10 + i + (20 + i) * (2 + i % 7))}
            for i in range(12)]


def make_trainer(model, tok, tmp_path, **kw):
    opts = dict(output_dir=str(tmp_path), report_to=[], disable_tqdm=True, num_generations=4,
                per_device_train_batch_size=8, max_new_tokens=10, prompt_template="{question}",
                stop=["1", "a"], learning_rate=1e-2, beta=0.3, sft_weight=0.7, save_strategy="no")
    opts.update(kw)
    return LaTROTrainer(model=model, args=LaTROConfig(**opts), train_dataset=PROBLEMS, processing_class=tok)


def spy_rollouts(tr):
    """Record what the trainer's `rollouts` returns: the rollouts of the last update, its micro-batches' calls
    joined in order (`calls`: their seeds)."""
    seen = {"calls": []}
    real = tr.rollouts

    def spy(*args, **kw):
        out = real(*args, **kw)
        if seen["calls"] and seen["calls"][-1][0] == tr.state.global_step and "out" in seen:
            prev = seen["out"]
            out_all = latro_trainer.Rollouts(prev.xs + out.xs, prev.zs + out.zs, prev.ys + out.ys,
                                             prev.index + out.index, torch.cat([prev.stopped, out.stopped]),
                                             prev.lengths + out.lengths,
                                             None if out.verifier is None else torch.cat([prev.verifier, out.verifier]),
                                             spans=None if out.spans is None else prev.spans + out.spans)
        else:
            out_all = out
        seen["calls"].append((tr.state.global_step, kw.get("seed")))
        seen["out"] = out_all
        return out
    tr.rollouts = spy
    return seen


def perturb(model, scale=0.05):
    with torch.no_grad():  # move the policy away from the reference copy so the KL term is not zero
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def reference_total(tr, model, roll, ys, reward="logprob", beta=0.3, sft_weight=0.7, k=4, r0=None, keep=None,
                    spans=None):
    """Independent reference for one update: per-rollout unpadded passes, the chosen reward by hand from the
    per-token log-probs (of y[a:b] for spans[i] = (a, b): the reference answer's own tokens), the non-stop penalty
    over ALL the update's rollouts, leave-one-out advantages by hand; returns the differentiable total loss (sum
    over rollouts) and the rewards."""
    n = len(roll.xs)
    lz, ry, ref = [], [], []
    for i, (x, z, y) in enumerate(zip(roll.xs, roll.zs, ys)):
        xz = torch.tensor([x + z])
        lz.append(token_logprobs(model, xz, target_mask=torch.tensor([[False] * len(x) + [True] * len(z)])).sum())
        with torch.no_grad():
            ref.append(token_logprobs(tr.ref_model, xz, target_mask=torch.tensor(
                [[False] * len(x) + [True] * len(z)])).sum())
        if reward == "verifier":
            ry.append(None)
            continue
        xzy = torch.tensor([x + z + y])
        lt = token_logprobs(model, xzy, target_mask=torch.tensor([[False] * (len(x) + len(z)) + [True] * len(y)]))
        if spans is not None:
            lt = lt[spans[i][0]:spans[i][1]]
        ry.append({"logprob": lt.sum(), "mean_logprob": lt.sum() / len(lt), "prob": lt.sum().exp(),
                   "mean_prob": lt.exp().sum() / len(lt)}[reward])
    if reward == "verifier":
        ry = [torch.tensor(v, dtype=torch.float64) for v in roll.verifier.tolist()]
    raw = [v.item() for v in ry]
    if r0 is not None:
        raw = [min(max(v - b, 0.0), 1.0) for v, b in zip(raw, r0)]
    bounded = reward in ("prob", "mean_prob", "verifier")
    mean = sum(raw) / n
    pen = [v if s else (0.0 if bounded else 2.0 * mean) for v, s in zip(raw, roll.stopped.tolist())]
    r = [v - beta * (a.item() - c.item()) for v, a, c in zip(pen, lz, ref)]
    adv = [r[i] - sum(r[j] for j in range(k * (i // k), k * (i // k) + k) if j != i) / (k - 1) for i in range(n)]
    keep = keep or [1.0] * n
    total = sum(w * (-A * a - sft_weight * b) for w, A, a, b in zip(keep, adv, lz, ry))
    return total, r, lz, ref


@pytest.mark.parametrize("reward", [*latro.REWARDS, "prob/full", "mean_prob/full"])
def test_trainer_loss_equals_independent_reference(tmp_path, reward, monkeypatch):
    reward, _, span = reward.partition("/")
    span = span or "answer"
    model, tok = models.load("tiny-random", dtype="float64")
    sft = 0.0 if reward == "verifier" else 0.7
    if reward == "verifier":  # a deterministic stand-in for the verifier: the random model never answers right
        monkeypatch.setattr(latro_trainer.verify, "score", lambda p, text: float(len(text) % 2))
        real = rollout.sample
        eot = tok.convert_tokens_to_ids(EOT)

        def some_end(model, tok_, prompts, **kw):  # the random model rarely ends a turn within L: end half of them
            out = real(model, tok_, prompts, **kw)
            for row in out:
                for j, s in enumerate(row[::2]):
                    ids = s.ids[:3 + j] + [eot]
                    row[2 * j] = rollout.Sample(s.prompt_index, s.prompt_ids, ids, tok_.decode(ids[:-1]), "eos")
            return out
        monkeypatch.setattr(latro_trainer.rollout, "sample", some_end)
    tr = make_trainer(model, tok, tmp_path, reward=reward, sft_weight=sft, rlpr_debias=False, reward_span=span)
    perturb(model)
    seen = spy_rollouts(tr)
    batch = collate([tr.train_dataset[0]] * 4 + [tr.train_dataset[5]] * 4)
    model.zero_grad()
    total = tr.weighted_loss_sum(model, batch)
    total.backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    roll = seen["out"]
    assert 0 < int(roll.stopped.sum()) < 8, "the test wants both stopped and non-stopped rationales"
    model.zero_grad()
    ys = [tr.train_dataset[0]["answer_ids"]] * 4 + [tr.train_dataset[5]["answer_ids"]] * 4
    if reward == "verifier":
        ys = [[]] * 8
        assert 0 < roll.verifier.sum() < 8 and all(z[-1] in tr._eos for z, s in zip(roll.zs, roll.stopped) if s)
    spans = None
    if reward in ("prob", "mean_prob") and span == "answer":  # RLPR / VeriFree: the reference answer's own tokens
        answers = [PROBLEMS[0]["answer"]] * 4 + [PROBLEMS[5]["answer"]] * 4
        spans = [hand_span(tok, y, "The answer is ", a) for y, a in zip(ys, answers)]
        assert all(0 < a < b < len(y) - 1 for (a, b), y in zip(spans, ys))  # template and end-of-turn left out
    expected, r, lz, ref = reference_total(tr, model, roll, ys, reward, sft_weight=sft, spans=spans)
    expected.backward()
    want = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert abs(total.item() - expected.item()) <= 1e-9
    scale = want.abs().max()  # gradients to fp32 precision: RMSNorm runs in fp32 (see the test above)
    assert scale > 1e-3 and (got - want).abs().max() <= 1e-5 * scale
    assert any(abs(v.item() - c.item()) > 1e-3 for v, c in zip(lz, ref))


def hand_span(tok, y, prefix, answer):
    """The tokens of y that carry the answer's characters, found by decoding prefixes of y (independent of the
    tokenizer's offsets): from the last token boundary at or before the answer's start to the first at or after
    its end."""
    a = max(i for i in range(len(y) + 1) if len(tok.decode(y[:i])) <= len(prefix))
    b = min(i for i in range(len(y) + 1) if len(tok.decode(y[:i])) >= len(prefix) + len(answer))
    return a, b


@pytest.mark.parametrize("answer", ["42", "-7", "3.25", "wet palms", "seven hundred twelve", "x"])
def test_answer_span_is_the_reference_answers_tokens(tb_tok, smol_tok, answer):
    for tok in (tb_tok, smol_tok):
        y, (a, b) = latro.answer_span(tok, "The answer is {answer}.", answer)
        assert y == latro.answer_ids(tok, f"The answer is {answer}.")
        assert (a, b) == hand_span(tok, y, "The answer is ", answer)
        assert answer in tok.decode(y[a:b]) and tok.decode(y[a:b]).strip() == answer
    # the answer alone (free-text templates): all of y but the end-of-turn token
    y, span = latro.answer_span(tb_tok, "{answer}", answer)
    assert span == (0, len(y) - 1)


def test_penalty_mean_spans_the_whole_update_under_gradient_accumulation(tmp_path):
    """gradient_accumulation_steps = 2: the rollouts of both micro-batches are sampled before either is optimised
    (one sampling call per micro-batch, seeded by its slot, so that 2 processes x 1 micro-batch sample the same;
    tests/test_procs.py), and the non-stop penalty's mean is over all 16 of them (the official code's local
    batch) — checked against a reference over all rollouts, against the micro-batch-mean variant (which
    differs), and against the same update done as one micro-batch of 16 on the same rollouts (identical
    gradient)."""
    model, tok = models.load("tiny-random", dtype="float64")
    perturb(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    items = [0, 5, 7, 2]
    rows = [it for i in items for it in [i] * 4]

    def run(ga, given=None):
        model.load_state_dict(state)
        tr = make_trainer(model, tok, tmp_path / f"ga{ga}", per_device_train_batch_size=16 // ga,
                          gradient_accumulation_steps=ga)
        seen = spy_rollouts(tr)
        if given is not None:  # the same rollouts as another run's update
            tr.rollouts = lambda *a, **kw: given
            seen["out"] = given
        chunks = [rows[i:i + 16 // ga] for i in range(0, 16, 16 // ga)]
        batches, units = tr.get_batch_samples(iter([collate([tr.train_dataset[i] for i in c]) for c in chunks]),
                                              ga, "cpu")
        assert int(units) == 16 and len(batches) == ga
        model.zero_grad()
        total = sum(tr.weighted_loss_sum(model, b) for b in batches)
        total.backward()
        if given is None:  # one sampling call per micro-batch, before any loss, each with its own seed
            seeds = [sd for _, sd in seen["calls"]]
            assert len(seeds) == ga and len(set(seeds)) == ga
        return tr, seen["out"], total, torch.cat([p.grad.flatten() for p in model.parameters()])

    tr, roll, total, got = run(2)
    stopped = roll.stopped.tolist()
    assert 0 < sum(stopped) < 16, "the test wants both stopped and non-stopped rationales"
    model.zero_grad()
    ys = [tr.train_dataset[i]["answer_ids"] for i in rows]
    expected, _, _, _ = reference_total(tr, model, roll, ys)
    expected.backward()
    want = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert abs(total.item() - expected.item()) <= 1e-9
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # the per-micro-batch mean (the old behaviour) gives another loss: the test can tell them apart
    halves = [latro_trainer.Rollouts(roll.xs[h], roll.zs[h], ys[h], roll.index[h], roll.stopped[h], roll.lengths[h])
              for h in (slice(0, 8), slice(8, 16))]
    with torch.no_grad():
        per_micro = sum(reference_total(tr, model, h, h.ys)[0] for h in halves)
    assert abs(per_micro.item() - expected.item()) > 1e-3
    _, roll1, total1, got1 = run(1, given=roll)
    assert abs(total1.item() - total.item()) <= 1e-9 and (got1 - got).abs().max() <= 1e-5 * got.abs().max()


def test_lora_reference_is_the_base_model_with_the_adapter_disabled(tmp_path):
    base, tok = models.load("tiny-random", dtype="float64")
    plain = [p.detach().clone() for p in base.parameters()]
    tr = make_trainer(base, tok, tmp_path, lora={"r": 4, "init_lora_weights": False})  # adapter != identity
    assert tr.ref_model is None  # no second copy in memory
    xs = [latro.prompt_ids(tok, p["question"]) for p in PROBLEMS[:3]]
    zs = [tok("2*3=6. 1+6=7.", add_special_tokens=False)["input_ids"]] * 3
    ref = tr.ref_logp_z(tr.model, xs, zs)
    policy = latro.score_ids(tr.model, xs, zs, [[]] * 3, tok.pad_token_id)[0]
    fresh, _ = models.load("tiny-random", dtype="float64")
    assert all(torch.equal(a, b) for a, b in zip(plain, fresh.parameters()))
    with torch.no_grad():
        want = latro.score_ids(fresh, xs, zs, [[]] * 3, tok.pad_token_id)[0]
    assert (ref - want).abs().max() <= 1e-12
    assert (policy.detach() - want).abs().max() > 1e-3  # the adapter really changes the policy


def test_group_sampler_keeps_groups_whole_and_changes_with_epoch():
    s = GroupSampler(5, 3, seed=0)
    first = list(s)
    assert len(first) == len(s) == 15 and sorted(set(first)) == list(range(5))
    assert all(first[i] == first[i - i % 3] for i in range(15))
    s.set_epoch(1)
    assert list(s) != first and sorted(list(s)) == sorted(first)


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        LaTROConfig(output_dir="x", num_generations=4, per_device_train_batch_size=6)
    with pytest.raises(ValueError, match=">= 2"):
        LaTROConfig(output_dir="x", num_generations=1, per_device_train_batch_size=4)
    c = LaTROConfig(output_dir="x")
    assert (c.num_generations, c.per_device_train_batch_size, c.learning_rate, c.beta, c.max_new_tokens,
            c.temperature, c.nonstop_penalty, c.sft_weight) == (16, 48, 5e-7, 0.05, 500, 1.0, 2.0, 1.0)


@pytest.mark.parametrize("name", ["testbed", "smollm2", "gpu"])
def test_shipped_configs_load(name):
    from ponder.config import load_config
    over = ["bf16=false"] if name == "gpu" else []  # bf16 needs a GPU
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config(LaTROConfig, os.path.join(root, "configs", "latro", f"{name}.yaml"), over)
    assert c.per_device_train_batch_size % c.num_generations == 0 and "{question}" in c.prompt_template
    if name == "gpu":  # the paper's GSM8K recipe: 16 rollouts x 3 accumulation steps x 8 GPUs = 384 per update
        assert (c.num_generations, c.learning_rate, c.beta, c.max_new_tokens) == (16, 5e-7, 0.05, 500)
        assert c.per_device_train_batch_size * c.gradient_accumulation_steps * 8 == 384


@pytest.mark.parametrize("reward", ["logprob", "mean_prob"])
def test_training_logs_metrics_and_resume_is_exact(tmp_path, reward):
    """Resume from a checkpoint repeats the straight run exactly — with mean_prob also RLPR's r' and the std
    filter's EMA state (saved with the trainer state), the filter active from update 2."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            control.should_training_stop = True

    extra = dict(reward=reward, std_filter_ema_start=1, std_filter_start=3, std_filter_beta=0.9,
                 reward_span="full") if reward == "mean_prob" else {}  # the span whose group stds drop a group

    def run(out, resume=None, crash=False):
        model, tok = models.load("tiny-random", dtype="float64")
        tr = make_trainer(model, tok, out, max_steps=5, save_strategy="steps", save_steps=3, logging_steps=1, seed=3,
                          **extra)
        if crash:
            tr.add_callback(Crash())
        tr.train(resume_from_checkpoint=resume)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), tr.state.log_history, tr

    straight, logs, tr = run(tmp_path / "a")
    logs = [h for h in logs if "reward" in h]
    for key in ("reward", "kl", "advantage_std", "nonstop_fraction", "rationale_length", "rollout_tokens"):
        assert key in logs[0]
    assert all(0 <= h["nonstop_fraction"] <= 1 for h in logs) and any(h["advantage_std"] > 0 for h in logs)
    if reward == "mean_prob":
        assert [h["std_threshold"] > 0 for h in logs] == [False, False, True, True, True]
        assert any(h["kept_fraction"] < 1 for h in logs), "the filter dropped no group: the test checks nothing"
        assert len(tr.std_filter.history) == 5 and tr.no_rationale.shape == (len(PROBLEMS),)
    else:
        assert "answer_prob" in logs[0]
    run(tmp_path / "b", crash=True)
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-3", "log.jsonl"]
    resumed, _, tr2 = run(tmp_path / "b", resume=True)
    assert torch.equal(straight, resumed)
    assert tr2.std_filter.state() == tr.std_filter.state()


def test_cli_latro_writes_report_and_plot(tmp_path):
    from typer.testing import CliRunner

    from ponder.cli import app
    cfg = tmp_path / "latro.yaml"
    cfg.write_text("model: tiny-random\ndataset: testbed\nn_train: 16\nprompt_template: '{question}'\n"
                   "stop: ['The answer is']\nnum_generations: 2\nper_device_train_batch_size: 4\n"
                   "max_new_tokens: 6\nmax_steps: 2\nlogging_steps: 1\neval_strategy: steps\neval_steps: 1\n"
                   "n_eval: 3\neval_samples: 2\nreport_to: none\nsave_strategy: 'no'\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["latro", "--config", str(cfg), f"output_dir={out}", "learning_rate=0.001"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 2 and "eval_greedy_accuracy" in m["final_eval"] and "eval_maj@2" in m["final_eval"]
    report = (out / "report.md").read_text()
    assert "latro.png" in report and (out / "latro.png").stat().st_size > 10_000
    assert (out / "final" / "config.json").exists()


def test_cli_latro_bad_config(tmp_path):
    from typer.testing import CliRunner

    from ponder.cli import app
    cfg = tmp_path / "latro.yaml"
    cfg.write_text("model: tiny-random\nnum_generations: 3\nper_device_train_batch_size: 4\n")
    r = CliRunner().invoke(app, ["latro", "--config", str(cfg)])
    assert r.exit_code == 2 and "multiple of num_generations" in r.output


@pytest.mark.slow
def test_smollm2_lora_smoke(tmp_path):
    """A few LaTRO steps on SmolLM2-135M-Instruct with LoRA: runs, and logs finite, plausible rewards."""
    model, tok = models.load("smollm2-135m", lora={"r": 8})
    problems = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                 "answer": str(a + b)} for a, b in [(3, 4), (12, 5)]]
    args = LaTROConfig(output_dir=str(tmp_path), report_to=[], disable_tqdm=True, num_generations=2,
                       per_device_train_batch_size=4, max_new_tokens=24, max_steps=2, logging_steps=1,
                       learning_rate=1e-4, save_strategy="no")
    tr = LaTROTrainer(model=model, args=args, train_dataset=problems, processing_class=tok)
    tr.train()
    logs = [h for h in tr.state.log_history if "reward" in h]
    assert len(logs) == 2
    for h in logs:
        assert -200 < h["reward"] < 0 and abs(h["kl"]) < 50 and 0 <= h["nonstop_fraction"] <= 1


def test_demo_quick_structure(tmp_path):
    """`ponder demo` hook: the quick mode on the testbed returns the table, notes and an existing PNG."""
    from ponder import data, testbed
    base = testbed.weights_dir()
    problems = data.load_problems("testbed", n=6, split="test")
    out = latro_recipe.demo(tmp_path, str(base), problems, quick=True)
    assert set(out) == {"title", "columns", "rows", "plots", "notes", "metrics", "vs_start"}
    assert out["columns"] == ["model", "greedy accuracy", "maj@2"]
    vs = out["vs_start"]  # per problem greedy correctness of the base and of LaTRO
    assert [sum(v) / len(v) for v in (vs["start"], vs["end"])] == pytest.approx([out["rows"][0][1], out["rows"][2][1]])
    assert [r[0].split(" ")[0] for r in out["rows"]] == ["testbed", "SFT", "LaTRO"]
    for row in out["rows"]:
        assert len(row) == 3 and all(0.0 <= v <= 1.0 for v in row[1:])
    assert out["plots"] and all((tmp_path / p).stat().st_size > 10_000 for p in out["plots"])
    ev = out["metrics"]["evals"]  # each claim's note carries this run's difference (over the same problems)
    note = next(n for n in out["notes"] if n.startswith("LaTRO − base, greedy"))
    assert f"{100 * (ev['latro']['greedy'] - ev['base']['greedy']):+.1f} points" in note
    assert "docs/results/latro-testbed.md" in note and "95%" in note
    assert out["metrics"]["steps"] == 2 and out["metrics"]["train_questions"] == 4


@pytest.mark.parametrize("task", ["testbed", "testbed:words"])
def test_sft_gold_arm_trains_on_exactly_the_latro_questions(tmp_path, task):
    """The experiment's SFT baseline: gold rationales of the very problems the LaTRO arm trains on (same data
    source, count and seed), with the reference answer LaTRO scores."""
    from ponder.config import load_config
    from ponder.data import read_jsonl
    from ponder.recipes import experiment
    cfg = tmp_path / "latro.yaml"
    cfg.write_text(f"model: tiny-random\ndataset: '{task}'\nn_train: 6\nnum_generations: 2\n"
                   "per_device_train_batch_size: 4\nprompt_template: '{question}'\n")
    rows = experiment.run_sft_gold(str(cfg), {"sft": {"max_steps": 1, "per_device_train_batch_size": 2},
                                              "eval": {"n_eval": 2, "samples": 0, "max_new_tokens": 4}},
                                   0, tmp_path / "sft", None)
    assert 0 <= rows["sft"]["greedy_accuracy"] <= 1
    gold = [rec["messages"] for _, rec in read_jsonl(tmp_path / "sft" / "gold.jsonl")]
    tr = LaTROTrainer(args=load_config(LaTROConfig, cfg, [f"output_dir={tmp_path / 'l'}", "report_to=none"]))
    assert [m[0]["content"] for m in gold] == [p.question for p in tr.train_problems]
    assert [m[1]["content"] for m in gold] == [f"The answer is {p.answer}." for p in tr.train_problems]
    for m, p in zip(gold, tr.train_problems):
        a, b, c = (p.meta[k] for k in "abc")
        assert m[1]["reasoning"] == f"{b}*{c}={b * c}. {a}+{b * c}={a + b * c}."
    if task == "testbed:words":
        assert not any(ch.isdigit() for p in tr.train_problems for ch in p.answer)


def _numbers(text):
    import re
    return [int(x) for x in re.findall(r"-?\d+", text)]


def test_gold_rationales_of_reasoning_gym_tasks_reach_the_packages_answer():
    """The worked rationale of every problem ends in reasoning-gym's own answer (its last number), each step's
    arithmetic is right (checked here by hand, not by the builder's code path), and the SFT conversation puts
    it in LaTRO's prompt and answer templates."""
    from ponder import data
    specs = ["rg:basic_arithmetic:min_terms=2,max_terms=2,max_digits=1,allow_parentheses=false,operators=+-*",
             "rg:chain_sum:min_terms=2,max_terms=5,max_digits=2", "rg:leg_counting:max_animals=3,max_instances=4"]
    for spec in specs:
        problems = data.load_problems(spec, n=60, split="test")
        convs = latro_recipe.gold_conversations(problems, "direct", "{question} Think.", "The answer is {answer}.")
        for p, conv in zip(problems, convs):
            assert conv[0] == {"role": "user", "content": f"{p.question} Think."}
            reply = conv[1]["content"]
            assert reply.endswith(f" The answer is {p.answer}.")
            rationale = reply.removesuffix(f" The answer is {p.answer}.")
            assert _numbers(rationale)[-1] == int(p.answer) or " In total " in rationale, (spec, rationale)
            import re
            rationale, _, total = rationale.partition(" In total ")
            if total:  # "12 + 0 + 6 = 18."
                terms, result = total.rstrip(".").split(" = ")
                assert sum(map(int, terms.split(" + "))) == int(result) == int(p.answer)
                assert [int(t) for t in terms.split(" + ")] == [x[-1] for x in map(_numbers, rationale.split(". "))]
            steps = re.findall(r"(-?\d+) ([-+*×]) (-?\d+) = (-?\d+)", rationale)
            assert steps, rationale
            for a, op, b, r in steps:
                a, b, r = int(a), int(b), int(r)
                assert {"+": a + b, "-": a - b, "*": a * b, "×": a * b}[op] == r, (spec, rationale)
    answers_only = latro_recipe.gold_conversations(data.load_problems("rg:family_relationships", n=3), "answer")
    assert answers_only[0][1]["content"].startswith("The answer is ")
    fam = data.load_problems("rg:family_relationships:min_family_size=4,max_family_size=4", n=3)
    for p, conv in zip(fam, latro_recipe.gold_conversations(fam, "direct")):
        story = p.question.split("\n\n")[0].strip()
        m = p.meta["entry"]["metadata"]
        assert conv[1]["content"] == f"{story} We want {m['person1']} to {m['person2']}. The answer is {p.answer}."
    with pytest.raises(ValueError, match="no gold rationale for this task; use gold_strategy: answer"):
        latro_recipe.gold_conversations(data.load_problems("rg:gcd", n=3), "direct")
    with pytest.raises(ValueError, match="strategy"):
        latro_recipe.gold_conversations(data.load_problems("rg:chain_sum", n=3), "split")


def test_rollouts_run_in_the_configs_rollout_dtype(tiny, tmp_path, monkeypatch):
    """rollout_dtype reaches the sampler: bf16 rollouts on the trainer's fp32 model (and it stays fp32)."""
    model, tok = tiny
    seen, real = [], rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda *a, **kw: seen.append(kw.get("dtype")) or real(*a, **kw))
    tr = make_trainer(model, tok, tmp_path, max_steps=1, rollout_dtype="bfloat16", per_device_train_batch_size=4)
    tr.train()
    assert seen and set(seen) == {"bfloat16"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
