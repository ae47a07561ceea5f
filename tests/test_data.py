import json

import pytest

from ponder import data
from ponder.data import DataError


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = write(tmp_path, "bad.jsonl", ['{"question": "q", "answer": "1"}', "", '{"question": "q", "answer": '])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        data.load_problems(p)


def test_missing_field_names_it(tmp_path):
    p = write(tmp_path, "p.jsonl", ['{"question": "q", "answer": "1"}', '{"question": "q2"}'])
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing field 'answer'"):
        data.load_problems(p)


def test_not_an_object(tmp_path):
    p = write(tmp_path, "p.jsonl", ['[1, 2]'])
    with pytest.raises(DataError, match=r"p\.jsonl:1: expected a JSON object"):
        data.load_problems(p)


def test_conversation_errors(tmp_path):
    p = write(tmp_path, "c.jsonl", [json.dumps({"messages": [{"role": "user", "content": "hi"}]})])
    with pytest.raises(DataError, match=r"c\.jsonl:1: messages: the conversation has no assistant turn"):
        data.load_conversations(p)
    p = write(tmp_path, "c2.jsonl", [json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "robot", "content": "x"}]})])
    with pytest.raises(DataError, match=r"c2\.jsonl:1: messages\[1\]\.role: unknown role 'robot'"):
        data.load_conversations(p)
    p = write(tmp_path, "c3.jsonl", [json.dumps({"text": "x"})])
    with pytest.raises(DataError, match=r"c3\.jsonl:1: missing field 'messages'"):
        data.load_conversations(p)


def test_sharegpt_and_reasoning_content(tmp_path):
    recs = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "reasoning": "r"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                             "reasoning_content": "r"}]}]
    convs = data.load_conversations(write(tmp_path, "c.jsonl", [json.dumps(r) for r in recs]))
    assert convs[0].messages == convs[1].messages
    assert convs[0].messages[1] == {"role": "assistant", "content": "a", "reasoning": "r"}


def test_gsm8k_layout(tmp_path):
    p = write(tmp_path, "g.jsonl", [json.dumps({"question": "How many?", "answer": "3*4=12\n#### 1,012"})])
    prob = data.load_problems(p)[0]
    assert (prob.answer, prob.meta["solution"], prob.meta["verifier"]) == ("1012", "3*4=12", "gsm8k")


def test_hf_dataset_directory(tmp_path):
    import datasets
    ds = datasets.Dataset.from_list([{"question": "a?", "answer": "x\n#### 5"}, {"question": "b?", "answer": "#### 6"}])
    ds.save_to_disk(str(tmp_path / "gsm"))
    probs = data.load_problems(str(tmp_path / "gsm"))
    assert [p.answer for p in probs] == ["5", "6"]


def test_tracesets(tmp_path):
    rec = {"question": "q", "answer": "1", "traces": [{"reasoning": "r1", "content": "c1", "source": "A"},
                                                       {"reasoning": "r2", "content": "c2"}]}
    ts = data.load_tracesets(write(tmp_path, "t.jsonl", [json.dumps(rec)]))[0]
    assert [t["source"] for t in ts.traces] == ["A", "1"]
    bad = {"question": "q", "answer": "1", "traces": [{"content": "c"}]}
    with pytest.raises(DataError, match=r"t2\.jsonl:1: traces\[0\]: missing field 'reasoning'"):
        data.load_tracesets(write(tmp_path, "t2.jsonl", [json.dumps(bad)]))


def test_reasoning_gym_is_seeded_and_split():
    a = data.load_problems("rg:chain_sum", n=5, seed=3)
    b = data.load_problems("chain_sum", n=5, seed=3)
    t = data.load_problems("rg:chain_sum", n=5, seed=3, split="test")
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in a] != [p.question for p in t]
    assert a[0].meta["verifier"] == "rg:chain_sum"


def test_unknown_sources():
    with pytest.raises(DataError, match="unknown task 'rg:no_such_task'"):
        data.load_problems("rg:no_such_task")
    with pytest.raises(DataError, match="unknown data source 'mystery'"):
        data.load_problems("mystery")
    with pytest.raises(DataError, match="no such file"):
        data.load_problems("missing.jsonl")


def test_testbed_source_excludes_heldout():
    test = {p.question for p in data.load_problems("testbed", n=200, split="test")}
    train = {p.question for p in data.load_problems("testbed", n=2000, split="train")}
    assert len(test) == 200 and not test & train


def test_bad_reasoning_gym_option():
    with pytest.raises(DataError, match="rg:chain_sum: bad task option"):
        data.load_problems("rg:chain_sum", n=2, no_such_option=3)


def test_rg_task_options_in_the_dataset_name_reach_reasoning_gym_and_bad_ones_are_one_line():
    import reasoning_gym as rg
    spec = "rg:chain_sum:min_terms=2,max_terms=2,max_digits=1,allow_negation=false"
    assert data.rg_spec(spec) == ("chain_sum", {"min_terms": 2, "max_terms": 2, "max_digits": 1,
                                                "allow_negation": False})
    got = data.load_problems(spec, n=5, split="test")
    ref = rg.create_dataset("chain_sum", seed=10**6, size=5, min_terms=2, max_terms=2, max_digits=1,
                            allow_negation=False)
    assert [(p.question, p.answer) for p in got] == [(e["question"], str(e["answer"])) for e in ref]
    assert got[0].meta["rg"]["config"]["max_digits"] == 1  # a problem written to a file regenerates the same
    assert data.load_problems("rg:chain_sum", n=2)[0].meta["rg"]["config"] == {}
    for bad, words in [("rg:chain_sum:max_terms", "key=value"), ("rg:chain_sum:max_terms=[2]", "a number"),
                       ("rg:chain_sum:nope=1", "bad task option"), ("rg:nosuch:x=1", "no task 'nosuch'")]:
        with pytest.raises(data.DataError, match=words) as e:
            data.load_problems(bad, n=2)
        assert "\n" not in str(e.value) and bad in str(e.value)
