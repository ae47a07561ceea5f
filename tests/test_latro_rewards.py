"""The likelihood-reward family and TRL's RLOO options in the LaTRO trainer (docs/methods.md §4.11-§4.16):
golden advantages from TRL 1.16's RLOOTrainer (tests/data/trl_rloo_adv_golden.json: inputs and outputs recorded
from `RLOOTrainer._generate_and_score_completions`'s advantage code, None rewards included), every reward formula
against a value computed by hand from separately computed per-token log-probs of a tiny fp64 model, the answer-side
gradients (VeriFree's R·∇log π(y|x⊕z)), RLPR's de-biasing and its std filter against the official EMA rule, the
bounded non-stop penalty, and the ARC prompt."""

import json
import math
from pathlib import Path

import pytest
import torch

from ponder import data, latro, models
from ponder.advantages import group_normalized, normalize_advantages, rloo_advantages
from ponder.logprobs import token_logprobs
from ponder.trainers import latro as latro_trainer
from ponder.trainers.latro import LaTROConfig, LaTROTrainer, encode_problems

GOLDEN = json.loads((Path(__file__).parent / "data" / "trl_rloo_adv_golden.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# TRL's RLOO: NaN rewards, normalisation, KL in the reward
# ----------------------------------------------------------------------------------------------------------


def trl_rewards(per_func):
    """TRL's combination of reward functions (weights 1): nansum over functions; all-None -> NaN (unscorable)."""
    t = torch.tensor([[math.nan if v is None else v for v in row] for row in per_func], dtype=torch.float64)
    out = t.nansum(dim=1)
    out[torch.isnan(t).all(dim=1)] = math.nan
    return out


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_rloo_advantages_match_trl_golden_values(case):
    g = GOLDEN[case]
    inp = g["inputs"]
    r = trl_rewards(inp["r"])
    if "beta" in inp:  # TRL: rewards -= beta * kl, then RLOO — ponder's self_rewards does the same
        kl_logp = torch.tensor(inp["kl"], dtype=torch.float64)
        r, _ = latro.self_rewards(r, kl_logp, torch.zeros_like(kl_logp), torch.ones(len(r), dtype=torch.bool),
                                  inp["beta"])
    adv = rloo_advantages(r.view(-1, inp["G"]), skip_nan=True).view(-1)
    adv = normalize_advantages(adv) if inp.get("normalize") else torch.nan_to_num(adv, nan=0.0)
    assert torch.allclose(adv, torch.tensor(g["advantages"], dtype=torch.float64), atol=2e-7), (adv, g)


def test_nan_rewards_raise_unless_skipped():
    r = torch.tensor([[1.0, math.nan, 0.0, 1.0]])
    with pytest.raises(ValueError, match="nan_rewards: skip"):
        rloo_advantages(r)
    assert torch.nan_to_num(rloo_advantages(r, skip_nan=True)).tolist() == [[0.5, 0.0, -1.0, 0.5]]
    # GRPO with a NaN: refused, or (skip) the group's mean and std over the scorable rewards only
    with pytest.raises(ValueError, match="nan_rewards: skip"):
        group_normalized(r, unbiased=True)
    g = group_normalized(r, unbiased=True, skip_nan=True)
    want = torch.tensor([1.0, 0.0, 1.0]) - 2 / 3
    want = want / (want.pow(2).sum() / 2).sqrt()
    assert torch.isnan(g[0, 1]) and torch.allclose(g[0, [0, 2, 3]], want, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# reward formulas on a tiny fp64 model
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny64():
    return models.load("tiny-random", dtype="float64")


def per_token(model, x, z, y):
    """log π(y_t | x⊕z, y_<t) for each answer token, from a separate unpadded pass (the independent side)."""
    ids = torch.tensor([x + z + y])
    mask = torch.tensor([[False] * (len(x) + len(z)) + [True] * len(y)])
    return token_logprobs(model, ids, target_mask=mask)


def sample(tok):
    xs = [latro.prompt_ids(tok, q) for q in ("12+3*4=?", "7*8 apples", "x")]
    zs = [tok(t, add_special_tokens=False)["input_ids"] for t in ("3*4=12. 12+12=24.", "56", "")]
    ys = [latro.answer_ids(tok, a) for a in ("The answer is 24.", "The answer is fifty-six.", "No.")]
    return xs, zs, ys


def test_answer_scores_equal_hand_computed_values(tiny64):
    model, tok = tiny64
    xs, zs, ys = sample(tok)
    for i in range(3):
        ell = per_token(model, xs[i], zs[i], ys[i]).tolist()
        n = len(ell)
        hand = {"logprob": sum(ell), "mean_logprob": sum(ell) / n, "prob": math.exp(sum(ell)),
                "mean_prob": sum(math.exp(v) for v in ell) / n}
        for reward, want in hand.items():
            _, got = latro.score_ids(model, xs, zs, ys, tok.pad_token_id, reward=reward)
            assert abs(got[i].item() - want) <= 1e-12 * max(1.0, abs(want)), (reward, i)
    with pytest.raises(ValueError, match="reward must be one of"):
        latro.answer_score(torch.zeros(2), torch.zeros(2, dtype=torch.long), 1, "verifier")


def test_answer_side_gradients(tiny64):
    """−sft_weight·R's gradient is the reward's own gradient: for prob it is VeriFree's R·∇log π(y|x⊕z) (Eq. 7),
    for the means (1/|y|)∇Σℓ and (1/|y|)Σ p_t∇ℓ_t — each against a gradient assembled by hand."""
    model, tok = tiny64
    xs, zs, ys = sample(tok)
    params = list(model.parameters())

    def grad(f):
        g = torch.autograd.grad(f, params, allow_unused=True, retain_graph=True)
        return torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])

    for i in range(2):
        ell = per_token(model, xs[i], zs[i], ys[i])
        n = len(ell)
        g_logp = grad(ell.sum())
        g_tokens = [grad(ell[t]) for t in range(n)]
        r_prob = math.exp(ell.sum().item())
        hand = {"logprob": g_logp, "prob": r_prob * g_logp, "mean_logprob": g_logp / n,
                "mean_prob": sum(math.exp(ell[t].item()) * g_tokens[t] for t in range(n)) / n}
        for reward, want in hand.items():
            _, r = latro.score_ids(model, xs[i:i + 1], zs[i:i + 1], ys[i:i + 1], tok.pad_token_id, reward=reward)
            adv = torch.zeros(1, dtype=torch.float64)
            got = -grad(latro.loss_terms(torch.zeros(1, dtype=torch.float64, requires_grad=True), r, adv, 1.0).sum())
            scale = want.abs().max()
            assert scale > 0 and (got - want).abs().max() <= 1e-5 * scale, reward


def test_rlpr_debias_and_bounded_penalty_hand_values():
    r = torch.tensor([0.9, 0.2, 0.5, 0.7], dtype=torch.float64)
    r0 = torch.tensor([0.3, 0.4, 0.5, -0.6], dtype=torch.float64)
    assert torch.allclose(latro.debias(r, r0), torch.tensor([0.6, 0.0, 0.0, 1.0], dtype=torch.float64))
    stopped = torch.tensor([True, True, False, True])
    # bounded rewards: the non-stopped rollout gets the floor 0 (γ·mean would be a bonus); γ = 0: no penalty
    assert latro.nonstop_penalty(r, stopped, 2.0, bounded=True).tolist() == [0.9, 0.2, 0.0, 0.7]
    assert latro.nonstop_penalty(r, stopped, 0.0, bounded=True).tolist() == r.tolist()
    # log rewards: γ × the mean over all of them, the non-stopped one included (official)
    lr = torch.tensor([-1.0, -2.0, -3.0, -6.0])
    assert latro.nonstop_penalty(lr, stopped).tolist() == [-1.0, -2.0, -6.0, -6.0]
    # de-biasing comes before the penalty and the KL term
    reward, kl = latro.self_rewards(r, torch.tensor([-1.0] * 4, dtype=torch.float64),
                                    torch.tensor([-2.0] * 4, dtype=torch.float64), stopped, 0.1, bounded=True,
                                    baseline=r0)
    assert torch.allclose(reward, torch.tensor([0.5, -0.1, -0.1, 0.9], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------
# RLPR's std filter
# ----------------------------------------------------------------------------------------------------------


def official_thresholds(step_stds, beta=0.5, ratio=0.99, ema_start=6, start=11):
    """The official verl loop (`ray_trainer.py` fit, filter_mode EMA), transcribed step by step: lower bound at
    the start of each step, then that step's stds are collected."""
    score_std_list, ema, out = [], None, []
    for step, stds in enumerate(step_stds, 1):
        lower = 0.0
        if step >= ema_start:
            if step >= start:
                if ema is None:
                    ema = sum(score_std_list) / len(score_std_list)
                else:
                    ema = score_std_list[-1] * (1 - ratio) + ema * ratio
                lower = ema * beta
            score_std_list.append(sum(stds) / len(stds))
        out.append(lower)
    return out


def test_rlpr_no_rationale_score_covers_the_answer_span(tiny64):
    """r' (RLPR Eq. 3) scores the same tokens as the reward: the reference answer's own, by hand from a
    separate pass (reward_span: answer), or all of y (full)."""
    model, tok = tiny64
    xs = [latro.prompt_ids(tok, q) for q in ("12+3*4=?", "7*8 apples")]
    ys, spans = zip(*[latro.answer_span(tok, "The answer is {answer}.", a) for a in ("24", "fifty-six")])
    got = latro.no_rationale_scores(model, xs, list(ys), tok.pad_token_id, spans=list(spans))
    full = latro.no_rationale_scores(model, xs, list(ys), tok.pad_token_id)
    for i, (x, y, (a, b)) in enumerate(zip(xs, ys, spans)):
        lt = per_token(model, x, [], y).detach()
        assert 0 < a < b < len(y) and got[i].item() == pytest.approx(lt[a:b].exp().mean().item(), abs=1e-12)
        assert full[i].item() == pytest.approx(lt.exp().mean().item(), abs=1e-12)
        assert got[i].item() != pytest.approx(full[i].item(), abs=1e-6)


def test_std_filter_follows_the_official_ema_rule():
    g = torch.Generator().manual_seed(0)
    steps = [torch.rand(4, generator=g, dtype=torch.float64).tolist() for _ in range(16)]
    f = latro.StdFilter()
    got = []
    for step, stds in enumerate(steps, 1):
        got.append(f.threshold(step))
        f.observe(step, torch.tensor(stds, dtype=torch.float64))
    want = official_thresholds(steps)
    assert got[:10] == [0.0] * 10 and all(abs(a - b) < 1e-15 for a, b in zip(got, want))
    assert got[10] == 0.5 * sum(sum(s) / 4 for s in steps[5:10]) / 5 and got[11] != got[10]
    # state round trip (checkpoints)
    h = latro.StdFilter()
    h.load(f.state())
    assert h.threshold(17) == f.threshold(17)
    assert latro.StdFilter(beta=0.0).threshold(20) == 0.0


def test_group_std_is_bessel_corrected():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    assert torch.allclose(latro.group_std(r), torch.tensor([math.sqrt(1 / 3), 0.0], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------
# config, prompts, ARC
# ----------------------------------------------------------------------------------------------------------


def test_config_reward_options():
    with pytest.raises(ValueError, match="reward must be one of logprob, mean_logprob, prob, mean_prob, verifier"):
        LaTROConfig(output_dir="x", reward="likelihood", num_generations=2, per_device_train_batch_size=2)
    with pytest.raises(ValueError, match="sft_weight must be 0 with reward: verifier"):
        LaTROConfig(output_dir="x", reward="verifier", num_generations=2, per_device_train_batch_size=2)
    with pytest.raises(ValueError, match="advantage must be one of rloo, grpo"):
        LaTROConfig(output_dir="x", advantage="ppo", num_generations=2, per_device_train_batch_size=2)
    c = LaTROConfig(output_dir="x", reward="mean_prob", num_generations=2, per_device_train_batch_size=2)
    assert c.std_filter_beta == 0.5 and c.rlpr_debias
    c = LaTROConfig(output_dir="x", num_generations=2, per_device_train_batch_size=2, prompt_template="arc")
    assert c.std_filter_beta == 0.0 and c.prompt_template.startswith("Question: {question}\nOptions: {options}\n")
    assert not c.normalize_advantages and c.nan_rewards == "raise" and c.advantage == "rloo"


def test_arc_prompt_renders_options_as_the_official_python_list(tb_tok):
    opts = ["dry palms", "wet palms", "it's palms"]
    text = latro.render_prompt(latro.PROMPTS["arc"], "Which is best?", opts)
    assert text == ("Question: Which is best?\nOptions: ['dry palms', 'wet palms', \"it's palms\"]\n"
                    "Let's think step by step first then print your answer like 'The answer is (one of the "
                    "options)'.")
    # an ARC record (HF allenai/ai2_arc layout) -> the gold option text as the answer, options in meta
    rec = {"id": "Mercury_1", "question": "Which is best?", "answerKey": "B",
           "choices": {"text": opts, "label": ["A", "B", "C"]}}
    p = data.problem_from_record(rec, "arc.jsonl:1", 0)
    assert p.answer == "wet palms" and p.meta["options"] == opts
    enc = encode_problems(tb_tok, [p], "arc", "The answer is {answer}.")[0]
    assert tb_tok.decode(enc["answer_ids"]) == "The answer is wet palms.<|im_end|>"
    assert "['dry palms', 'wet palms', \"it's palms\"]" in tb_tok.decode(enc["prompt_ids"])
    with pytest.raises(data.DataError, match="problem 0: the prompt/answer template has a field the problem lacks"):
        encode_problems(tb_tok, [data.Problem("0", "q", "a")], latro.PROMPTS["arc"], "The answer is {answer}.")


def test_arc_and_free_text_verifiers():
    from ponder import verify
    arc = {"question": "q", "answer": "wet palms", "meta": {"verifier": "arc"}}
    # the official check's cases: first sentence with the phrase, substring test, '.'-splitting
    assert verify.score(arc, "Rubbing hands. The answer is wet palms.") == 1.0
    assert verify.score({**arc, "answer": "palms"}, "So. The answer is: 'wet palms'.") == 1.0
    assert verify.score({**arc, "answer": "3.5 m"}, "The answer is 3.5 m.") == 0.0
    assert verify.score(arc, "") == 0.0 and verify.score(arc, "I think wet palms") == 1.0
    text = {"question": "q", "answer": "Paris is the capital of France.", "meta": {"verifier": "text"}}
    assert verify.score(text, "<think>\nhmm\n</think>\n\nParis is the capital  of France") == 1.0
    assert verify.score(text, "Paris is the capital of France.\nNo, Lyon.") == 0.0
    assert verify.extract(text, "x\n'Paris is the capital of France!'") == "paris is the capital of france"


def test_testbed_words_task():
    from ponder import testbed
    cases = {0: "zero", 13: "thirteen", 40: "forty", 72: "seventy-two", 100: "one hundred", 110: "one hundred ten",
             712: "seven hundred twelve", 990: "nine hundred ninety", 1005: "one thousand five", -3: "minus three"}
    assert {n: testbed.number_words(n) for n in cases} == cases
    words, digits = data.load_problems("testbed:words", n=50, split="test"), data.load_problems("testbed", n=50,
                                                                                             split="test")
    assert [p.question for p in words] == [p.question for p in digits]
    assert all(w.answer == testbed.number_words(int(d.answer)) for w, d in zip(words, digits))
    from ponder import verify
    p = words[0]
    assert verify.score(p, f"<think>\nx\n</think>\n\nThe answer is {p.answer.upper()}.") == 1.0
    assert verify.score(p, f"The answer is {digits[0].answer}.") == 0.0  # digits are not the free-text answer


# ----------------------------------------------------------------------------------------------------------
# non-finite rewards in the trainer (docs/methods.md §4.11)
# ----------------------------------------------------------------------------------------------------------

PROBLEMS = [{"id": f"p{i}", "question": f"{10 + i}+{20 + i}=?", "answer": str(30 + 2 * i)} for i in range(4)]


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
@pytest.mark.parametrize("bad", [-math.inf, math.nan])
def test_trainer_non_finite_reward_is_refused_or_skipped(tmp_path, monkeypatch, advantage, bad):
    """One stopped rollout's R is −inf (or NaN): by default one line naming the reward and the problem (it used to
    give [+inf, +inf, NaN, +inf] advantages and an inf loss, or all zeros under normalize_advantages); with
    nan_rewards: skip the rollout leaves its group's baseline with advantage 0, the count is logged, and the other
    advantages are the estimator's over the scorable rewards, by hand, then TRL's normalisation."""
    model, tok = models.load("tiny-random", dtype="float64")
    opts = dict(output_dir=str(tmp_path), report_to=[], disable_tqdm=True, num_generations=4, advantage=advantage,
                per_device_train_batch_size=8, max_new_tokens=6, prompt_template="{question}", beta=0.1,
                reward="mean_logprob", save_strategy="no", max_steps=1, logging_steps=1, normalize_advantages=True,
                stop=list("0123456789+=?abcdefghij"))
    state = {}
    real_score = latro.score_ids

    def poisoned(*args, **kw):
        lz, score = real_score(*args, **kw)
        if len(args[3][0]):  # the reward pass (the reference pass has no y)
            score = score.clone()
            score[state["j"]] = bad
        return lz, score
    monkeypatch.setattr(latro_trainer.latro, "score_ids", poisoned)

    def trainer(**kw):
        tr = LaTROTrainer(model=model, args=LaTROConfig(**{**opts, **kw}), train_dataset=PROBLEMS,
                          processing_class=tok)
        real = tr.rollouts

        def spy(*args, **kw):  # poison the first rollout that stopped (a non-stopped one gets the penalty instead)
            out = real(*args, **kw)
            state["j"] = int(out.stopped.nonzero()[0])
            state["problem"] = PROBLEMS[out.index[state["j"]]]["id"]
            return out
        tr.rollouts = spy
        return tr

    tr = trainer()
    with pytest.raises(ValueError, match=r"^reward mean_logprob is (-inf|nan) for problem p\d \(1 of 8 rewards") as e:
        tr.train()
    assert f"is {bad} for problem {state['problem']} " in str(e.value)
    tr = trainer(nan_rewards="skip")
    seen = {}
    est = "rloo_advantages" if advantage == "rloo" else "group_normalized"
    fn = getattr(latro_trainer, est)
    monkeypatch.setattr(latro_trainer, est, lambda g, **kw: seen.setdefault("in", (g.clone(), fn(g, **kw)))[1])
    tr.train()
    log = [h for h in tr.state.log_history if "loss" in h][0]
    assert math.isfinite(log["loss"]) and log["nonfinite_rewards"] == 1
    groups, _ = seen["in"]
    j = state["j"]
    assert torch.isnan(groups.view(-1)[j]) and int(torch.isnan(groups).sum()) == 1
    want = []
    for g in groups:
        ok = ~torch.isnan(g)
        x = g[ok]
        a = x - (x.sum() - x) / (len(x) - 1) if advantage == "rloo" else (x - x.mean()) / (x.std() + 1e-6)
        row = torch.full_like(g, math.nan)
        row[ok] = a
        want.append(row)
    raw = torch.cat(want)
    valid = ~torch.isnan(raw)  # TRL's normalize_advantages over the update, NaN left out, then NaN -> 0
    want = torch.where(valid, (raw - raw[valid].mean()) / (raw[valid].std() + 1e-4), 0.0)
    assert want[j] == 0 and torch.allclose(tr._plans[0].advantages, want, atol=1e-9)
