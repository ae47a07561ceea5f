"""Rendering contract: segments, history reasoning stripped, prefix property, equality with the chat template."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ponder import chat
from ponder.chat import RenderError, normalize_messages, render, render_turns
from ponder.testbed import CHARSET

WORDS = ["12", "7", "the", "answer", "is", "apple", "x", "+", "=", "1,234", "-5", "résumé", "{a}", "ok."]


def random_conversation(rng: random.Random, turns: int, system: bool = False, p_reasoning: float = 0.7,
                        words=WORDS):
    def text():
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
    msgs = [{"role": "system", "content": "Be brief."}] if system else []
    for _ in range(turns):
        msgs.append({"role": "user", "content": text()})
        m = {"role": "assistant", "content": text()}
        if rng.random() < p_reasoning:
            m["reasoning"] = text() + "\n" + text()
        msgs.append(m)
    return msgs


def representable(tok):
    """The words this tokenizer round-trips (the testbed's character vocabulary is ASCII)."""
    return [w for w in WORDS if tok.decode(tok(w, add_special_tokens=False)["input_ids"]) == w]


def template_messages(msgs, keep_last=True):
    """What we hand apply_chat_template: history stripped, the last assistant's reasoning written in."""
    norm = normalize_messages(msgs)
    out = []
    for i, m in enumerate(norm):
        last = i == len(norm) - 1
        body = chat.assistant_body(m, keep_last and last) if m["role"] == "assistant" else m["content"]
        out.append({"role": m["role"], "content": body})
    return out


def reference_ids(tok, msgs, add_generation_prompt=False, keep_last=True):
    return tok.apply_chat_template(template_messages(msgs, keep_last), tokenize=True, return_dict=False,
                                   add_generation_prompt=add_generation_prompt)


@pytest.fixture(params=["testbed", "smollm2"])
def tok(request, tb_tok):
    return tb_tok if request.param == "testbed" else request.getfixturevalue("smol_tok")


def test_golden_testbed_rendering(tb_tok):
    msgs = [{"role": "user", "content": "59+63*2=?"},
            {"role": "assistant", "reasoning": "63*2=126. 59+126=185.", "content": "The answer is 185."}]
    segs = render(tb_tok, msgs)
    assert segs.text(tb_tok) == ("<|im_start|>user\n59+63*2=?<|im_end|>\n<|im_start|>assistant\n<think>\n"
                                 "63*2=126. 59+126=185.\n</think>\n\nThe answer is 185.<|im_end|>\n")
    kinds = [(s.kind, tb_tok.decode(s.ids)) for s in segs]
    assert kinds == [("prompt", "<|im_start|>user\n59+63*2=?<|im_end|>\n"), ("prompt", "<|im_start|>assistant\n"),
                     ("reasoning", "<think>\n63*2=126. 59+126=185.\n</think>\n\n"),
                     ("answer", "The answer is 185."), ("eot", "<|im_end|>"), ("prompt", "\n")]


def test_golden_smollm2_rendering(smol_tok):
    msgs = [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "19"}]
    segs = render(smol_tok, msgs)
    assert segs.text(smol_tok) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n19<|im_end|>\n")
    trained = [t for t, m in zip(segs.ids, segs.trained_mask()) if m]
    assert smol_tok.decode(trained) == "19<|im_end|>"


@pytest.mark.parametrize("seed", range(12))
def test_equals_chat_template_and_prefix_property(tok, seed):
    rng = random.Random(seed)
    msgs = random_conversation(rng, turns=rng.randint(1, 4), system=seed % 3 == 0, words=representable(tok))
    full = render(tok, msgs)
    assert full.ids == reference_ids(tok, msgs)
    history = render(tok, msgs, reasoning="none")
    assert history.ids == reference_ids(tok, msgs, keep_last=False)
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        # the generation prompt for turn k is a prefix of the sample for turn k ...
        prompt = chat.generation_prompt(tok, msgs[:k])
        sample = render(tok, msgs[:k + 1])
        assert sample.ids[:len(prompt)] == prompt
        assert prompt == reference_ids(tok, msgs[:k], add_generation_prompt=True, keep_last=False)
        # ... and the stripped history of turns < k is a prefix of the whole stripped conversation
        assert history.ids[:len(render(tok, msgs[:k], reasoning="none").ids)] == \
            render(tok, msgs[:k], reasoning="none").ids
        # trained tokens: reasoning block + answer + eot of the last turn only
        trained = [t for t, on in zip(sample.ids, sample.trained_mask([k])) if on]
        assert tok.decode(trained) == chat.assistant_body(normalize_messages([m])[0], True) + \
            tok.decode([chat.end_of_turn_id(tok)])


@pytest.mark.parametrize("seed", range(8))
def test_reasoning_all_keeps_every_turn_and_is_prefix_closed(tok, seed):
    """reasoning="all" (RISE's history kept in full): every assistant turn carries its reasoning block, the ids
    equal apply_chat_template on those contents, and the generation prompt with history kept is a prefix of
    the full rendering (what makes a kept-history trajectory one causal sequence)."""
    rng = random.Random(seed)
    msgs = random_conversation(rng, turns=rng.randint(1, 4), system=seed % 3 == 0, words=representable(tok))
    norm = normalize_messages(msgs)
    full = render(tok, msgs, reasoning="all")
    body = [{"role": m["role"], "content": chat.assistant_body(m, True) if m["role"] == "assistant" else m["content"]}
            for m in norm]
    assert full.ids == tok.apply_chat_template(body, tokenize=True, return_dict=False)
    for k, m in enumerate(norm):
        if m["role"] == "assistant":
            prompt = chat.generation_prompt(tok, msgs[:k], history_reasoning="keep")
            assert full.ids[:len(prompt)] == prompt
            trained = [t for t, on in zip(full.ids, full.trained_mask([k])) if on]
            assert tok.decode(trained) == chat.assistant_body(m, True) + tok.decode([chat.end_of_turn_id(tok)])


@pytest.mark.parametrize("seed", range(8))
def test_render_turns_matches_per_turn_rendering(tok, seed):
    rng = random.Random(100 + seed)
    msgs = random_conversation(rng, turns=rng.randint(1, 5), system=seed % 2 == 0, p_reasoning=0.6,
                               words=representable(tok))
    turns = render_turns(tok, msgs)
    assert turns.history.ids == render(tok, msgs, reasoning="none").ids
    for k, final in turns.final.items():
        assert turns.history_of(k).ids + final.ids == render(tok, msgs[:k + 1]).ids


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.text(alphabet="".join(CHARSET), min_size=1, max_size=30).map(str.strip).filter(bool),
       reasoning=st.text(alphabet="0123456789+-*=. abc\n", min_size=1, max_size=30))
def test_any_text_testbed(tb_tok, content, reasoning):
    msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": content, "reasoning": reasoning}]
    segs = render(tb_tok, msgs)
    assert segs.ids == reference_ids(tb_tok, msgs)
    assert tb_tok.decode([t for s in segs if s.kind == "answer" for t in s.ids]) == content


def test_input_formats_agree(tb_tok):
    ours = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"}]
    openai = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]
    sharegpt = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "reasoning": "r"}]
    inline = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\na"}]
    ids = render(tb_tok, ours).ids
    assert render(tb_tok, openai).ids == ids
    assert render(tb_tok, sharegpt).ids == ids
    assert render(tb_tok, inline).ids == ids


def test_tag_segment(tb_tok):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r", "tag": "<think>"}]
    kinds = [s.kind for s in render(tb_tok, msgs)]
    assert kinds == ["prompt", "prompt", "tag", "reasoning", "answer", "eot", "prompt"]


@pytest.mark.parametrize("msgs, match", [
    ([{"role": "bot", "content": "x"}], r"messages\[0\]\.role: unknown role 'bot'"),
    ([{"content": "x"}], r"messages\[0\]: missing field 'role'"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content: expected a string"),
    ([{"role": "user", "content": "x", "reasoning": "r"}], r"only assistant messages carry reasoning"),
    ([{"from": "robot", "value": "x"}], r"messages\[0\]\.from: unknown role 'robot'"),
    ([{"role": "assistant", "content": "x", "weight": "heavy"}], r"weight: expected a number"),
])
def test_bad_messages(tb_tok, msgs, match):
    with pytest.raises(RenderError, match=match):
        render(tb_tok, msgs)


def test_boundary_inside_token_is_an_error(smol_tok):
    # "assistant\n" + "\n x": BPE merges the two newlines across the prompt/answer boundary
    with pytest.raises(RenderError, match="spans the boundary between prompt and answer"):
        render(smol_tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n x"}])
