"""The prefix-tree engine (ponder.tree): on random trees (depth, branching, empty and hidden segments, turns,
packing, padding) every scored token's log-prob and the parameter gradients equal separate passes over each
leaf's own sequence (fp64); the BlockMask forward equals the dense one; the hidden rule, positions and the
one-pass mask table by hand."""

import dataclasses
import json
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ponder import masks, models, tree
from ponder.logprobs import reduce, token_logprobs

VOCAB = 60  # token ids drawn below this (the tiny-random model's vocabulary is larger)


@pytest.fixture(scope="module")
def tiny64():
    return models.load("tiny-random", dtype="float64")[0]


def random_tree(rng: random.Random, max_depth: int = 4) -> tree.Tree:
    """A root prompt, then random children: lengths 0..6 (empty segments too), 1-3 children, hidden segments,
    turns that sometimes advance, scored segments with random weights and group labels."""
    t = tree.Tree()

    def ids(lo=0, hi=6):
        return [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]

    def grow(parent, depth):
        if depth >= max_depth:
            return
        for _ in range(rng.randint(1, 3) if depth < 2 else rng.randint(0, 2)):
            turn = t.segments[parent].turn + (rng.random() < 0.3)
            seg = ids()
            w = (None if rng.random() < 0.35 else rng.uniform(0.1, 2) if rng.random() < 0.5
                 else [rng.uniform(0.1, 2) for _ in seg])
            s = t.add(seg, parent, weight=w, group=rng.randrange(4), hidden=rng.random() < 0.35, turn=turn)
            grow(s, depth + 1)
    grow(t.add(ids(1, 6)), 0)
    if not any(s.weights and s.ids for s in t.segments):  # make sure something is scored
        t.add(ids(1, 4), len(t.segments) - 1 if t.segments[-1].ids else 0, weight=1.0)
    return t


trees = st.builds(lambda seed, n: [random_tree(random.Random(seed * 7 + i)) for i in range(n)],
                  st.integers(0, 10**6), st.integers(1, 3))


def reference(model, forest):
    """{(tree, segment, offset): log-prob} from one forward per separate sequence, and the weighted sum."""
    out, total = {}, 0.0
    for i, t in enumerate(forest):
        for sep in tree.separate(t):
            ids = torch.tensor([sep.ids])
            tg = torch.tensor(sep.targets)
            lp = token_logprobs(model, ids, pairs=torch.stack([torch.zeros_like(tg), tg - 1, tg]))
            total = total + (lp * torch.tensor(sep.weights, dtype=lp.dtype)).sum()
            for (s, j), v in zip(sep.tokens, lp):
                out[(i, s, j)] = v
    return out, total


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return g


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(forest=trees, attention=st.sampled_from(["dense", "sparse"]), row=st.sampled_from([None, 24, 200]))
def test_random_trees_equal_separate_passes(tiny64, forest, attention, row):
    model = tiny64
    flats = [tree.flatten(t) for t in forest]
    packed = tree.pack(flats, pad_id=0, row_length=row)
    lp = tree.logprobs(model, packed, attention)
    ref, ref_total = reference(model, forest)
    keys = [(i, s, j) for i, f in enumerate(flats) for s, j in f.pair_token]
    assert sorted(keys) == sorted(ref)  # every scored token once, in both
    expect = torch.stack([ref[k] for k in keys])
    assert (lp - expect).abs().max().item() <= 1e-9
    total = (lp * packed.pair_weight).sum()
    assert abs(total.item() - ref_total.item()) <= 1e-9
    # gradients of the normalised loss (as a trainer takes it). Not 1e-12: HF's LlamaRMSNorm computes in fp32
    # even in an fp64 model, so gradients summed over branches inside one pass round at fp32 (~1e-7 relative)
    units = packed.pair_weight.sum()
    for a, b in zip(grads(model, total / units), grads(model, ref_total / units)):
        assert (a - b).abs().max().item() <= 1e-6
    # per-sequence reductions: the group index splits the pairs by (tree, label)
    idx, groups = packed.groups()
    sums = reduce(lp.detach(), idx, len(groups))
    for g, (i, label) in enumerate(groups):
        want = sum(ref[(i, s, j)].item() for s, j in {k[1:] for k in ref if k[0] == i}
                   if forest[i].segments[s].group == label)
        assert abs(sums[g].item() - want) <= 1e-9


@settings(max_examples=30, deadline=None)
@given(forest=trees)
def test_positions_are_those_of_the_separate_sequences(forest):
    """Model-free: each scored token's id, position and predictor's id equal those in its separate sequence."""
    for t in forest:
        f = tree.flatten(t)
        seps = {tok: (sep, k) for sep in tree.separate(t) for tok, k in zip(sep.tokens, sep.targets)}
        for (p, q), tok in zip(f.pairs, f.pair_token):
            sep, k = seps[tok]
            assert f.ids[q] == sep.ids[k] and f.positions[q] == k
            assert f.ids[p] == sep.ids[k - 1] and f.positions[p] == k - 1


def test_hidden_reasoning_is_duplicated_for_later_turns():
    """h1 t1* a1 h2 t2* a2 (t hidden): turn 1's answer is computed after t1 for turn 1 and without it for
    turn 2 — two separate sequences, the answer forwarded twice, nothing else twice."""
    t = tree.Tree()
    h1 = t.add([10, 11])
    t1 = t.add([20, 21, 22], h1, weight=1.0, group=0, hidden=True)
    a1 = t.add([30, 31], t1, weight=1.0, group=0)
    h2 = t.add([40], a1, turn=1)
    t2 = t.add([50, 51], h2, weight=1.0, group=1, hidden=True)
    t.add([60], t2, weight=1.0, group=1)
    seps = tree.separate(t)
    assert [s.ids for s in seps] == [[10, 11, 20, 21, 22, 30, 31], [10, 11, 30, 31, 40, 50, 51, 60]]
    assert [s.targets for s in seps] == [[2, 3, 4, 5, 6], [5, 6, 7]]
    f = tree.flatten(t)
    assert sorted(f.ids) == sorted([10, 11, 20, 21, 22, 30, 31, 30, 31, 40, 50, 51, 60])
    assert len(f.pairs) == 8
    copies = [i for i, x in enumerate(f.ids) if x == 30]
    assert sorted(f.positions[i] for i in copies) == [2, 5]  # after h1 (no t1), after h1 t1


def test_bad_trees_are_clear_errors():
    t = tree.Tree()
    with pytest.raises(ValueError, match="not a segment"):
        t.add([1], parent=0)
    r = t.add([1, 2], weight=1.0)
    with pytest.raises(ValueError, match="nothing predicts its first token"):
        tree.flatten(t)
    t.add([3], r, turn=2)
    with pytest.raises(ValueError, match="turns never decrease"):
        t.add([4], 1, turn=1)
    with pytest.raises(ValueError, match="2 weights for 3 tokens"):
        t.add([4, 5, 6], 1, weight=[1.0, 2.0])


def test_onepass_layout_mask_equals_the_paper_table(tb_tok):
    """The ancestry rule of the engine gives exactly the paper's role table (`masks.allowed`) on one-pass
    layouts, several conversations packed per row."""
    rng = random.Random(0)
    words = ["a", "b", "12", "+", "x"]
    convs = []
    for _ in range(3):
        msgs = []
        for _ in range(rng.randint(1, 4)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 3)))})
            m = {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 3)))}
            if rng.random() < 0.6:
                m["reasoning"] = " ".join(rng.choices(words, k=rng.randint(1, 4)))
            msgs.append(m)
        convs.append(msgs)
    lays = [masks.onepass_layout(tb_tok, c) for c in convs]
    batch = masks.collate(lays, 0, row_length=10_000)
    assert batch.input_ids.shape[0] == 1
    roles = torch.tensor([r for lay in lays for r in lay.roles])
    turns = torch.tensor([t for lay in lays for t in lay.turns])
    sample = torch.tensor([i for i, lay in enumerate(lays) for _ in lay.ids])
    idx = torch.arange(len(roles))
    want = masks.allowed(roles[:, None], turns[:, None], sample[:, None], idx[:, None],
                         roles[None, :], turns[None, :], sample[None, :], idx[None, :])
    got = batch.dense_mask(torch.float64)[0, 0] == 0
    assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_blockmask_forward_matches_dense():
    """FlexAttention with the BlockMask = sdpa with the dense mask on random packed trees (fp32, real tokens;
    eager flex_attention: the model-level forward is tests/test_onepass.py's, and a second compiled flex
    kernel of another shape in one process trips a torch 2.13 inductor bug on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention
    forest = [random_tree(random.Random(s)) for s in range(6)]
    packed = tree.pack([tree.flatten(t) for t in forest], 0, row_length=64)
    B, T = packed.input_ids.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, 4, T, 16, generator=g) for _ in range(3))
    a = flex_attention(q, k, v, block_mask=packed.block_mask())
    b = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=packed.dense_mask())
    real = (packed.node >= 0)[:, None, :, None]
    assert B > 1 and not real.all()  # packing and padding both occur
    assert ((a - b).abs() * real).max().item() <= 1e-4


def test_auto_picks_a_path_and_flex_needs_its_backend(tiny64):
    packed = tree.pack([tree.flatten(random_tree(random.Random(1)))], 0)
    plan = tree.sparse_plan(packed, torch.float32, bias=False)
    assert tree.choose(tiny64, packed) == tree.choose_attention(**tree.attention_shape(tiny64, packed, plan))
    assert tree.attention_shape(tiny64, packed, plan)["sparse_pairs"] == plan.elements > 0  # the plan is counted
    trunk = tree.Tree()  # one shared prefix, many short scored branches: few pairs, sparse wins with 1 thread
    root = trunk.add(list(range(1, 400)))
    for b in range(8):
        trunk.add([b + 1] * 8, root, weight=1.0)
    p2 = tree.pack([tree.flatten(trunk)], 0)
    shape = tree.attention_shape(tiny64, p2, tree.sparse_plan(p2, torch.float32, bias=False))
    assert tree.choose_attention(**{**shape, "threads": 1}) == "sparse"
    with pytest.raises(ValueError, match="flex_attention"):
        tree.choose(tiny64, packed, "flex")
    with pytest.raises(ValueError, match="attention must be one of"):
        tree.choose(tiny64, packed, "fast")


def test_measured_attention_costs_are_cached_per_machine_and_threads(tmp_path, monkeypatch):
    """`attention_costs` measures once per key (CPU, torch, threads, heads x head dim): a second process reads the
    file, a corrupt file is re-measured with a warning; a busy machine or PONDER_ATTENTION_COSTS=default never
    measures."""
    from ponder.engine import runtime
    monkeypatch.setenv("PONDER_HOME", str(tmp_path))
    monkeypatch.setattr(runtime, "MEASURED", {})
    monkeypatch.setattr(runtime, "busy_cores", lambda: 0)  # a quiet machine
    calls = []

    def fake(heads, head_dim, threads):
        calls.append((heads, head_dim, threads))
        return tree.AttentionCosts(1000.0 * threads, 5e5)
    monkeypatch.setattr(tree, "measure_attention_costs", fake)
    monkeypatch.setenv("PONDER_ATTENTION_COSTS", "measured")
    assert tree.attention_costs(6, 32, 2) == tree.AttentionCosts(2000.0, 5e5) and len(calls) == 1
    assert tree.attention_costs(6, 32, 2) == tree.AttentionCosts(2000.0, 5e5) and len(calls) == 1  # memo
    monkeypatch.setattr(runtime, "MEASURED", {})  # a new process: the file
    assert tree.attention_costs(6, 32, 2) == tree.AttentionCosts(2000.0, 5e5) and len(calls) == 1
    assert tree.attention_costs(6, 32, 1) == tree.AttentionCosts(1000.0, 5e5) and len(calls) == 2  # threads
    assert tree.attention_costs(9, 64, 1).job_overhead == 1000.0 and len(calls) == 3  # the model's shape
    path = tmp_path / "attention-costs.json"
    keys = [json.loads(k) for k in json.loads(path.read_text())]
    assert len(keys) == 3 and {k["threads"] for k in keys} == {1, 2}
    assert all(k["cpu"] and k["torch"] == torch.__version__ for k in keys)
    table = json.loads(path.read_text())
    malformed = {k: {"job_overhead": -1.0, "sparse_tokens_width": 5e5} for k in table}
    for bad in ("{not json", "[1, 2]", json.dumps(malformed)):
        path.write_text(bad)
        monkeypatch.setattr(runtime, "MEASURED", {})
        n = len(calls)
        assert tree.attention_costs(6, 32, 2) == tree.AttentionCosts(2000.0, 5e5) and len(calls) == n + 1
        assert json.loads(path.read_text())  # rewritten
    monkeypatch.setattr(runtime, "MEASURED", {})
    monkeypatch.setattr(runtime, "busy_cores", lambda: 64)  # every core busy: the defaults, nothing measured
    assert tree.attention_costs(4, 16, 1) == tree.DEFAULT_COSTS and len(calls) == n + 1
    assert len(json.loads(path.read_text())) == 3  # and nothing saved
    monkeypatch.setenv("PONDER_ATTENTION_COSTS", "default")
    monkeypatch.setattr(runtime, "MEASURED", {})
    assert tree.attention_costs(6, 32, 2) is tree.DEFAULT_COSTS and len(calls) == n + 1
    monkeypatch.setenv("PONDER_ATTENTION_COSTS", "fast")
    with pytest.raises(ValueError, match="PONDER_ATTENTION_COSTS must be one of"):
        tree.attention_costs(6, 32, 2)


def test_choose_uses_the_machine_costs_unless_told_default(tiny64, tmp_path, monkeypatch):
    from ponder.engine import runtime
    monkeypatch.setenv("PONDER_HOME", str(tmp_path))
    monkeypatch.setattr(runtime, "MEASURED", {})
    monkeypatch.setattr(runtime, "busy_cores", lambda: 0)
    packed = tree.pack([tree.flatten(random_tree(random.Random(1)))], 0)
    stub = tree.AttentionCosts(job_overhead=123.0, sparse_tokens_width=456.0)
    monkeypatch.setattr(tree, "measure_attention_costs", lambda *a: stub)
    seen, real = [], tree.choose_attention
    monkeypatch.setattr(tree, "choose_attention", lambda **kw: seen.append(kw.get("costs")) or real(**kw))
    monkeypatch.setenv("PONDER_ATTENTION_COSTS", "measured")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # fewer threads than free cores, whatever an earlier test set: it measures
    try:
        tree.choose(tiny64, packed)
        monkeypatch.setenv("PONDER_ATTENTION_COSTS", "default")
        tree.choose(tiny64, packed)
    finally:
        torch.set_num_threads(saved)
    assert seen == [stub, tree.DEFAULT_COSTS]  # the machine's costs, then the built-in ones when told
    assert json.loads((tmp_path / "attention-costs.json").read_text())  # measured once, for the first call


def test_measure_attention_costs_gives_usable_costs():
    """The real micro-benchmark (small sizes here): positive finite constants, and `choose_attention` with them
    names a path for each measured one-pass shape (which path is the machine's business)."""
    from test_onepass import MEASURED
    costs = tree.measure_attention_costs(2, 16, threads=1, repeats=1, dense_tokens=(64, 128),
                                         sparse_calls=((16, 128, 16), (16, 128, 64)))
    assert all(math.isfinite(v) and v > 0 for v in dataclasses.astuple(costs))
    for model, _depth, threads, tokens, dense_pairs, sparse_pairs, _ratio in MEASURED:
        assert tree.choose_attention(rows=1, tokens=tokens, dense_pairs=dense_pairs, sparse_pairs=sparse_pairs,
                                     threads=threads, jobs=20, costs=costs, **model) in ("dense", "sparse")
