"""The testbed's data generator: every strategy is correct, slips are wrong, episodes have the right shape."""

import random

import pytest

from ponder import testbed, verify
from ponder.testbed import Arith


@pytest.mark.parametrize("strategy", list(testbed.STRATEGIES))
def test_strategies_are_correct_and_recognisable(strategy):
    rng = random.Random(0)
    for _ in range(200):
        p = testbed.sample_problem(rng)
        reasoning, ans = testbed.solve(p, strategy)
        assert ans == p.a + p.b * p.c
        assert reasoning.endswith(f"={ans}.")
        assert testbed.strategy_of(reasoning) == strategy


def test_golden_strategies():
    p = Arith(59, 63, 2)
    assert testbed.solve(p, "direct")[0] == "63*2=126. 59+126=185."
    assert testbed.solve(p, "split")[0] == "60*2=120. 3*2=6. 120+6=126. 59+126=185."
    assert testbed.solve(p, "swap")[0] == "2*63=126. 126+59=185."
    assert testbed.solve(p, "ones_first")[0] == "3*2=6. 60*2=120. 6+120=126. 126+59=185."
    assert testbed.solve(p, "direct", slip=10) == ("63*2=136. 59+136=195.", 195)


def test_trace_set_has_every_strategy():
    ts = testbed.trace_set(Arith(12, 34, 5))
    assert [t["source"] for t in ts["traces"]] == list(testbed.STRATEGIES)
    assert all(t["content"] == "The answer is 182." for t in ts["traces"])


def test_multi_turn_answers_follow_the_conversation():
    rng = random.Random(1)
    for _ in range(50):
        msgs = testbed.multi_turn(testbed.sample_problem(rng), rng, turns=4)
        assert [m["role"] for m in msgs] == ["user", "assistant"] * 4
        for m in msgs[1::2]:
            last = m["reasoning"].rstrip(".").rsplit("=", 1)[1]
            assert m["content"] == f"The answer is {last}."


def test_retry_episode_shape():
    rng = random.Random(2)
    p = Arith(10, 20, 3)
    msgs = testbed.retry_episode(p, rng, wrong_attempts=2)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    prob = {"question": p.question, "answer": str(p.answer), "meta": {"task": "testbed"}}
    assert [verify.score(prob, m["content"]) for m in msgs[1::2]] == [0.0, 0.0, 1.0]
    assert msgs[2]["content"] == "The answer is incorrect. Please try again. Here's the question: 10+20*3=?"


def test_pretraining_excludes_heldout():
    held = {p.question for p in testbed.heldout(1000)}
    convs = testbed.pretraining_conversations(3000, seed=5)
    assert not {c["messages"][0]["content"] for c in convs} & held


def test_pretraining_mix_two_strategies_and_both_history_views():
    from collections import Counter
    convs = testbed.pretraining_conversations(4000, seed=1)
    firsts = Counter(testbed.strategy_of(c["messages"][1]["reasoning"]) for c in convs)
    assert set(firsts) == {"direct", "split"} and 0.65 < firsts["direct"] / sum(firsts.values()) < 0.85
    retry = [c for c in convs if c.get("meta")]
    assert 0.07 < len(retry) / len(convs) < 0.13
    assert {c["meta"]["history_reasoning"] for c in retry} == {"keep", "strip"}
    # failed attempts are context only: never trained (they carry the slip)
    assert all(m.get("weight", 1.0) == 0.0 for c in retry for m in c["messages"][1:-1:2])
    assert all("weight" not in c["messages"][-1] for c in retry)


def test_tokenizer_round_trip(tb_tok):
    text = "<|im_start|>user\n12+3*4=?<|im_end|>\n<think>\nx\n</think>\n\nThe answer is -5.<|im_end|>"
    ids = tb_tok(text, add_special_tokens=False)["input_ids"]
    assert tb_tok.decode(ids) == text
    assert tb_tok.convert_ids_to_tokens(ids[:2]) == ["<|im_start|>", "user"]
