"""RISE: golden prompt strings, the environment, collection (best-of-n, early stop, teacher turns, degenerate
filter), the converter (weights, criteria, duplicates), the one-sequence loss and gradient equal to the official
per-turn examples (fp64), the sequential metrics on hand-made arrays, evaluation, and the `ponder rise` loop."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from ponder import chat, models, rise
from ponder.metrics import sequential_metrics
from ponder.recipes import rise as rise_recipe
from ponder.rollout import Sample
from ponder.trainers.rise import RISEConfig, RISETrainer

# ----------------------------------------------------------------------------------------------------------
# golden strings (docs/methods.md §3.3; cmu-mind/RISE environments/gsm8k.py, utils/template.py)
# ----------------------------------------------------------------------------------------------------------

PAPER_INSTRUCTION = (
    "You are an AI language model designed to assist with math problem-solving. In this task, I will provide you "
    "with math problems. Your goal is to solve the problem step-by-step, showing your reasoning at each step. After "
    "you have finished solving the problem, present your final answer as \\boxed{Your Answer}.\n\nHere is the math "
    "word problem for you to solve:\n\nOf the 60 students in the drama club, 36 take mathematics, 27 take physics "
    "and 20 students take both mathematics and physics. How many drama club students take neither mathematics nor "
    "physics?")


def test_golden_prompts():
    assert rise.RETRY_PROMPT == "The answer is incorrect. Please try again. Here's the question: {query}"
    assert rise.FIRST_TURN_PROMPT == ("Great job! You've successfully answered the question. Now, let's move on to "
                                      "the next one.\n{query}")
    assert rise.SUCCESS_PROMPT == "Great job! You've successfully answered the question."
    assert rise.RETRY_PROMPT.format(query="1+2*3=?") == ("The answer is incorrect. Please try again. Here's the "
                                                          "question: 1+2*3=?")
    # the official literal is a triple-quoted string with a newline at both ends
    assert rise.INSTRUCTION == "\n" + PAPER_INSTRUCTION + "\n"
    assert rise.DEMO_ANSWER.startswith("Step 1: To find the number of drama club students")
    assert "$60 - 16 - 7 - 20 = \\boxed{17}$ students taking neither. Answer: \\boxed{17}" in rise.DEMO_ANSWER
    assert rise.DEMO_ANSWER.endswith("Answer: \\boxed{17}")
    # the testbed was pre-trained on retry episodes with exactly this prompt
    from ponder import testbed
    assert testbed.RETRY_PROMPT == rise.RETRY_PROMPT


def test_reward_weights():
    assert rise.reward_weight(1.0) == pytest.approx(12.18, abs=5e-3)
    assert rise.reward_weight(0.0) == 1.0
    assert rise.reward_weight(-1.0) == pytest.approx(0.082, abs=5e-4)
    assert rise.reward_weight(1.0, tau=1.0) == pytest.approx(math.e)
    t = rise.reward_weight(torch.tensor([1.0, 0.0, -1.0]))
    assert torch.allclose(t, torch.tensor([math.exp(2.5), 1.0, math.exp(-2.5)]))


# ----------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------

PROB = {"id": "p0", "question": "12+34*5=?", "answer": "182", "meta": {"task": "testbed"}}
GSM = {"id": "g0", "question": "Tom has 3 apples and buys 1,204 more. How many?", "answer": "1207"}


def reply(reasoning, answer):
    return f"<think>\n{reasoning}\n</think>\n\nThe answer is {answer}."


def test_env_reset_and_feedback():
    env = rise.Env()
    assert env.reset(PROB) == [{"role": "user", "content": "12+34*5=?"}]
    demo = rise.Env(demo=True).reset(GSM)
    assert [m["role"] for m in demo] == ["user", "assistant", "user"]
    assert demo[0]["content"] == rise.INSTRUCTION and demo[1]["content"] == rise.DEMO_ANSWER
    assert demo[1]["weight"] == 0.0
    assert demo[2]["content"] == ("Great job! You've successfully answered the question. Now, let's move on to the "
                                  "next one.\nTom has 3 apples and buys 1,204 more. How many?")
    msgs, r, done = env.step(PROB, env.reset(PROB), reply("34*5=170. 12+170=182.", 182))
    assert (r, done) == (1.0, True) and msgs[-1] == {"role": "user", "content": rise.SUCCESS_PROMPT}
    assert msgs[1] == {"role": "assistant", "reasoning": "34*5=170. 12+170=182.", "content": "The answer is 182."}
    msgs, r, done = env.step(PROB, env.reset(PROB), reply("34*5=160. 12+160=172.", 172))
    assert (r, done) == (0.0, False)
    assert msgs[-1]["content"] == "The answer is incorrect. Please try again. Here's the question: 12+34*5=?"
    ev = rise.Env(evaluation=True)  # at evaluation the feedback is always "incorrect" and nothing ends
    msgs, r, done = ev.step(PROB, ev.reset(PROB), reply("34*5=170. 12+170=182.", 182))
    assert (r, done) == (1.0, False) and msgs[-1]["content"].startswith("The answer is incorrect.")


def test_gsm8k_reward():
    env = rise.Env(reward="gsm8k")
    assert env.score(GSM, "so 3 + 1204 = \\boxed{1,207}") == 1.0
    assert env.score(GSM, "\\boxed{1206}") == 0.0
    assert env.score(GSM, "The answer is 1207.") == -1.0       # no \boxed{}: unparsable
    assert env.score(GSM, "\\boxed{seven}") == -1.0
    assert env.answer(GSM, "first \\boxed{3} then \\boxed{1,207}") == "1207"
    with pytest.raises(ValueError, match="reward must be one of"):
        rise.Env(reward="nope")


def test_history_attempts_render_without_reasoning(tb_tok):
    """The second attempt is generated from the first attempt's answer, not its reasoning (as at inference)."""
    env = rise.Env()
    msgs, _, _ = env.step(PROB, env.reset(PROB), reply("34*5=160. 12+160=172.", 172))
    text = tb_tok.decode(chat.generation_prompt(tb_tok, msgs))
    assert text == ("<|im_start|>user\n12+34*5=?<|im_end|>\n<|im_start|>assistant\nThe answer is 172.<|im_end|>\n"
                    "<|im_start|>user\nThe answer is incorrect. Please try again. Here's the question: 12+34*5=?"
                    "<|im_end|>\n<|im_start|>assistant\n")


def test_sliding_window():
    u0 = {"role": "user", "content": "q"}
    pairs = [[{"role": "assistant", "content": f"a{i}"}, {"role": "user", "content": f"f{i}"}] for i in range(4)]
    msgs = [u0] + [m for p in pairs for m in p]
    assert rise.window(msgs, 0, 2) == [u0] + pairs[3]
    assert rise.window(msgs, 0, 3) == [u0] + pairs[2] + pairs[3]
    assert rise.window(msgs, 0, 1) == [u0]
    assert rise.window(msgs, 0, 0) == msgs and rise.window(msgs, 0, None) == msgs
    assert rise.window(msgs[:3], 0, 2) == msgs[:3]   # fewer turns than the window: unchanged
    demo = rise.demo_messages()
    assert rise.window(demo + msgs, 2, 2) == demo + [u0] + pairs[3]


def test_degenerate_filter():
    assert not rise.is_degenerate("the " * 150)
    assert rise.is_degenerate("The " * 100 + "the " * 51)   # lower-cased before counting
    assert rise.is_degenerate("x" * 301)
    assert not rise.is_degenerate("x" * 300 + " ok")


# ----------------------------------------------------------------------------------------------------------
# collection, with a scripted sampler
# ----------------------------------------------------------------------------------------------------------


class Script:
    """Stands in for `ponder.rollout.sample`: returns scripted texts per (turn, problem question) and records
    the prompts (the token ids the environment rendered, decoded) and the model each call was made with."""

    def __init__(self, texts, tok):
        self.texts, self.tok, self.calls = texts, tok, []

    def __call__(self, model, tok, prompts, n=1, seed=0, **kw):
        decoded = [self.tok.decode(p) for p in prompts]
        self.calls.append({"model": model, "prompts": decoded, "n": n, "backend": kw.get("backend", "auto"),
                           "dtype": kw.get("dtype", "auto")})
        turn = len(self.calls) - 1
        out = []
        for i, p in enumerate(decoded):
            q = next(q for q in self.texts if q in p)
            texts = self.texts[q][turn]
            assert len(texts) == n
            out.append([Sample(i, [], [], t, "eos") for t in texts])
        return out


PROBS = [{"id": "a", "question": "10+20*3=?", "answer": "70", "meta": {"task": "testbed"}},
         {"id": "b", "question": "11+10*2=?", "answer": "31", "meta": {"task": "testbed"}}]


def test_collect_best_of_n_early_stop_and_teacher(monkeypatch, tb_tok):
    from ponder import rollout
    script = Script({
        "10+20*3=?": [[reply("r", 60)], [reply("r", 61), reply("r", 70), reply("r2", 70)]],
        "11+10*2=?": [[reply("r", 31)]],
    }, tb_tok)
    monkeypatch.setattr(rollout, "sample", script)
    recs = rise.collect("learner", tb_tok, PROBS, turns=3, samples=[1, 3], teacher=("teacher", tb_tok),
                        progress=False, dtype="bfloat16")
    a, b = recs
    assert [c["dtype"] for c in script.calls] == ["bfloat16", "auto"]  # the teacher samples as it is
    assert [x["reward"] for x in a["attempts"]] == [0.0, 1.0] and a["success"] and a["max_reward"] == 1.0
    assert a["attempts"][1]["text"] == reply("r", 70)            # best of 3; the first of the tied best
    assert [c["reward"] for c in a["attempts"][1]["candidates"]] == [0.0, 1.0, 1.0]
    assert a["attempts"][0]["feedback"] == rise.RETRY_PROMPT.format(query="10+20*3=?")
    assert a["attempts"][1]["feedback"] == rise.SUCCESS_PROMPT
    assert len(b["attempts"]) == 1 and b["success"]               # solved at turn 1: the episode stops
    assert [c["model"] for c in script.calls] == ["learner", "teacher"]   # turn 3 never runs: all done
    assert [c["n"] for c in script.calls] == [1, 3]
    assert len(script.calls[1]["prompts"]) == 1                  # only the unfinished episode continues
    # the paper's MDP: the earlier attempt is shown in full, reasoning included (history_reasoning keep)
    assert "<|im_start|>assistant\n<think>\nr\n</think>\n\nThe answer is 60.<|im_end|>" in script.calls[1]["prompts"][0]
    assert a["attempts"][0]["source"] == "policy" and a["attempts"][1]["source"] == "teacher"
    assert rise.collection_summary(recs)["by_turn"][0] == {"turn": 1, "episodes": 2, "success": 0.5,
                                                            "candidate_success": 0.5}


def test_collect_drops_degenerate_samples(monkeypatch, tb_tok):
    from ponder import rollout
    junk = "9 " * 200
    script = Script({"10+20*3=?": [[junk, reply("r", 70)]], "11+10*2=?": [[junk, junk]]}, tb_tok)
    monkeypatch.setattr(rollout, "sample", script)
    a, b = rise.collect("m", tb_tok, PROBS, turns=2, samples=2, progress=False)
    assert a["attempts"][0]["text"] == reply("r", 70) and a["attempts"][0]["candidates"][0]["degenerate"]
    assert b["attempts"] == [] and b["blocked"] and not b["success"]


def test_collect_on_a_real_model_is_deterministic(tiny):
    model, tok = tiny
    kw = dict(turns=2, samples=[1, 2], max_new_tokens=8, seed=3, progress=False)
    r1, r2 = rise.collect(model, tok, PROBS, **kw), rise.collect(model, tok, PROBS, **kw)
    assert r1 == r2 and all(len(r["attempts"]) == 2 for r in r1)   # a random model never succeeds


# ----------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------


def trajectory(rewards, texts=None, demo=False, question="10+20*3=?"):
    env = rise.Env(demo=demo)
    prob = {"question": question, "answer": "70"}
    texts = texts or [reply(f"step {i}", 60 + i) for i in range(len(rewards))]
    atts = []
    for i, (r, t) in enumerate(zip(rewards, texts)):
        fb = rise.SUCCESS_PROMPT if r >= 1 else rise.RETRY_PROMPT.format(query=question)
        atts.append({"turn": i, "text": t, "reward": r, "feedback": fb})
    return {"id": "t", "question": question, "answer": "70", "prompt": env.reset(prob), "attempts": atts}


def test_converter_rewards_001():
    """docs/methods.md §3.5: rewards (0, 0, 1) -> three examples whose final weights are (1, 1, e^2.5), every
    earlier attempt masked; as one sequence: weights (1, 1, e^2.5) on the three attempts."""
    conv = rise.to_conversation(trajectory([0.0, 0.0, 1.0]))
    asst = [m for m in conv["messages"] if m["role"] == "assistant"]
    assert [m["weight"] for m in asst] == pytest.approx([1.0, 1.0, math.exp(2.5)])
    assert [m["content"] for m in asst] == ["The answer is 60.", "The answer is 61.", "The answer is 62."]
    assert [m["reasoning"] for m in asst] == ["step 0", "step 1", "step 2"]
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert conv["messages"][2]["content"] == rise.RETRY_PROMPT.format(query="10+20*3=?")
    examples = rise.per_turn_examples(conv)
    assert [len(e) for e in examples] == [2, 4, 6]
    for ex, w in zip(examples, [1.0, 1.0, math.exp(2.5)]):
        ws = [m["weight"] for m in ex if m["role"] == "assistant"]
        assert ws[-1] == pytest.approx(w) and all(x == 0.0 for x in ws[:-1])


def test_demo_answer_is_never_trained():
    conv = rise.to_conversation(trajectory([0.0, 1.0], demo=True))
    asst = [m for m in conv["messages"] if m["role"] == "assistant"]
    assert asst[0]["content"] == rise.DEMO_ANSWER and asst[0]["weight"] == 0.0
    assert [m["weight"] for m in asst[1:]] == pytest.approx([1.0, math.exp(2.5)])
    assert len(rise.per_turn_examples(conv)) == 2


@pytest.mark.parametrize("criteria,rewards,kept", [
    ("all", [-1, 0, -1, 1], [0, 1, 2, 3]),
    ("better", [-1, 0, -1, 1], [0, 1, 3]),
    ("better", [0, 0, 1], [0, 2]),
    ("best", [0, -1, 0, 1], [0, 2, 3]),
    ("best", [-1, 0, -1, -1], [0, 1]),
    ("success", [0, -1, 1], [2]),
    ("success", [-1, 0], []),
])
def test_criteria(criteria, rewards, kept):
    assert [i for i, k in enumerate(rise.keep_mask(rewards, criteria)) if k] == kept
    conv = rise.to_conversation(trajectory(rewards), criteria=criteria)
    if not kept:
        assert conv is None
        return
    weights = [m["weight"] for m in conv["messages"] if m["role"] == "assistant"]
    expect = [math.exp(rewards[i] / 0.4) if i in kept else 0.0 for i in range(max(kept) + 1)]
    assert weights == pytest.approx(expect)   # unkept attempts stay as context; the tail after the last is cut


def test_duplicates_and_only_success():
    t = trajectory([0, 0, 0, 1], texts=[reply("a", 1), reply("a", 1) + "  ", " ", reply("b", 70)])
    conv = rise.to_conversation(t, remove_duplicates=True)
    asst = [m for m in conv["messages"] if m["role"] == "assistant"]
    assert [m["content"] for m in asst] == ["The answer is 1.", "The answer is 70."]
    assert [m["weight"] for m in asst] == pytest.approx([1.0, math.exp(2.5)])
    assert len(rise.to_conversation(t)["messages"]) == 8
    convs, stats = rise.convert([t, trajectory([0, 0])], only_success=True, remove_duplicates=True)
    assert len(convs) == 1 and stats["skipped_not_successful"] == 1 and stats["duplicate_attempts_removed"] == 2


def test_bad_trajectory_names_file_and_line(tmp_path):
    from ponder.data import DataError
    p = tmp_path / "t.jsonl"
    good = trajectory([0, 1])
    bad = dict(good, attempts=[{"text": "x", "reward": "high", "feedback": "f"}])
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:2: attempts\[0\].reward must be a finite number, got 'high'"):
        rise.load_trajectories(p)
    # JSON's NaN / -Infinity parse as floats: the weight exp(r/τ) would be NaN or 0 without a word
    for text, shown in (("NaN", "nan"), ("-Infinity", "-inf")):
        p.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, attempts=[
            {"text": "x", "reward": 0.5, "feedback": "f"}, {"text": "y", "reward": float(text), "feedback": "f"}]))
            + "\n")
        with pytest.raises(DataError, match=rf"t.jsonl:2: attempts\[1\].reward must be a finite number, got {shown}$"):
            rise.load_trajectories(p)


# ----------------------------------------------------------------------------------------------------------
# training: one sequence per trajectory == the official per-turn examples (fp64)
# ----------------------------------------------------------------------------------------------------------


def random_trajectories(seed, n=5):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 9)
        q = f"{a}+{b}*{c}=?"
        turns = rng.randint(1, 4)
        rewards = [rng.choice([-1.0, 0.0]) for _ in range(turns - 1)] + [rng.choice([-1.0, 0.0, 1.0])]
        texts = [reply(f"{b}*{c}={b * c + rng.randint(-3, 3)}. {a}+{b * c}={a + b * c}.", rng.randint(100, 999))
                 for _ in range(turns)]
        if rng.random() < 0.3:
            texts[-1] = f"The answer is {rng.randint(1, 9)}."   # an attempt without reasoning
        out.append(trajectory(rewards, texts, demo=i % 3 == 0, question=q))
    return out


def official_loss(model, tok, trajectories, tau=0.4, criteria="all", history="keep"):
    """The official RISE loss (FastChat CustomTrainer): one example per kept turn — the conversation truncated
    after that attempt (earlier attempts shown in full with `history` keep, without their reasoning with
    strip), only the last attempt labelled — HF's mean token CE over its labels, times exp(r/τ), averaged over
    the examples. Written from `chat.render` and full logits."""
    losses = []
    for t in trajectories:
        conv = rise.to_conversation(t, tau, criteria)
        if conv is None:
            continue
        msgs = conv["messages"]
        for k, m in enumerate(msgs):
            if m["role"] != "assistant" or not m["weight"]:
                continue
            segs = chat.render(tok, msgs[:k + 1], reasoning="all" if history == "keep" else "last")
            ids = torch.tensor([segs.ids])
            labels = torch.tensor([[x if on else -100 for x, on in zip(segs.ids, segs.trained_mask([k]))]])
            logits = model(input_ids=ids).logits
            ce = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
            losses.append(ce * m["weight"])
    return torch.stack(losses).mean()


@pytest.fixture(scope="module")
def tiny64():
    return models.load("tiny-random", dtype="float64", attn_implementation="sdpa")


def _rmsnorm_fp64(self, h):
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.mark.parametrize("criteria, history", [("all", "keep"), ("better", "keep"), ("all", "strip"),
                                               ("better", "strip")])
def test_one_sequence_loss_and_gradient_equal_official(tiny64, tmp_path, criteria, history, monkeypatch):
    # HF's LlamaRMSNorm computes in fp32 even in an fp64 model; its backward then rounds each example's
    # gradient at fp32 precision (differences ~1e-9). In true fp64 the two formulations agree to ~1e-16.
    from transformers.models.llama import modeling_llama
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rmsnorm_fp64)
    model, tok = tiny64
    trajs = random_trajectories(1, n=6)
    args = RISEConfig(output_dir=str(tmp_path), report_to=[], disable_tqdm=True, criteria=criteria,
                      history_reasoning=history)
    tr = RISETrainer(model=model, args=args, train_dataset=trajs, processing_class=tok)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(len(tr.train_dataset))])
    assert ("pairs" in batch) == (history == "strip")     # keep: an ordinary causal sequence; strip: one-pass
    params = list(model.parameters())

    model.zero_grad()
    loss = tr.compute_loss(model, batch, num_items_in_batch=batch["units"].sum())
    loss.backward()
    g1 = [p.grad.clone() for p in params]
    model.zero_grad()
    ref = official_loss(model, tok, trajs, criteria=criteria, history=history)
    ref.backward()
    g2 = [p.grad.clone() for p in params]
    model.zero_grad()
    assert int(batch["units"].sum()) == sum(len(rise.per_turn_examples(rise.to_conversation(t, criteria=criteria)))
                                            for t in trajs if rise.to_conversation(t, criteria=criteria))
    assert abs(loss.item() - ref.item()) <= 1e-12
    assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) <= 1e-12


def _train(mode, tmp_path, trajs, **kw):
    model, tok = models.load("tiny-random", dtype="float64")
    args = RISEConfig(output_dir=str(tmp_path / mode), mode=mode, max_steps=3, per_device_train_batch_size=2,
                      gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                      report_to=[], seed=3, train_sampling_strategy="sequential", optim="sgd", **kw)
    tr = RISETrainer(model=model, args=args, train_dataset=trajs, processing_class=tok)
    tr.train()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), tr.data_stats["train"]


@pytest.mark.parametrize("history", ["keep", "strip"])
def test_training_run_equals_per_turn_examples(tmp_path, history):
    """Whole runs with gradient accumulation: one sequence per trajectory ends with the same weights as the
    official per-turn examples, forwarding fewer tokens."""
    trajs = random_trajectories(5, n=12)
    one, s1 = _train("onepass", tmp_path / history, trajs, history_reasoning=history)
    ref, s2 = _train("npass", tmp_path / history, trajs, history_reasoning=history)
    assert (one - ref).abs().max().item() < 1e-9
    assert s1["tokens_forwarded"] < s2["tokens_forwarded"] and s1["turns"] == s2["turns"]


# ----------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------


def test_sequential_metrics_hand_made():
    answers = [["5", "5", "5"],          # always right
               ["1", "7", "7"],          # wrong first, fixed, majority 7 (right)
               ["1", "7", "1"],          # right once; majority 1 (wrong)
               ["2", "3", "7"],          # three-way tie: the earliest (turn 1, "2") wins -> wrong
               [None, None, "9"],        # only turn 3 answers: the vote is "9" -> right
               [None, None, None]]       # no answer at all: wrong
    correct = [[True, True, True], [False, True, True], [False, True, False], [False, False, True],
               [False, False, True], [False, False, False]]
    m = sequential_metrics(answers, correct)
    assert m["turns"] == 3
    assert m["m1@t1"] == pytest.approx(1 / 6)
    assert m["m1@t3"] == pytest.approx(3 / 6) == m["m1@tT"]
    assert m["p1@t3"] == pytest.approx(5 / 6) == m["p1@tT"]
    assert m["accuracy_by_turn"] == pytest.approx([1 / 6, 3 / 6, 4 / 6])
    assert m["majority_by_turn"] == pytest.approx([1 / 6, 1 / 6, 3 / 6])   # k=2: ["1","7"] tie -> "1"
    assert m["pass_by_turn"] == pytest.approx([1 / 6, 3 / 6, 5 / 6])
    assert all(m["p1@t3"] >= a for a in m["accuracy_by_turn"])


def test_sequential_metrics_votes_over_answers_not_rewards():
    # the vote counts answers: two identical wrong answers beat one correct answer
    m = sequential_metrics([["4", "4", "8"]], [[False, False, True]])
    assert m["m1@t3"] == 0.0 and m["p1@t3"] == 1.0
    m = sequential_metrics([["8", "4", "4", "8"]], [[True, False, False, True]])
    assert m["m1@t4"] == 1.0   # tie 2-2: the answer given first ("8") wins


def test_sequential_metrics_bad_shapes():
    with pytest.raises(ValueError, match="problem 1: expected 2 turns"):
        sequential_metrics([["1", "2"], ["1"]], [[True, False], [True]])
    with pytest.raises(ValueError, match="answers has 1 problems but correct has 2"):
        sequential_metrics([["1"]], [[True], [False]])


# ----------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------


def test_evaluate_feedback_window_and_metrics(monkeypatch, tb_tok):
    from ponder import rollout
    seq = {"10+20*3=?": [[reply("r", 60)], [reply("r", 70)], [reply("r", 70)]],
           "11+10*2=?": [[reply("r", 31)], [reply("r", 30)], [reply("r", 32)]]}
    script = Script({q: v + [[reply("p", 70), reply("p", 60), reply("p", 1)] if q[0:2] == "10" else
                              [reply("p", 5), reply("p", 6), reply("p", 7)]] for q, v in seq.items()}, tb_tok)
    monkeypatch.setattr(rollout, "sample", script)
    r = rise.evaluate("m", tb_tok, PROBS, turns=3, parallel=3, context_window=2, progress=False, backend="lean")
    assert [c["backend"] for c in script.calls] == ["lean"] * 4   # every turn and the parallel samples
    assert r["m1@t1"] == 0.5 and r["accuracy_by_turn"] == [0.5, 0.5, 0.5]
    # a: 60, 70, 70 -> majority 70 (right); b: 31, 30, 32 -> three-way tie, the earliest (31, right) wins
    assert r["m1@t3"] == 1.0 and r["p1@t3"] == 1.0
    assert r["m3@t1"] == 0.5 and r["p3@t1"] == 0.5
    third = script.calls[2]["prompts"]                  # turn 3 sees the question and only the last attempt
    assert all(p.count("<|im_start|>user") == 2 and p.count("<|im_start|>assistant") == 2 for p in third)
    assert "The answer is 30." in third[1] and "The answer is 31." not in third[1]
    assert all("<|im_start|>user\nThe answer is incorrect." in p for p in third)   # even after a correct turn
    assert r["records"][1]["answers"] == ["31", "30", "32"] and r["records"][1]["correct"] == [True, False, False]
    # transitions: a 60->70 (wrong->right), 70->70 (right->right); b 31->30 (right->wrong), 30->32 (wrong->wrong)
    assert r["changed_answer_rate"] == 0.75 and r["right_after_wrong"] == 0.5 and r["right_after_right"] == 0.5
    assert r["repeats_shown_wrong"] == 0.0
    assert r["fresh_gives_shown_wrong"] == pytest.approx(1 / 6)   # shown 60 and 30; one of 6 fresh samples is 60


def test_episode_eval_samples_on_the_runs_rollout_backend(monkeypatch, tb_tok, tmp_path):
    """A run with ``rollout_backend: vllm`` evaluates on its engine too, not on the CPU loop."""
    from ponder import rollout
    from ponder.recipes.common import episode_eval
    from ponder.recipes.rise import RISERunConfig
    seq = {q: [[reply("r", 70)], [reply("r", 70)], [reply("p", 70), reply("p", 70)]] for q in ("10+20*3=?", "11+10*2=?")}
    script = Script(seq, tb_tok)
    monkeypatch.setattr(rollout, "sample", script)
    cfg = RISERunConfig(output_dir=str(tmp_path), rollout_backend="generate", eval_turns=2, eval_parallel=2,
                        report_to="none")
    episode_eval("m", tb_tok, PROBS, cfg, "base", tmp_path, resume=False, progress=False)
    assert [c["backend"] for c in script.calls] == ["generate"] * 3
    assert [c["dtype"] for c in script.calls] == ["auto"] * 3  # evaluation samples the model as it is


def test_rise_command_end_to_end(tmp_path):
    """`ponder rise --config configs/rise/testbed.yaml` with a tiny random model and tiny sizes: collect, train,
    evaluate, report with plot."""
    from typer.testing import CliRunner

    from ponder.cli import app
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["rise", "--config", "configs/rise/testbed.yaml", "model=tiny-random",
                                 f"output_dir={out}", "n_train=3", "collect_turns=2", "samples=[1,2]",
                                 "max_steps=2", "per_device_train_batch_size=2", "n_eval=3", "eval_turns=2",
                                 "eval_parallel=2", "max_new_tokens=6", "iterations=1", "report_to=none"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["evals"]) == {"base", "iter-1"} and m["iterations"][0]["steps"] == 2
    assert {"m1@t1", "m2@t1", "m1@t2", "p1@t2"} <= set(m["evals"]["iter-1"])
    assert len((out / "iter-1" / "trajectories.jsonl").read_text().splitlines()) == 3
    assert (out / "iter-1" / "final" / "config.json").exists() and (out / "accuracy_by_turn.png").exists()
    report = (out / "report.md").read_text()
    assert "| base |" in report and "| iter-1 |" in report and "accuracy_by_turn.png" in report


@pytest.mark.slow
def test_smollm2_smoke(smol_dir, tmp_path):
    """SmolLM2-135M-Instruct (real chat template, instruction + demo prefix, GSM8K reward): 2-turn collection,
    one training step, evaluation."""
    from ponder.recipes.rise import run_rise
    out = tmp_path / "smol"
    res = run_rise("configs/rise/smollm2.yaml", [f"output_dir={out}", "n_train=2", "n_eval=2",
                                                  "max_steps=1", "max_new_tokens=24", "eval_turns=2",
                                                  "eval_parallel=2", "samples=[1,2]"])
    assert set(res["evals"]) == {"base", "iter-1"} and (out / "report.md").exists()


def test_demo_hook_quick(tmp_path):
    """`ponder.rise.demo(..., quick=True)` on the testbed: the demo table's structure, base and RISE rows with
    the sequential/parallel metrics computed in this run, the plot file, an honest direction note."""
    from ponder import data, testbed
    problems = data.load_problems("testbed", n=20, split="test")
    out = rise_recipe.demo(tmp_path, str(testbed.weights_dir()), problems, quick=True)
    assert set(out) == {"title", "columns", "rows", "plots", "notes", "metrics", "vs_start"}
    assert out["columns"][:5] == ["model", "m1@t1", "m2@t1", "m1@t2", "p1@t2"]
    vs = out["vs_start"]  # per problem m1@t1 of the base and of RISE: their means are the table's
    assert [round(100 * sum(v) / len(v), 1) for v in (vs["start"], vs["end"])] == [r[1] for r in out["rows"]]
    assert [r[0] for r in out["rows"]] == ["base", "RISE"]
    assert all(len(r) == len(out["columns"]) for r in out["rows"])
    for name, row in zip(("base", "RISE"), out["rows"]):
        m = out["metrics"][name]
        assert row[1:5] == [round(100 * m[k], 1) for k in ("m1@t1", "m2@t1", "m1@t2", "p1@t2")]
        assert all(0 <= x <= 100 for x in row[1:])
        assert m["p1@t2"] >= max(m["accuracy_by_turn"])   # some turn correct >= any one turn
    assert out["plots"] and all((tmp_path / p).stat().st_size > 0 for p in out["plots"])
    assert "95% over the" in out["notes"][0] and "docs/results/rise.md" in out["notes"][0]
    r = out["metrics"]["RISE"]
    assert f"{100 * (r['m1@t2'] - r['m1@t1']):+.1f} points" in out["notes"][0]   # the note is this run's numbers
    assert sum(w in out["notes"][0] for w in ("— appeared", "within noise", "opposite appeared")) == 1


def test_history_reasoning_keep_shows_earlier_attempts_in_full_and_strip_hides_them(tb_tok):
    """docs/methods.md §3.2: the paper's MDP shows an earlier attempt in full (keep); strip renders it as a chat
    template does at inference. Both through the one renderer."""
    msgs = [{"role": "user", "content": "10+20*3=?"}, {"role": "assistant", "reasoning": "20*3=61. 10+61=71.",
                                                       "content": "The answer is 71."},
            {"role": "user", "content": rise.RETRY_PROMPT.format(query="10+20*3=?")}]
    keep = tb_tok.decode(rise.Env(history_reasoning="keep").prompt(tb_tok, msgs))
    strip = tb_tok.decode(rise.Env(history_reasoning="strip").prompt(tb_tok, msgs))
    assert "<think>\n20*3=61. 10+61=71.\n</think>\n\nThe answer is 71." in keep
    assert "20*3=61" not in strip and "<|im_start|>assistant\nThe answer is 71.<|im_end|>" in strip
    assert keep.endswith("<|im_start|>assistant\n") and strip.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="history_reasoning must be one of"):
        rise.Env(history_reasoning="hide")


def test_headline_lists_each_metric_once():
    from ponder.rise import headline
    r = {"m1@t1": 0.1, "m1@t2": 0.2, "p1@t2": 0.3, "p1@t1": 0.4}
    assert headline(r, turns=2, parallel=1) == [("m1@t1", 0.1), ("m1@t2", 0.2), ("p1@t2", 0.3), ("p1@t1", 0.4)]
