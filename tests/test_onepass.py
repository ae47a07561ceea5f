"""One-pass layout: equal to the N-pass reference per token (fp64), gradients equal, mask blocks and positions
as in the paper's tables, packing and padding, BlockMask forward equal to the dense path."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ponder import masks, models, tree
from ponder.logprobs import logprobs_of, token_logprobs
from ponder.masks import ANSWER_IN, ANSWER_OUT, HUMAN, THINK
from ponder.onepass import attention_for, npass_logprobs, onepass_logits, onepass_logprobs
from ponder.tree import choose_attention

WORDS = ["12", "+", "7", "=", "19.", "The answer is", "apple", "x", "Now add 5.", "?"]


@pytest.fixture(scope="module")
def eager64():
    """fp64 with the dense mask under sdpa (exact in fp64). HF's *eager* attention computes its softmax in
    fp32 even for fp64 models, which limits agreement to ~1e-7 (see test_eager_attention_agrees)."""
    return models.load("tiny-random", dtype="float64", attn_implementation="sdpa")


def conversation(rng: random.Random, turns: int, p_reasoning: float = 0.6, system: bool = False):
    def text(lo=1, hi=6):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    msgs = [{"role": "system", "content": "Be brief."}] if system else []
    for _ in range(turns):
        msgs.append({"role": "user", "content": text()})
        m = {"role": "assistant", "content": text()}
        if rng.random() < p_reasoning:
            m["reasoning"] = text(2, 10)
        msgs.append(m)
    return msgs


conversations = st.builds(lambda seed, turns, p, sys_: conversation(random.Random(seed), turns, p, sys_),
                          st.integers(0, 10**6), st.integers(1, 8), st.sampled_from([0.0, 0.5, 1.0]), st.booleans())


def max_diff(a, b):
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=conversations, attention=st.sampled_from(["sparse", "dense"]))
def test_onepass_equals_npass_per_token(eager64, msgs, attention):
    model, tok = eager64
    one, ref = onepass_logprobs(model, tok, msgs, attention), npass_logprobs(model, tok, msgs)
    assert [len(x) for x in one] == [len(x) for x in ref]
    assert max_diff(one, ref) <= 1e-9


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(convs=st.lists(conversations, min_size=2, max_size=4), row=st.sampled_from([None, 64, 256]))
def test_packing_and_padding(eager64, convs, row):
    """Several conversations per row (no attention across them), rows right-padded."""
    model, tok = eager64
    lays = [masks.onepass_layout(tok, c) for c in convs]
    batch = masks.collate(lays, tok.pad_token_id, row_length=row)
    targets = batch.input_ids[batch.pairs[0], batch.pairs[2]]
    lp = logprobs_of(onepass_logits(model, batch, "sparse"), targets)
    dense = logprobs_of(onepass_logits(model, batch, "dense"), targets)
    assert (lp - dense).abs().max().item() <= 1e-9
    for i, c in enumerate(convs):
        ref = npass_logprobs(model, tok, c)
        ex, msg = batch.pair_example == i, batch.pair_message
        mine = torch.cat([lp[ex & (msg == m)] for m in sorted(set(msg[ex].tolist()))])
        assert (mine - torch.cat(ref)).abs().max().item() <= 1e-9


def test_eager_attention_agrees():
    model, tok = models.load("tiny-random", dtype="float64", attn_implementation="eager")
    for s in range(3):
        msgs = conversation(random.Random(s), 6, 0.5)
        assert max_diff(onepass_logprobs(model, tok, msgs), npass_logprobs(model, tok, msgs)) <= 1e-6


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_gradients_equal_npass(eager64, attention):
    model, tok = eager64
    rng = random.Random(7)
    msgs = conversation(rng, 5, 0.7)
    params = [p for p in model.parameters()]

    def grads(fn):
        model.zero_grad()
        torch.cat(fn(model, tok, msgs)).sum().backward()
        return [p.grad.clone() for p in params]
    g1 = grads(lambda m, t, x: onepass_logprobs(m, t, x, attention))
    g2 = grads(npass_logprobs)
    assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) <= 1e-6
    model.zero_grad()


def test_turns_without_reasoning_are_trained_once(tb_tok):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "reasoning": "r"}]
    lay = masks.onepass_layout(tb_tok, msgs)
    roles = [masks.ROLE_NAMES[r] for r in lay.roles]
    trained = {t for _, t in lay.pairs}
    # turn 1 (no reasoning): its answer appears once, as answer_in, and is trained ("b<|im_end|>")
    b_at = [i for i, (r, t) in enumerate(zip(lay.roles, lay.turns)) if r == ANSWER_IN and t == 0]
    assert tb_tok.decode([lay.ids[i] for i in b_at]) == "b<|im_end|>\n"
    assert {b_at[0], b_at[1]} <= trained and b_at[2] not in trained  # the trailing newline is not trained
    assert roles.count("answer_out") == len("d") + 1 and "think" in roles


def two_turn_layout(tok):
    msgs = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1", "reasoning": "r1"},
            {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2", "reasoning": "r2"}]
    return msgs, masks.onepass_layout(tok, msgs)


RANK = {HUMAN: 0, THINK: 1, ANSWER_IN: 2, ANSWER_OUT: 3}


def interleaved(lay):
    """The paper's order [h_k | t_k | r_k^in | r_k^out] per turn (the official code's), from our trunk-first
    layout; pairs are remapped to the new indices."""
    order = sorted(range(len(lay)), key=lambda i: (lay.turns[i], RANK[lay.roles[i]], i))
    new_of = {old: new for new, old in enumerate(order)}
    out = masks.Layout(*[[getattr(lay, f)[i] for i in order] for f in ("ids", "roles", "turns", "positions",
                                                                        "weights")])
    out.pairs = [(new_of[p], new_of[t]) for p, t in lay.pairs]
    out.pair_message = list(lay.pair_message)
    return out


def test_mask_blocks_match_the_paper_table(tb_tok):
    """docs/methods.md §2.4: h_i sees H_<i, h_i; t_i sees H_<i, h_i, t_i; r_in sees H_<i, h_i, r_in (not t_i);
    r_out sees H_<i, h_i, t_i, r_out (not r_in). H_<i = earlier human turns and earlier answer_in copies.
    Checked on our trunk-first order and on the paper's interleaved order (the predicate serves both)."""
    _, lay = two_turn_layout(tb_tok)
    expected_visible = {  # (query role, key role, key turn relative to query turn) -> visible
        (HUMAN, HUMAN, "same"): True, (HUMAN, HUMAN, "earlier"): True, (HUMAN, ANSWER_IN, "earlier"): True,
        (HUMAN, THINK, "earlier"): False, (HUMAN, ANSWER_OUT, "earlier"): False,
        (THINK, HUMAN, "same"): True, (THINK, THINK, "same"): True, (THINK, ANSWER_IN, "earlier"): True,
        (THINK, THINK, "earlier"): False, (THINK, ANSWER_OUT, "earlier"): False, (THINK, HUMAN, "earlier"): True,
        (THINK, ANSWER_IN, "same"): False,
        (ANSWER_OUT, HUMAN, "same"): True, (ANSWER_OUT, THINK, "same"): True, (ANSWER_OUT, ANSWER_OUT, "same"): True,
        (ANSWER_OUT, ANSWER_IN, "earlier"): True, (ANSWER_OUT, THINK, "earlier"): False,
        (ANSWER_OUT, ANSWER_OUT, "earlier"): False, (ANSWER_OUT, HUMAN, "earlier"): True,
        (ANSWER_OUT, ANSWER_IN, "same"): False,
        (ANSWER_IN, HUMAN, "same"): True, (ANSWER_IN, HUMAN, "earlier"): True,
        (ANSWER_IN, THINK, "same"): False,
        (ANSWER_IN, ANSWER_IN, "same"): True, (ANSWER_IN, ANSWER_IN, "earlier"): True,
        (ANSWER_IN, THINK, "earlier"): False, (ANSWER_IN, ANSWER_OUT, "earlier"): False,
        (THINK, HUMAN, "later"): False, (THINK, ANSWER_IN, "later"): False,
        (ANSWER_OUT, HUMAN, "later"): False, (ANSWER_OUT, ANSWER_IN, "later"): False,
    }
    seen = set()
    for layout in (lay, interleaved(lay)):
        batch = masks.collate([layout], 0)
        ok = batch.dense_mask(torch.float64)[0, 0] == 0
        roles, turns = layout.roles, layout.turns
        for q in range(len(layout)):
            for k in range(q + 1):
                rel = "same" if turns[k] == turns[q] else "earlier" if turns[k] < turns[q] else "later"
                key = (roles[q], roles[k], rel)
                assert key in expected_visible, key
                assert bool(ok[q, k]) == expected_visible[key], (q, k, key)
                seen.add(key)
            assert not ok[q, q + 1:].any()  # causal in sequence order
    assert seen == set(expected_visible)  # every block of the table occurs
    # r_in never sees its own turn's r_out (in both orders r_out comes later; the predicate forbids it anyway)
    t = torch.tensor
    assert not masks.allowed(t(ANSWER_IN), t(0), t(0), t(5), t(ANSWER_OUT), t(0), t(0), t(1))


def test_interleaved_order_gives_the_same_logprobs(eager64):
    model, tok = eager64
    msgs = conversation(random.Random(5), 4, p_reasoning=0.7)
    lay = interleaved(masks.onepass_layout(tok, msgs))
    batch = masks.collate([lay], tok.pad_token_id)
    lp = logprobs_of(onepass_logits(model, batch, "dense"), batch.input_ids[batch.pairs[0], batch.pairs[2]])
    ref = torch.cat(npass_logprobs(model, tok, msgs))
    msg = batch.pair_message
    mine = torch.cat([lp[msg == m] for m in sorted(set(msg.tolist()))])
    assert (mine - ref).abs().max().item() <= 1e-9


def test_positions_match_npass(tb_tok):
    """docs/methods.md §2.5: r_out positions equal those of the answer in turn i's own sample, r_in positions equal
    those of the answer in turn i+1's sample (as if the reasoning were absent)."""
    from ponder.chat import render
    msgs, lay = two_turn_layout(tb_tok)
    pos = {(r, t): [p for p, rr, tt in zip(lay.positions, lay.roles, lay.turns) if rr == r and tt == t]
           for r in (ANSWER_IN, ANSWER_OUT, THINK) for t in (0, 1)}
    s1 = render(tb_tok, msgs[:2])
    a1 = [i for i, k in enumerate(s1.kinds) if k in ("answer", "eot")]
    assert pos[(ANSWER_OUT, 0)] == a1
    s2 = render(tb_tok, msgs)
    hist_a1 = [i for i, (k, m) in enumerate(zip(s2.kinds, s2.messages)) if m == 1 and k in ("answer", "eot")]
    assert pos[(ANSWER_IN, 0)][:len(hist_a1)] == hist_a1
    think2 = [i for i, k in enumerate(s2.kinds) if k == "reasoning"]
    assert pos[(THINK, 1)] == think2
    assert pos[(THINK, 0)][0] == pos[(ANSWER_IN, 0)][0]  # r_in starts where t starts


def test_official_order_with_naive_shift_is_wrong(eager64):
    """docs/methods.md §2.7: in the official order [t | r_in | r_out], predicting each token from the previous index
    trains the first answer token of every turn from the wrong state (the end of r_in); explicit pairs do not."""
    model, tok = eager64
    msgs = conversation(random.Random(3), 3, p_reasoning=1.0)
    lay = interleaved(masks.onepass_layout(tok, msgs))
    ref = torch.cat(npass_logprobs(model, tok, msgs))
    batch = masks.collate([lay], tok.pad_token_id)
    att = batch.dense_mask(torch.float64)
    order = sorted(range(len(lay.pairs)), key=lambda i: (lay.pair_message[i], i))
    targets = [lay.pairs[i][1] for i in order]
    explicit = torch.tensor([[0] * len(targets), [lay.pairs[i][0] for i in order], targets])
    naive = torch.tensor([[0] * len(targets), [t - 1 for t in targets], targets])
    good = token_logprobs(model, batch.input_ids, pairs=explicit, attention_mask=att, position_ids=batch.position_ids)
    bad = token_logprobs(model, batch.input_ids, pairs=naive, attention_mask=att, position_ids=batch.position_ids)
    assert (good - ref).abs().max() <= 1e-9
    wrong = ((bad - ref).abs() > 1e-6).sum().item()
    assert wrong == 3  # exactly the first answer token of each of the 3 turns


def test_unsupported_attention_backend_is_a_clear_error(tb_tok):
    model, tok = models.load("tiny-random")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="cannot take the one-pass block-sparse mask"):
        onepass_logprobs(model, tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_blockmask_forward_matches_dense():
    model, tok = models.load("tiny-random", attn_implementation="flex_attention")
    dense, _ = models.load("tiny-random", attn_implementation="sdpa")
    convs = [conversation(random.Random(s), 4, 0.6) for s in range(3)]
    lays = [masks.onepass_layout(tok, c) for c in convs]
    batch = masks.collate(lays, tok.pad_token_id, row_length=256)
    with torch.no_grad():
        a = token_logprobs(model, batch.input_ids, pairs=batch.pairs, attention_mask=batch.block_mask(),
                           position_ids=batch.position_ids)
        b = token_logprobs(dense, batch.input_ids, pairs=batch.pairs, attention_mask=attention_for(dense, batch),
                           position_ids=batch.position_ids)
    assert (a - b).abs().max().item() <= 1e-4


def test_smollm2_real_template(smol_dir):
    model, tok = models.load("smollm2-135m")
    msgs = conversation(random.Random(11), 3, p_reasoning=0.7, system=False)
    with torch.no_grad():
        d = max_diff(onepass_logprobs(model, tok, msgs), npass_logprobs(model, tok, msgs))
    assert d <= 2e-3  # fp32 on a 30-layer model with logits up to ~40 (measured 6e-5 on logits)


def _run_mode(mode, tmp_path, convs, **kw):
    from ponder.trainers.onepass import OnePassConfig, OnePassTrainer
    model, tok = models.load("tiny-random", dtype="float64")
    args = OnePassConfig(output_dir=str(tmp_path / mode), mode=mode, max_steps=4, per_device_train_batch_size=3,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], seed=3,
                         train_sampling_strategy="sequential", optim="sgd", **kw)  # Adam amplifies 1e-16 noise
    tr = OnePassTrainer(model=model, args=args, train_dataset=convs, processing_class=tok)
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()]), tr.data_stats["train"]


@pytest.mark.parametrize("norm", ["tokens", "messages"])
def test_training_modes_give_the_same_run(tmp_path, norm):
    from ponder import testbed
    rng = random.Random(0)
    convs = [testbed.multi_turn(testbed.sample_problem(rng), rng, turns=rng.randint(1, 4)) for _ in range(12)]
    convs[3][1]["weight"] = 0.0  # a context-only turn
    one = _run_mode("onepass", tmp_path, convs, loss_normalization=norm)
    ref = _run_mode("npass", tmp_path, convs, loss_normalization=norm)
    kp = _run_mode("kpass", tmp_path, convs, loss_normalization=norm, kpass_chunks=2)
    packed = _run_mode("onepass", tmp_path / "p", convs, loss_normalization=norm, packing=True, packing_length=400)
    for other in (ref, kp, packed):
        assert max(abs(a - b) for a, b in zip(one[0], other[0])) < 1e-9
        assert (one[1] - other[1]).abs().max() < 1e-9
    assert one[2]["tokens_forwarded"] < kp[2]["tokens_forwarded"] < ref[2]["tokens_forwarded"]


# Measured sparse/dense time ratios (forward+backward of one conversation; bench/attention.py and the
# dense/sparse columns of bench/onepass.py): (model, depth, threads, tokens, dense pairs, sparse pairs, ratio)
TESTBED = dict(width=192, linear_macs=442368)
SMOLLM2 = dict(width=576, linear_macs=3538944)
MEASURED = [
    (TESTBED, 8, 2, 847, 717409, 226934, 0.982), (TESTBED, 16, 2, 1682, 2829124, 768078, 0.787),
    (SMOLLM2, 8, 2, 837, 700569, 225917, 1.148), (SMOLLM2, 16, 2, 1653, 2732409, 739841, 1.212),
    (TESTBED, 8, 1, 847, 717409, 226934, 0.655), (TESTBED, 16, 1, 1682, 2829124, 768078, 0.554),
    (TESTBED, 16, 1, 2961, 8767521, 2195687, 0.424), (SMOLLM2, 8, 1, 837, 700569, 225917, 0.921),
    (SMOLLM2, 16, 1, 1653, 2732409, 739841, 0.797), (SMOLLM2, 16, 1, 1013, 1026169, 309057, 0.859),
]


@pytest.mark.parametrize("model, depth, threads, tokens, dense_pairs, sparse_pairs, ratio", MEASURED)
def test_choose_attention_picks_the_measured_faster_path(model, depth, threads, tokens, dense_pairs,
                                                         sparse_pairs, ratio):
    pick = choose_attention(rows=1, tokens=tokens, dense_pairs=dense_pairs, sparse_pairs=sparse_pairs,
                            threads=threads, **model)
    assert pick == ("sparse" if ratio < 1 else "dense")


def test_choose_attention_rule():
    shape = dict(rows=1, tokens=1653, dense_pairs=2732409, sparse_pairs=739841, **SMOLLM2)
    assert choose_attention(threads=1, **shape) == "sparse"      # one thread: fewer pairs always win
    assert choose_attention(threads=2, **shape) == "dense"       # SmolLM2 at depth 16, 2 threads
    assert choose_attention(threads=2, **{**shape, "sparse_pairs": 0}) == "dense"  # no block-sparse plan
    # hand-computed at 2 threads: sigma = 1 + 1653*576/1.5e5 = 7.347; sparse pairs cost 7.347*739841 =
    # 5.435e6 > 2.732e6 dense pairs -> dense; at a third of the sparse pairs it flips
    assert choose_attention(threads=2, **{**shape, "sparse_pairs": 2732409 // 7.347 * 0.99}) == "sparse"
    assert choose_attention(threads=2, **{**shape, "sparse_pairs": 2732409 // 7.347 * 1.01}) == "dense"


def test_auto_attention_uses_the_rule(tb_tok, monkeypatch):
    """`auto` on a CPU model runs whichever path the rule names (both give the same numbers)."""
    model, tok = models.load("tiny-random")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning": "r r", "content": "a"}] * 3
    batch = masks.collate([masks.onepass_layout(tok, msgs)], 0)
    seen = []
    real = tree.choose_attention

    def spy(**shape):
        seen.append((shape, real(**shape)))
        return seen[-1][1]
    monkeypatch.setattr(tree, "choose_attention", spy)
    lp = onepass_logits(model, batch, "auto")
    assert seen and seen[0][0]["sparse_pairs"] > 0 and seen[0][0]["threads"] == torch.get_num_threads()
    assert torch.allclose(lp, onepass_logits(model, batch, seen[0][1]))
