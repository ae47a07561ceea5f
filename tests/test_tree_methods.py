"""The methods on the prefix-tree engine (docs/architecture.md "The tree engine"): LaTRO's K rationales of a
question as one tree x -> z_k -> y_k (and the reference pass as x -> z_k), and a GFPO group as one tree
prompt -> tag_k -> trace_k, give the log-probs and parameter gradients of separate unpadded passes, one per
sample (fp64), while forwarding each shared prompt once."""

import copy
import random

import pytest
import torch

from ponder import latro, models, ssft, tree
from ponder.logprobs import token_logprobs
from ponder.trainers.gfpo import gfpo_loss_sum

TAGS = ssft.forking_tags(4)


@pytest.fixture(scope="module")
def tiny64():
    return models.load("tiny-random", dtype="float64", add_tokens=TAGS, token_init="mean+noise")


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    return g


def close(a, b):
    """Parameter gradients: HF's LlamaRMSNorm computes in fp32 even in an fp64 model, so a gradient summed over
    branches inside one pass and the sum of per-sequence gradients round at fp32 (~1e-7 relative;
    tests/test_tree.py); a wrong mask, position or pair is O(1)."""
    scale = b.abs().max()
    return scale > 1e-3 and (a - b).abs().max() <= 1e-6 * scale


def latro_batch(tok, rng, questions=3, k=4):
    vocab = 100  # the tiny-random model's vocabulary is 107 tokens (+ the tags)
    xs, zs, ys = [], [], []
    for q in range(questions):
        x = latro.prompt_ids(tok, f"question {q}: " + " ".join(str(rng.randint(0, 99)) for _ in range(3 + q)))
        y = latro.answer_ids(tok, f"The answer is {rng.randint(0, 99)}.")
        for j in range(k):
            xs.append(x)
            zs.append([rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))] if (q, j) != (1, 2) else [])
            ys.append(y)
    return xs, zs, ys


def separate(model, x, z, y):
    """Σ log p(z|x) over the unpadded [x z] and Σ log p(y|x⊕z) over the unpadded [x z y]: two passes per sample."""
    lz = token_logprobs(model, torch.tensor([x + z]), target_mask=torch.tensor([[False] * len(x) + [True] * len(z)]))
    ly = token_logprobs(model, torch.tensor([x + z + y]),
                        target_mask=torch.tensor([[False] * (len(x) + len(z)) + [True] * len(y)]))
    return lz.sum(), ly.sum()


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_latro_k_rationales_and_reference_on_one_tree(tiny64, attention):
    model, tok = tiny64
    xs, zs, ys = latro_batch(tok, random.Random(attention))
    n = len(xs)
    # one tree per question: x forwarded once, every z and y once
    flats = [tree.flatten(t) for t in latro.trees(xs, zs, ys)]
    assert len(flats) == 3
    assert sum(len(f) for f in flats) == sum(len(x) for x in dict.fromkeys(map(tuple, xs))) + sum(
        len(z) + len(y) for z, y in zip(zs, ys))
    w = torch.linspace(-1.0, 2.0, n, dtype=torch.float64)
    lz, ly = latro.score_ids(model, xs, zs, ys, tok.pad_token_id, attention=attention)
    g_tree = grads(model, (w * lz).sum() + (w.flip(0) * ly).sum())
    ref = [separate(model, x, z, y) for x, z, y in zip(xs, zs, ys)]
    rz, ry = torch.stack([r[0] for r in ref]), torch.stack([r[1] for r in ref])
    g_sep = grads(model, (w * rz).sum() + (w.flip(0) * ry).sum())
    assert (lz.detach() - rz.detach()).abs().max() <= 1e-9 and (ly.detach() - ry.detach()).abs().max() <= 1e-9
    assert lz[6].item() == 0.0  # the empty rationale
    assert close(g_tree, g_sep)
    # the official two-pass path (`score_separate`, the bench baseline) gives the same numbers
    sz, sy = latro.score_separate(model, xs, zs, ys, tok.pad_token_id)
    assert (sz - rz).abs().max() <= 1e-9 and (sy - ry).abs().max() <= 1e-9
    # the reference pass: the same trees without y (x -> z_k), only x and z forwarded, equal to [x z] passes
    empty = [[] for _ in xs]
    flats = [tree.flatten(t) for t in latro.trees(xs, zs, empty)]
    assert sum(len(f) for f in flats) == sum(len(x) for x in dict.fromkeys(map(tuple, xs))) + sum(map(len, zs))
    ref_model = copy.deepcopy(model)  # π₀: a perturbed copy
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    rlz, rly = latro.score_ids(ref_model, xs, zs, empty, tok.pad_token_id, attention=attention)
    g_ref = grads(ref_model, (w * rlz).sum())
    want = torch.stack([separate(ref_model, x, z, [])[0] for x, z in zip(xs, zs)])
    g_want = grads(ref_model, (w * want).sum())
    assert (rlz.detach() - want.detach()).abs().max() <= 1e-9 and (rlz.detach() - rz).abs().max() > 1e-4
    assert rly.abs().max() == 0.0 and close(g_ref, g_want)


def test_gfpo_group_on_one_tree(tiny64):
    """GFPO's loss −Σ A_k log π(g_k|x) (one forward over the prompts, `ssft.first_token_logprobs`) equals the
    tree prompt -> tag_k -> trace_k with only the tag scored, and both equal separate [prompt tag trace] passes
    masked to the tag token: log-probs and parameter gradients."""
    model, tok = tiny64
    rng = random.Random(0)
    tag_ids = [t[0] for t in ssft.tag_token_ids(tok, TAGS)]
    prompts = [latro.prompt_ids(tok, f"problem {b}: {rng.randint(0, 999)} + {rng.randint(0, 999)}") for b in range(3)]
    G = 5
    chosen = torch.tensor([[rng.randrange(len(tag_ids)) for _ in range(G)] for _ in prompts])
    adv = torch.randn(len(prompts), G, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    traces = [[[rng.randrange(3, 100) for _ in range(rng.randint(1, 6))] for _ in range(G)] for _ in prompts]

    logp = ssft.tag_logprobs(model, prompts, tag_ids, tok.pad_token_id, policy="full")
    g_gfpo = grads(model, gfpo_loss_sum(logp, chosen, adv))

    trees = []
    for b, x in enumerate(prompts):
        t = tree.Tree()
        root = t.add(x)
        for k in range(G):
            tag = t.add([tag_ids[int(chosen[b, k])]], root, weight=1.0, group=k)
            t.add(traces[b][k], tag)
        trees.append(t)
    packed = tree.pack([tree.flatten(t) for t in trees], tok.pad_token_id)
    assert packed.tokens == sum(len(x) for x in prompts) + sum(1 + len(r) for rs in traces for r in rs)
    lp = tree.logprobs(model, packed, "sparse")
    a = adv[packed.pair_tree, packed.pair_group]
    g_tree = grads(model, -(a * lp).sum())

    sep = []
    for b, x in enumerate(prompts):
        for k in range(G):
            seq = x + [tag_ids[int(chosen[b, k])]] + traces[b][k]
            mask = torch.zeros(1, len(seq), dtype=torch.bool)
            mask[0, len(x)] = True
            sep.append(token_logprobs(model, torch.tensor([seq]), target_mask=mask)[0])
    sep = torch.stack(sep)
    g_sep = grads(model, -(adv.flatten() * sep).sum())
    picked = logp.gather(1, chosen)
    assert (lp.detach() - sep.detach()).abs().max() <= 1e-9
    assert (picked.detach().flatten() - sep.detach()).abs().max() <= 1e-9
    assert close(g_tree, g_sep) and close(g_gfpo, g_sep)
