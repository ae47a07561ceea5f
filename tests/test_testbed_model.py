"""The shipped testbed leaves room for every method, its weights are checked, and a rebuild lands in its band."""

import json
import shutil

import pytest

from ponder import data, metrics, models, testbed


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
    model, tok = models.load("testbed")
    from ponder import rollout
    p = testbed.heldout(1)[0]
    retry = [{"role": "user", "content": p.question}, {"role": "assistant", "content": "The answer is 1."},
             {"role": "user", "content": testbed.RETRY_PROMPT.format(query=p.question)}]
    follow = [{"role": "user", "content": p.question}, {"role": "assistant", "content": "The answer is 100."},
              {"role": "user", "content": "Now add 23."}]
    out = rollout.sample(model, tok, [retry, follow], temperature=0.0, max_new_tokens=64, progress=False)
    assert out[0][0].finish_reason == "eos" and "The answer is" in out[0][0].text
    assert out[1][0].text.startswith("<think>\n") and "+23=" in out[1][0].text


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
