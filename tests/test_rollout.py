"""Sampling: greedy equals a plain no-cache argmax loop; stop strings, finish reasons, seeds."""

import pytest
import torch

from ponder import chat, rollout


def argmax_loop(model, ids, steps):
    """Independent reference: full forward of the growing sequence, no KV cache, no padding."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


def test_greedy_matches_reference_with_left_padding(tiny):
    model, tok = tiny
    prompts = ["1+1=?", "a much longer question that forces left padding", "x"]
    got = rollout.sample(model, tok, prompts, temperature=0.0, max_new_tokens=12, progress=False,
                         suppress_eos=True)
    for p, row in zip(prompts, got):
        ref = argmax_loop(model, chat.generation_prompt(tok, [{"role": "user", "content": p}]), 12)
        assert row[0].ids == ref
        assert row[0].finish_reason == "length"


def test_seeded_and_shaped(tiny):
    model, tok = tiny
    a = rollout.sample(model, tok, ["q1", "q2"], n=3, max_new_tokens=10, seed=7, progress=False)
    b = rollout.sample(model, tok, ["q1", "q2"], n=3, max_new_tokens=10, seed=7, progress=False)
    c = rollout.sample(model, tok, ["q1", "q2"], n=3, max_new_tokens=10, seed=8, progress=False)
    assert [[s.ids for s in r] for r in a] == [[s.ids for s in r] for r in b]
    assert [[s.ids for s in r] for r in a] != [[s.ids for s in r] for r in c]
    assert [len(r) for r in a] == [3, 3]
    assert all(s.prompt_index == i for i, r in enumerate(a) for s in r)


def test_stop_string_truncates_at_token_level(tiny):
    model, tok = tiny
    full = rollout.sample(model, tok, ["stop test"], temperature=0.0, max_new_tokens=30, progress=False,
                          suppress_eos=True)[0][0]
    stop = full.text[10:13]
    at = full.text.find(stop)
    s = rollout.sample(model, tok, ["stop test"], temperature=0.0, max_new_tokens=30, progress=False,
                       suppress_eos=True, stop=[stop, "NEVER"])[0][0]
    assert (s.finish_reason, s.stop, s.text) == ("stop", stop, full.text[:at])
    assert s.ids == full.ids[:s.stop_index]
    assert tok.decode(s.ids) == s.text


def test_cut_rules(tb_tok):
    enc = lambda t: tb_tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tb_tok.convert_tokens_to_ids("<|im_end|>")
    ids = enc("abc The answer is 5.") + [eos] + enc("junk")
    got, text, finish, idx, stop = rollout._cut(tb_tok, ids, {eos}, [])
    assert (text, finish, got[-1]) == ("abc The answer is 5.", "eos", eos)
    got, text, finish, idx, stop = rollout._cut(tb_tok, ids, {eos}, ["The answer is"])
    assert (text, finish, idx, stop) == ("abc ", "stop", 4, "The answer is")
    got, text, finish, idx, stop = rollout._cut(tb_tok, ids, {eos}, ["junk"])  # after eos: ignored
    assert finish == "eos"
    got, text, finish, idx, stop = rollout._cut(tb_tok, enc("no end"), {eos}, ["zz"])
    assert (text, finish, idx) == ("no end", "length", None)
    # the earliest of several stop strings wins
    got, text, finish, idx, stop = rollout._cut(tb_tok, enc("x Answer: y The answer is"), {eos},
                                                ["The answer is", "Answer:"])
    assert (text, stop) == ("x ", "Answer:")


def test_prompt_forms(tiny):
    model, tok = tiny
    msgs = [{"role": "user", "content": "hi"}]
    ids = chat.generation_prompt(tok, msgs)
    assert rollout.prompt_ids(tok, "hi") == ids
    assert rollout.prompt_ids(tok, msgs) == ids
    assert rollout.prompt_ids(tok, ids) == ids


@pytest.mark.parametrize("n_prompts, batch_size", [(5, 2), (3, 64)])
def test_batching_does_not_change_greedy(tiny, n_prompts, batch_size):
    model, tok = tiny
    prompts = [f"prompt number {i} " * (i + 1) for i in range(n_prompts)]
    a = rollout.sample(model, tok, prompts, temperature=0.0, max_new_tokens=8, batch_size=batch_size,
                       progress=False, suppress_eos=True)
    b = rollout.sample(model, tok, prompts, temperature=0.0, max_new_tokens=8, batch_size=1, progress=False,
                       suppress_eos=True)
    assert [r[0].ids for r in a] == [r[0].ids for r in b]
