"""The shipped testbed leaves room for every method, its weights are checked, and a rebuild lands in its band."""

import json
import shutil

import pytest

from ponder import chat, data, metrics, models, testbed


def test_testbed_is_middling_and_diverse():
    path = testbed.weights_dir()
    info = json.loads((path / "testbed.json").read_text())
    model, tok = models.load("testbed")
    assert sum(p.numel() for p in model.parameters()) == info["params"] < 3_000_000
    probs = data.load_problems("testbed", n=200, split="test")
    r = metrics.evaluate(model, tok, probs, samples=8, temperature=1.0, max_new_tokens=64, batch_size=200)
    assert 0.20 <= r["greedy_accuracy"] <= 0.70, r
    assert r["pass@8"] >= 1.5 * r["greedy_accuracy"], r
    # greedy replies are well-formed: a reasoning block, then the answer sentence
    ok = [x["greedy"].startswith("<think>\n") and "</think>\n\nThe answer is" in x["greedy"] for x in r["records"]]
    assert sum(ok) >= 0.95 * len(ok)


def test_testbed_handles_retry_and_follow_up_formats():
    """The multi-turn formats the methods build on: after the RISE feedback the model answers again (in both
    history views), and after a follow-up ("Now add 23.") it answers with a reasoning block and the answer sentence
    (the arithmetic of follow-ups is weak: 4% of the pre-training data; one-pass needs the format, not skill)."""
    import random

    from ponder import rollout
    model, tok = models.load("testbed")
    rng = random.Random(0)
    retry, follow = [], []
    for p in testbed.heldout(20):
        reasoning, ans = testbed.solve(p, "direct", slip=10)
        retry.append([{"role": "user", "content": p.question}, {"role": "assistant", "reasoning": reasoning,
                      "content": testbed.answer_text(ans)},
                      {"role": "user", "content": testbed.RETRY_PROMPT.format(query=p.question)}])
        d = rng.randint(10, 99)
        follow.append(([{"role": "user", "content": p.question},
                        {"role": "assistant", "content": testbed.answer_text(p.answer)},
                        {"role": "user", "content": f"Now add {d}."}], d))
    kept = [rollout.prompt_ids(tok, chat.generation_prompt(tok, m, "keep")) for m in retry]
    out = rollout.sample(model, tok, retry + kept + [m for m, _ in follow], temperature=0.0, max_new_tokens=64,
                         progress=False)
    answered = [o[0].finish_reason == "eos" and "The answer is" in o[0].text for o in out[:40]]
    assert sum(answered) >= 36, sum(answered)
    formed = [o[0].text.startswith("<think>\n") and "</think>\n\nThe answer is" in o[0].text for o in out[40:]]
    assert sum(formed) >= 18, [o[0].text for o in out[40:]]


def test_shipped_weights_are_checked_by_hash(tmp_path, monkeypatch):
    copy = tmp_path / "testbed"
    shutil.copytree(testbed.WEIGHTS, copy)
    monkeypatch.setattr(testbed, "WEIGHTS", copy)
    assert testbed.weights_dir() == copy
    blob = bytearray((copy / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="SHA-256 .* does not match testbed.json"):
        testbed.weights_dir()


def test_ponder_testbed_points_at_another_build(tmp_path, monkeypatch):
    monkeypatch.setenv("PONDER_TESTBED", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="PONDER_TESTBED=.*config.json missing"):
        testbed.weights_dir()


@pytest.mark.slow
def test_a_rebuild_from_scratch_lands_in_the_accuracy_band(tmp_path):
    """`ponder testbed build` from scratch: a middling model again (the shipped one's band), whatever the CPU."""
    from ponder.recipes.testbed import build
    info = build(tmp_path / "tb", log=False)
    model, tok = models.load(str(tmp_path / "tb"))
    r = metrics.evaluate(model, tok, data.load_problems("testbed", n=200, split="test"), samples=0,
                         max_new_tokens=64, batch_size=200)
    assert 0.20 <= r["greedy_accuracy"] <= 0.70, (info["steps"], r["greedy_accuracy"])
