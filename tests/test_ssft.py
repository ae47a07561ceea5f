"""SSFT (docs/methods.md §1.9): Hungarian = brute force; packed matching costs = separate forwards (fp64); the
gradient comes only from the matched pairs; permutation invariance; N = M = 1 is plain SFT; Cons@k grouping
and tie rule; LoRA / tag-rows-only training; the forking evaluation."""

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ponder import chat, masks, models, ssft, testbed
from ponder.logprobs import token_logprobs
from ponder.recipes import ssft as ssft_recipe
from ponder.trainers.ssft import MatchStats, SSFTConfig, SSFTTrainer, collate

TAGS = ssft.forking_tags(6)


@pytest.fixture(scope="module")
def tiny64():
    """tiny-random in fp64 with <think1..6> initialised mean+noise (distinct rows: no cost ties)."""
    m, tok = models.load("tiny-random", dtype="float64", add_tokens=TAGS, token_init="mean+noise")
    return m, tok


def sets(n, seed=0):
    return testbed.trace_sets(n, seed=seed)


# ---- Hungarian ------------------------------------------------------------------------------------------


def brute_force(cost):
    n, m = cost.shape
    best = min(itertools.permutations(range(n), m), key=lambda s: sum(float(cost[s[j], j]) for j in range(m)))
    return list(best)


@pytest.mark.parametrize("n,m", [(1, 1), (2, 1), (3, 2), (4, 4), (5, 3), (6, 4)])
def test_match_equals_brute_force(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    for _ in range(20):
        cost = torch.rand(n, m, generator=g, dtype=torch.float64)
        sigma = ssft.match(cost)
        assert len(set(sigma)) == m and all(0 <= s < n for s in sigma)  # injective: no tag used twice
        assert sigma == brute_force(cost)


def test_match_with_integer_ties_reaches_the_optimum():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        cost = torch.randint(0, 3, (6, 4), generator=g).double()
        sigma = ssft.match(cost)
        assert len(set(sigma)) == 4
        assert ssft.assignment_cost(cost, sigma) == ssft.assignment_cost(cost, brute_force(cost))


def test_match_rejects_more_traces_than_tags():
    with pytest.raises(ValueError, match="N >= M"):
        ssft.match(torch.zeros(2, 3))


def test_random_match_is_injective_and_varies():
    rng = random.Random(0)
    maps = [tuple(ssft.random_match(6, 4, rng)) for _ in range(50)]
    assert all(len(set(s)) == 4 for s in maps) and len(set(maps)) > 10


# ---- matching costs ---------------------------------------------------------------------------------------


def reference_costs(model, tok, question, traces, tags, L):
    """N·M separate forwards, each on chat.render of (question, trace under tag i) truncated to L trace tokens."""
    out = torch.empty(len(tags), len(traces), dtype=torch.float64)
    for i, t in enumerate(tags):
        for j, tr in enumerate(traces):
            before, tag, after = ssft.split_at_tag(chat.render(tok, ssft.trace_messages(question, tr, t)))
            after = after[:L] if L else after
            ids = torch.tensor([before + tag + after])
            target = torch.zeros_like(ids, dtype=torch.bool)
            target[0, len(before) + len(tag):] = True
            with torch.no_grad():
                out[i, j] = -token_logprobs(model, ids, target_mask=target).mean()
    return out


@pytest.mark.parametrize("layout", ["shared", "packed"])
@pytest.mark.parametrize("L", [5, 30, 0])
def test_matching_costs_equal_separate_forwards(tiny64, layout, L):
    model, tok = tiny64
    ts = sets(2)[1]  # L=30 is longer than the shorter traces (direct / swap), shorter than the others
    cost = ssft.matching_costs(model, tok, ts["question"], ts["traces"], 6, L, layout=layout)
    ref = reference_costs(model, tok, ts["question"], ts["traces"], TAGS, L)
    assert cost.shape == (6, 4)
    assert (cost - ref).abs().max() <= 1e-9
    assert (ref[0] - ref[1]).abs().max() > 1e-6  # the tags really condition the costs


def test_costs_for_a_batch_of_questions_equal_one_by_one(tiny64):
    model, tok = tiny64
    items = []
    for ts in sets(3, seed=4):  # different prompt and trace lengths -> padding
        enc = ssft.encode(tok, ts["question"] + "  " * len(items), ts["traces"][:2 + len(items)])
        items.append((enc.prompt, ssft.tag_token_ids(tok, TAGS), enc.traces))
    for layout in ("shared", "packed"):
        for row_tokens in (1024, 90):  # 90: several rows per question (the prompt repeated per row when shared)
            together = ssft.costs_from_ids(model, items, 8, layout, tok.pad_token_id, row_tokens)
            for item, c in zip(items, together):
                alone = ssft.costs_from_ids(model, [item], 8, layout, tok.pad_token_id)[0]
                assert (c - alone).abs().max() <= 1e-9
    assert len(masks.shared_prefix_rows(items, 8, "shared", 90)) > len(items)


def test_tag_substitution_matches_rendering(tiny64):
    _, tok = tiny64
    ts = sets(1)[0]
    ssft.check_substitution(tok, ts["question"], ts["traces"][2], TAGS)
    enc = ssft.encode(tok, ts["question"], ts["traces"], "<think4>")
    assert tok.decode(enc.prompt).endswith("<|im_start|>assistant\n")
    assert tok.decode(enc.traces[0]).startswith("\n") and tok.decode(enc.traces[0]).endswith("<|im_end|>")


# ---- the SSFT loss ----------------------------------------------------------------------------------------


def make_trainer(model, tok, tmp_path, data, **kw):
    kw = {"num_tags": 6, "prefix_len": 12, "report_to": [], "disable_tqdm": True, "save_strategy": "no", **kw}
    args = SSFTConfig(output_dir=str(tmp_path), **kw)
    return SSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)


def loss_and_grads(tr, model, items):
    model.zero_grad()
    batch = collate(items)
    loss = tr.compute_loss(model, batch, num_items_in_batch=batch["units"].sum())
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_matched_loss(model, tok, data, L, tags=TAGS):
    """Σ over matched (tag, trace) pairs of the plain NTP loss, from separate forwards, divided by the number of
    trained tokens; the matching from the public `matching_costs` + `match`."""
    total, count = 0.0, 0
    for ts in data:
        sigma = ssft.match(ssft.matching_costs(model, tok, ts["question"], ts["traces"], len(tags), L, tags=tags))
        for j, tr in enumerate(ts["traces"]):
            before, tag, after = ssft.split_at_tag(chat.render(tok, ssft.trace_messages(ts["question"], tr,
                                                                                        tags[sigma[j]])))
            ids = torch.tensor([before + tag + after])
            labels = torch.tensor([[-100] * (len(before) + len(tag)) + after])
            logits = model(ids).logits
            total = total + F.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum")
            count += len(after)
    return total / count


def test_gradient_comes_only_from_matched_pairs(tiny64, tmp_path):
    model, tok = tiny64
    data = sets(3, seed=1)
    tr = make_trainer(model, tok, tmp_path, data)
    items = tr.train_dataset
    loss, grads = loss_and_grads(tr, model, items)
    model.zero_grad()
    ref = reference_matched_loss(model, tok, data, 12)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-10
    for n, p in model.named_parameters():
        assert (grads[n] - p.grad).abs().max() <= 1e-9, n
    # and the matching matters: a different assignment gives a different loss
    tr.args.assignment = "fixed"
    other, _ = loss_and_grads(tr, model, items)
    assert abs(other.item() - loss.item()) > 1e-6


def test_loss_is_permutation_invariant(tiny64, tmp_path):
    model, tok = tiny64
    data = sets(2, seed=2)
    tr = make_trainer(model, tok, tmp_path, data)
    loss, _ = loss_and_grads(tr, model, tr.train_dataset)
    # shuffle the traces of every question
    shuffled = [dict(ts, traces=[ts["traces"][j] for j in (2, 0, 3, 1)]) for ts in data]
    tr2 = make_trainer(model, tok, tmp_path, shuffled)
    loss2, _ = loss_and_grads(tr2, model, tr2.train_dataset)
    assert abs(loss.item() - loss2.item()) < 1e-12
    # relabel the tags consistently: permute the tag embedding rows (tied output rows move with them)
    ids = [t[0] for t in ssft.tag_token_ids(tok, TAGS)]
    perm = [ids[k] for k in (3, 5, 0, 1, 4, 2)]
    emb = model.get_input_embeddings().weight
    saved = emb.detach().clone()
    with torch.no_grad():
        emb[ids] = saved[perm]
    try:
        loss3, _ = loss_and_grads(tr, model, tr.train_dataset)
    finally:
        with torch.no_grad():
            emb.copy_(saved)
    assert abs(loss.item() - loss3.item()) < 1e-12


def test_one_tag_one_trace_full_length_is_plain_sft(tmp_path):
    """N = M = 1, L = whole trace: SSFT is SFT on (x, g1, r). With train_tag the loss equals ponder's
    SFTTrainer on the tagged conversation; without, the same minus the tag token's term."""
    from ponder.trainers.sft import SFTConfig, SFTTrainer, encode, pad_collate
    model, tok = models.load("tiny-random", dtype="float64", add_tokens=["<think1>"], token_init="mean")
    data = [dict(ts, traces=ts["traces"][1:2]) for ts in sets(3, seed=3)]
    convs = [ssft.trace_messages(ts["question"], ts["traces"][0], "<think1>") for ts in data]
    sft = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "sft"), report_to=[]),
                     train_dataset=convs, processing_class=tok)
    batch = pad_collate(tok.pad_token_id)([encode(tok, c) for c in convs])
    with torch.no_grad():
        sft_loss = sft.compute_loss(model, batch, num_items_in_batch=batch["units"].sum())
    for train_tag in (True, False):
        tr = make_trainer(model, tok, tmp_path / str(train_tag), data, num_tags=1, prefix_len=0, train_tag=train_tag)
        with torch.no_grad():
            b = collate(tr.train_dataset)
            loss = tr.compute_loss(model, b, num_items_in_batch=b["units"].sum())
        if train_tag:
            assert abs(loss.item() - sft_loss.item()) < 1e-12
        else:
            with torch.no_grad():
                ref = reference_matched_loss(model, tok, data, 0, tags=["<think1>"])
            assert abs(loss.item() - ref.item()) < 1e-12
            assert abs(loss.item() - sft_loss.item()) > 1e-6


def test_mixed_and_random_assignments(tiny64, tmp_path):
    model, tok = tiny64
    data = sets(4, seed=5)
    mixed = make_trainer(model, tok, tmp_path / "m", data, assignment="mixed")
    assert mixed.tags == ["<think>"]
    sig, _ = mixed.assign(model, mixed.train_dataset)
    assert sig == [[0, 0, 0, 0]] * 4
    rnd = make_trainer(model, tok, tmp_path / "r", data, assignment="random")
    seen = set()
    for step in range(5):
        rnd.state.global_step = step
        sig, _ = rnd.assign(model, rnd.train_dataset)
        assert all(len(set(s)) == 4 for s in sig)
        seen.update(tuple(s) for s in sig)
    assert len(seen) > 5


def test_match_stats():
    st = MatchStats(3)
    st.update("q1", ["a", "b"], [0, 1])
    st.update("q2", ["a", "b"], [0, 2])
    st.update("q1", ["a", "b"], [0, 1])
    s = st.summary(step=3)
    assert s["match/purity"] == pytest.approx(5 / 6)  # a: 3/3 on tag 0, b: 2/3 on tag 1
    assert s["match/distinct_modal_tags"] == 2
    assert s["match/revisit_same"] == 1.0
    st.update("q3", ["a", "b"], [2, 1])
    s = st.summary(step=4)
    assert s["match/agree_prev"] == 0.5  # a moved from tag 0 to tag 2, b stayed on tag 1
    assert st.totals() == {"a": [3, 0, 1], "b": [0, 3, 1]}


# ---- Cons@k -----------------------------------------------------------------------------------------------


def official_vote(answers):
    """The official evaluation code's rule: max(list, key=list.count) -> first seen among the most frequent."""
    return max(answers, key=answers.count)


def test_cons_at_k_grouping_and_ties():
    per_tag = [["a", "b"], ["b", "c"], ["c", "a"]]  # 3 tags x 2 samples
    flat = ssft.round_robin(per_tag)
    assert flat == ["a", "b", "c", "b", "c", "a"]
    gold = "a"
    correct = [x == gold for x in flat]
    # one vote over all 6: a, b, c tie at 2 -> the first seen (tag 1's) answer, "a"
    assert official_vote(flat) == "a"
    assert ssft.cons_at_k(flat, correct) == 1.0
    # native Cons@3: groups [a b c] -> a (tie, tag order), [b c a] -> b
    assert [official_vote(flat[0:3]), official_vote(flat[3:6])] == ["a", "b"]
    assert ssft.cons_at_k(flat, correct, group_size=3) == 0.5
    # official rule: "no answer" is a candidate and can win (then the vote scores 0); ours: it does not vote
    assert ssft.cons_at_k([None, None, "x"], [False, False, True]) == 0.0
    assert ssft.cons_at_k([None, None, "x"], [False, False, True], rule="ponder") == 1.0
    with pytest.raises(ValueError):
        ssft.cons_at_k(flat, correct, group_size=4)


CONS_GOLDEN = json.loads((Path(__file__).parent / "data" / "ssft_cons_golden.json").read_text())["cases"]


@pytest.mark.parametrize("case", CONS_GOLDEN, ids=lambda c: c["name"])
def test_cons_at_k_matches_the_official_metric_code(case):
    """Golden values from running the official SSFT evaluation metrics (docs/methods.md §1.11) on these inputs:
    native Cons@6 (groups = the s-th sample of every tag), the tag-balanced Cons@32 (round-robin, 6,6,5,5,5,5)
    and the plain maj@32 (tag blocks), with "no answer" as a candidate and first-seen ties."""
    a = case["answers_tag_blocks"]
    per_tag = [a[i * len(a) // 6:(i + 1) * len(a) // 6] for i in range(6)]
    correct = lambda xs: [x == case["gold"] for x in xs]   # noqa: E731
    if case["metric"].startswith("math_maj_6"):
        flat = ssft.round_robin(per_tag)
        got = ssft.cons_at_k(flat, correct(flat), group_size=6)
    elif case["metric"] == "maj_sot@32":
        flat = ssft.vote_order(per_tag, 32, "round_robin")
        assert len(flat) == 32 and flat == ssft.round_robin(per_tag, 32)
        got = ssft.cons_at_k(flat, correct(flat))
    else:  # the plain maj@K: the first K in tag-block order; K = all samples is ponder's default cons@k
        k = int(case["metric"].removeprefix("maj@"))
        flat = ssft.vote_order(per_tag, k, "tag_blocks")
        if k == len(a):
            assert ssft.vote_order(per_tag, k, "round_robin") == flat  # one vote over all: tag-major either way
        got = ssft.cons_at_k(flat, correct(flat))
    assert got == pytest.approx(case["official"])


def test_fair_split_is_the_official_one():
    assert ssft.fair_split(32, 6) == [6, 6, 5, 5, 5, 5] and ssft.fair_split(66, 6) == [11] * 6
    per_tag = [[(t, s) for s in range(6)] for t in range(6)]
    counts = [sum(1 for t2, _ in ssft.round_robin(per_tag, 32) if t2 == t) for t in range(6)]
    assert counts == ssft.fair_split(32, 6)


def test_cons_matches_official_rule_on_random_votes():
    rng = random.Random(0)
    for _ in range(200):
        ans = [rng.choice("abc") for _ in range(12)]
        correct = [a == "b" for a in ans]
        groups = [ans[i:i + 6] for i in (0, 6)]
        expect = sum(official_vote(g) == "b" for g in groups) / 2
        assert ssft.cons_at_k(ans, correct, group_size=6) == expect
        assert ssft.cons_at_k(ans, correct) == float(official_vote(ans) == "b")


# ---- the tag distribution ---------------------------------------------------------------------------------


def test_tag_logprobs_left_padding_is_exact(tiny64):
    model, tok = tiny64
    prompts = [chat.generation_prompt(tok, [{"role": "user", "content": q}]) for q in ("1+2*3=?", "45+67*8=?  ok")]
    ids = [t[0] for t in ssft.tag_token_ids(tok, TAGS)]
    with torch.no_grad():
        both = ssft.tag_logprobs(model, prompts, ids, tok.pad_token_id)
        for r, p in enumerate(prompts):
            full = torch.log_softmax(model(torch.tensor([p])).logits[0, -1], -1)
            ref = torch.log_softmax(full[ids], -1)  # the restricted, renormalised distribution
            assert (both[r] - ref).abs().max() <= 1e-10
    assert torch.allclose(both.exp().sum(-1), torch.ones(2, dtype=torch.float64))


# ---- PEFT: LoRA + trainable tag rows, tag rows only; merged save --------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "tags_only"])
def test_parameter_efficient_training_changes_only_what_it_should(tmp_path, mode):
    model, tok = models.load("tiny-random")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw = {"lora": {"r": 4}} if mode == "lora" else {"tags_only": True}
    tr = make_trainer(model, tok, tmp_path, sets(8, seed=6), max_steps=3, learning_rate=5e-2,
                      per_device_train_batch_size=4, **kw)
    tag_ids = [t[0] for t in tr.tag_ids]
    init_rows = tr.model.get_input_embeddings()(torch.tensor(tag_ids)).detach().clone()
    tr.train()
    tr.save_model(str(tmp_path / "final"))
    merged, tok2 = models.load(str(tmp_path / "final"))
    assert tok2.convert_tokens_to_ids(TAGS) == tag_ids
    emb = merged.get_input_embeddings().weight
    other = [i for i in range(len(tok)) if i not in tag_ids]
    old = base["model.embed_tokens.weight"]
    assert torch.equal(emb[[i for i in other if i < old.shape[0]]], old[[i for i in other if i < old.shape[0]]])
    assert (emb[tag_ids] - init_rows).abs().max() > 1e-4  # the tag rows were trained
    changed = {n for n, p in merged.named_parameters() if n in base and n != "model.embed_tokens.weight"
               and not torch.equal(p, base[n])}
    if mode == "tags_only":
        assert changed == set()
    else:
        assert changed and all(any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj")) for n in changed)
    # the merged model computes what the trained PEFT model computes
    ids = torch.tensor([tr.train_dataset[0]["prompt"] + tag_ids[:1] + tr.train_dataset[0]["traces"][0]])
    with torch.no_grad():
        assert (merged(ids).logits - tr.model(ids).logits).abs().max() < 1e-4


# ---- the forking evaluation -------------------------------------------------------------------------------


def test_evaluate_forking_records_are_consistent():
    from ponder.data import load_problems
    model, tok = models.load("tiny-random", add_tokens=TAGS, token_init="mean+noise")
    probs = load_problems("testbed", n=3, split="test")
    r = ssft.evaluate_forking(model, tok, probs, TAGS[:3], per_tag=2, max_new_tokens=8, batch_size=16)
    assert r["k"] == 6 and set(r["per_tag"]) == set(TAGS[:3])
    for rec in r["records"]:
        assert [[s["tag"] for s in f] for f in rec["forced"]] == [[t, t] for t in TAGS[:3]]
        assert len(rec["sampled"]) == 6 and all(s["tag"] in [*TAGS[:3], "other"] for s in rec["sampled"])
    for key in ("pass@1/<think1>", "pass@1/sampled", "pass@6", "cons@6", "cons@3/groups", "distinct_answers@6",
                "distinct_strategies@6"):
        assert 0 <= r[key] <= 6, key
    assert sum(r["sampled_tag_share"].values()) == pytest.approx(1.0)
    r5 = ssft.evaluate_forking(model, tok, probs, TAGS[:3], per_tag=2, max_new_tokens=8, batch_size=16, cons_k=5,
                               sampled=0)
    assert "cons@5" in r5 and r5["k"] == 6


# ---- the commands -----------------------------------------------------------------------------------------


def test_ssft_gfpo_and_forking_eval_commands(tmp_path):
    """`ponder ssft` -> `ponder gfpo` on its model -> `ponder eval --forking`, tiny sizes, files in place."""
    import json

    from typer.testing import CliRunner

    from ponder.cli import app
    run = CliRunner()
    small = ["model=tiny-random", "max_steps=2", "per_device_train_batch_size=2", "n_train=4",
             "n_eval=2", "eval_max_new_tokens=6", "report_to=none", "save_strategy='no'", "logging_steps=1"]
    r = run.invoke(app, ["ssft", "--config", "configs/ssft/testbed.yaml", f"output_dir={tmp_path / 's'}", *small])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["steps"] == 2 and "pass@12" in m["eval"] and "cons@6/groups" in m["eval"]
    for f in ("report.md", "forking.png", "matching.png", "matching.json", "eval_samples.jsonl"):
        assert (tmp_path / "s" / f).exists(), f
    match = json.loads((tmp_path / "s" / "matching.json").read_text())
    assert sum(sum(v) for v in match["totals"].values()) == 2 * 2 * 4  # steps x questions x traces
    r = run.invoke(app, ["gfpo", "--config", "configs/gfpo/testbed.yaml", f"model={tmp_path / 's' / 'final'}",
                         f"output_dir={tmp_path / 'g'}", "num_generations=2", "max_new_tokens=4",
                         *[s for s in small if not s.startswith("model=")]])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert len(m["tag_distribution"]["before"]) == 6 and 0 < sum(m["tag_distribution"]["after"]) <= 1 + 1e-6
    r = run.invoke(app, ["eval", "--model", str(tmp_path / "g" / "final"), "--forking", "6", "--n", "2",
                         "--per-tag", "1", "--max-new-tokens", "4", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    e = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert e["k"] == 6 and set(e["per_tag"]) == set(TAGS)
    r = run.invoke(app, ["ssft", "--config", "configs/ssft/testbed.yaml", "assignment=best"])
    assert r.exit_code == 2 and "assignment must be one of" in r.output


def test_demo_quick_structure(tmp_path):
    """`ponder demo` hook, quick mode: the returned table's shape, real numbers in range, plots on disk."""
    from ponder import data
    probs = data.load_problems("testbed", n=3, split="test")
    r = ssft_recipe.demo(tmp_path, str(testbed.weights_dir()), probs, quick=True)
    assert set(r) == {"title", "columns", "rows", "plots", "notes", "metrics", "vs_start"}
    assert [row[0] for row in r["rows"]] == ["testbed (start)", "SFT-mixed", "SSFT"]
    assert all(len(row) == len(r["columns"]) for row in r["rows"])
    assert all(0 <= v <= 1 for row in r["rows"] for v in row[1:4])
    assert all(0 <= row[4] <= 4 for row in r["rows"])  # distinct strategies among k: four at most
    assert r["rows"][0][-1] == r["rows"][1][-1] == 1 and 1 <= r["rows"][2][-1] <= 2  # modal strategies: one tag vs two
    vs = r["vs_start"]  # per problem: the start's and SSFT's accuracy over their k samples
    assert len(vs["start"]) == len(vs["end"]) == 3
    assert sum(vs["end"]) / 3 == pytest.approx(r["metrics"]["SSFT"]["pass@1/tags"], abs=1e-12)
    for p in r["plots"]:
        assert (tmp_path / p).stat().st_size > 1000
    assert "95% over the" in r["notes"][0] and "docs/results/ssft.md" in r["notes"][0]  # shown in the summary
    assert r["metrics"]["SSFT"]["n"] == 3 and len(r["metrics"]["SSFT"]["per_tag"]) == 2
