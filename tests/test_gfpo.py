"""GFPO (docs/methods.md §1.5, §1.9 test 5): the gradient equals the hand-computed A·∇log π(g|x), it flows only through
the tag position (equal to the GRPO-style loss on full rollouts masked to the tag token), zero advantages give
zero gradient, and training moves π(g|x) towards rewarded tags."""

import math

import pytest
import torch

from ponder import chat, models, ssft
from ponder.data import load_problems
from ponder.trainers import gfpo
from ponder.trainers.gfpo import GFPOConfig, GFPOTrainer
from ponder.trainers.ssft import collate

TAGS = ssft.forking_tags(4)


@pytest.fixture
def tiny64():
    return models.load("tiny-random", dtype="float64", add_tokens=TAGS, token_init="mean+noise")


def make(model, tok, tmp_path, rewards_of_tag=None, **kw):
    kw = {"num_tags": 4, "num_generations": 5, "report_to": [], "disable_tqdm": True, "save_strategy": "no",
          "max_new_tokens": 4, "n_train": 3, **kw}
    args = GFPOConfig(output_dir=str(tmp_path), model="unused", **kw)
    tr = GFPOTrainer(model=model, args=args, processing_class=tok,
                     train_dataset=load_problems("testbed", n=kw["n_train"], split="train"))
    if rewards_of_tag is not None:  # rollouts stubbed: the reward depends on the first token only (0 if no tag)
        tr.seen = []
        reward_of = dict(zip(tr.tag_ids, rewards_of_tag))

        def fake(model, items, first):
            tr.seen.append(first.clone())
            return torch.tensor([[reward_of.get(int(t), 0.0) for t in row] for row in first], dtype=torch.float64)
        tr.rollouts = fake
    return tr


def step_grads(tr, model, capture_logits=False):
    model.zero_grad()
    grabbed = {}
    if capture_logits:
        def hook(mod, inp, out):
            out.retain_grad()
            grabbed["logits"] = out
        h = model.lm_head.register_forward_hook(hook)
    batch = collate(tr.train_dataset)
    loss = tr.compute_loss(model, batch, num_items_in_batch=batch["units"].sum())
    loss.backward()
    if capture_logits:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, grabbed.get("logits")


REWARDS = [1.0, 0.0, 0.5, 0.0]  # reward of each tag


def make_tags_likely(model, tok):
    """Set the tags' output rows so that each tag's logit after a testbed prompt is ~2 above the largest other
    logit (a fresh random model would almost never start with a tag under the full-vocabulary policy)."""
    prompts = [chat.generation_prompt(tok, [{"role": "user", "content": p.question}])
               for p in load_problems("testbed", n=3, split="train")]
    ids = tok.convert_tokens_to_ids(TAGS)
    with torch.no_grad():
        h = torch.stack([model.model(torch.tensor([pr])).last_hidden_state[0, -1] for pr in prompts]).mean(0)
        top = max(model(torch.tensor([pr])).logits[0, -1].max().item() for pr in prompts)
        for i, t in enumerate(ids):
            model.lm_head.weight[t] = (top + 2 + 0.3 * i) * h / h.dot(h)


def _advantages(tr, first):
    reward_of = dict(zip(tr.tag_ids, REWARDS))
    r = torch.tensor([[reward_of.get(int(t), 0.0) for t in row] for row in first], dtype=torch.float64)
    return (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-6)


@pytest.mark.parametrize("policy", ["full", "tags"])
def test_gradient_equals_hand_computed_policy_gradient(tiny64, tmp_path, policy):
    """docs/methods.md §1.10: ``full`` differentiates log of the full-vocabulary softmax at the first token,
    ``tags`` the softmax restricted to the tags; both equal -(1/BG) Σ A_k ∇log π(g_k|x) computed by hand."""
    model, tok = tiny64
    if policy == "full":   # make the tags likely first tokens, so that some are sampled
        make_tags_likely(model, tok)
    tr = make(model, tok, tmp_path, REWARDS, tag_policy=policy)
    loss, grads, logits = step_grads(tr, model, capture_logits=True)
    first = tr.seen[0]                                   # the sampled first tokens (token ids)
    B, G = first.shape
    adv = _advantages(tr, first)
    assert adv.abs().sum() > 0
    ids = [t[0] for t in ssft.tag_token_ids(tok, TAGS)]
    cols = ids if policy == "tags" else list(range(logits.shape[-1]))
    prompts = [it["prompt"] for it in tr.train_dataset]

    # 1. at the logits: d loss / d logit_n = -(1/BG) Σ_k A_k (1[g_k = n] - p_n) on the candidate columns
    assert logits.shape[1] == 1  # only the last prompt position is ever computed
    with torch.no_grad():
        p = torch.stack([torch.softmax(model(torch.tensor([pr])).logits[0, -1, cols], -1) for pr in prompts])
    expect = torch.zeros_like(logits.grad[:, 0])
    for b in range(B):
        for k in range(G):
            onehot = torch.zeros(len(cols), dtype=torch.float64)
            onehot[cols.index(int(first[b, k]))] = 1
            expect[b, cols] -= adv[b, k] * (onehot - p[b]) / (B * G)
    assert (logits.grad[:, 0] - expect).abs().max() <= 1e-12
    others = [i for i in range(logits.shape[-1]) if i not in cols]
    assert not others or logits.grad[:, 0, others].abs().max() == 0

    # 2. at the parameters: ∇ of -(1/BG) Σ_x Σ_k A_k·log π(g_k|x), one separate unpadded forward per question.
    # (Per question, not per sample: transformers' LlamaRMSNorm casts to fp32 even in an fp64 model, so the
    # backward rounds at fp32 precision and splitting one question's upstream gradient into G backward passes
    # changes the result by ~1e-8 — measured, independent of this code.)
    model.zero_grad()
    ref = 0
    for b in range(B):
        lp = torch.log_softmax(model(torch.tensor([prompts[b]])).logits[0, -1, cols], -1)
        for k in range(G):
            ref = ref - adv[b, k] * lp[cols.index(int(first[b, k]))] / (B * G)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-12
    for n, prm in model.named_parameters():
        assert (grads[n] - prm.grad).abs().max() <= 1e-10, n


def test_equals_grpo_loss_masked_to_the_tag_token(tiny64, tmp_path):
    """The GRPO-style formulation on the full rollouts [prompt | tag | trace] with the loss mask zero everywhere
    but the tag token: its gradient reaches the logits only at the tag's predictor position, and its parameter
    gradient equals GFPO's (computed from the prompts alone)."""
    model, tok = tiny64
    tr = make(model, tok, tmp_path, REWARDS, tag_policy="tags")
    _, grads, _ = step_grads(tr, model)
    first = tr.seen[0]
    B, G = first.shape
    adv = _advantages(tr, first)
    ids = [t[0] for t in ssft.tag_token_ids(tok, TAGS)]
    chosen = torch.tensor([[ids.index(int(t)) for t in row] for row in first])
    trace = chat.render(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "The answer is 7.",
                                                                  "reasoning": "1+6=7."}]).ids[-12:]
    seqs, tag_at = [], []
    for b, it in enumerate(tr.train_dataset):
        for k in range(G):
            tag_at.append(len(it["prompt"]))
            seqs.append(it["prompt"] + [int(first[b, k])] + trace[: 3 + k])  # rollouts of different lengths
    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), tok.pad_token_id)
    att = torch.zeros_like(x)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
    model.zero_grad()
    logits = model(x, attention_mask=att).logits
    logits.retain_grad()
    mask = torch.zeros(x.shape, dtype=torch.bool)  # token loss mask: the tag token only
    mask[torch.arange(len(seqs)), torch.tensor(tag_at)] = True
    rows, tgt = mask.nonzero(as_tuple=True)
    lp = torch.log_softmax(logits[rows, tgt - 1][:, ids], -1)
    picked = lp[torch.arange(len(rows)), chosen.flatten()]
    loss = -(adv.flatten() * picked).sum() / (B * G)
    loss.backward()
    nz = logits.grad.abs().sum(-1) != 0
    expect = torch.zeros_like(nz)
    expect[rows, tgt - 1] = adv.flatten() != 0  # (a sample with zero advantage contributes nothing)
    assert torch.equal(nz, expect)
    # one row per sample here vs one per question in GFPO: equal up to RMSNorm's fp32 rounding (see above)
    for n, prm in model.named_parameters():
        assert (grads[n] - prm.grad).abs().max() <= 1e-7 * prm.grad.abs().max(), n


def test_zero_advantage_gives_zero_gradient(tiny64, tmp_path):
    model, tok = tiny64
    tr = make(model, tok, tmp_path, [0.3, 0.3, 0.3, 0.3])
    loss, grads, _ = step_grads(tr, model)
    assert loss.item() == 0
    assert all(g.abs().max() == 0 for g in grads.values())


@pytest.mark.parametrize("bad", [-math.inf, math.nan])
def test_non_finite_reward_is_refused_or_skipped(tiny64, tmp_path, monkeypatch, bad):
    """A reward_fn returning −inf or NaN for one rollout: one line naming the reward and the problem by default;
    with nan_rewards: skip the rollout leaves its group's mean and std (advantage 0, counted), the other groups
    are untouched, and the loss is the hand-computed one."""
    model, tok = tiny64
    tr = make(model, tok, tmp_path, REWARDS, max_steps=1, logging_steps=1, per_device_train_batch_size=3)
    fake = tr.rollouts

    def poisoned(model, items, first):
        r = fake(model, items, first)
        r[1, 2] = bad
        return r
    tr.rollouts = poisoned
    pid = tr.train_dataset[1]["problem"].id
    with pytest.raises(ValueError, match=rf"^reward verify is {bad} for problem {pid} \(1 of 15 rewards"):
        step_grads(tr, model)
    tr.args.nan_rewards = "skip"
    seen = {}
    real = gfpo.group_normalized
    monkeypatch.setattr(gfpo, "group_normalized", lambda r, **kw: seen.setdefault("adv", real(r, **kw)))
    tr.train()  # one logged step: the skip is counted
    assert [h["nonfinite_rewards"] for h in tr.state.log_history if "nonfinite_rewards" in h] == [1]
    adv, first = torch.nan_to_num(seen["adv"]), tr.seen[-1]
    want = _advantages(tr, first)
    reward_of = dict(zip(tr.tag_ids, REWARDS))
    row = torch.tensor([reward_of.get(int(t), 0.0) for t in first[1]], dtype=torch.float64)
    keep = torch.arange(5) != 2
    want[1] = 0.0
    if row[keep].std() > 0:  # GRPO over the four scorable rewards by hand (population std)
        want[1, keep] = (row[keep] - row[keep].mean()) / (row[keep].std(unbiased=False) + 1e-6)
    assert torch.allclose(adv, want, atol=1e-12)


def test_training_moves_the_tag_distribution_towards_rewarded_tags(tmp_path):
    from ponder.ssft import tag_distribution
    model, tok = models.load("tiny-random", add_tokens=TAGS, token_init="mean+noise")
    probs = load_problems("testbed", n=3, split="train")
    before = tag_distribution(model, tok, probs, 4, policy="tags")
    tr = make(model, tok, tmp_path, [0.0, 0.0, 1.0, 0.0], max_steps=8, learning_rate=3e-2,
              per_device_train_batch_size=3, num_generations=8, logging_steps=4, tag_policy="tags")
    tr.train()
    after = tag_distribution(tr.model, tok, probs, 4, policy="tags")
    assert after[2] > before[2] + 0.2
    shares = [h["tag_share/<think3>"] for h in tr.state.log_history if "tag_share/<think3>" in h]
    assert len(shares) == 2 and shares[1] > shares[0]  # the rewarded tag is sampled more and more


def test_one_step_with_real_rollouts(tmp_path):
    model, tok = models.load("tiny-random", add_tokens=TAGS, token_init="mean+noise")
    tr = make(model, tok, tmp_path, None, max_steps=1, per_device_train_batch_size=2, logging_steps=1)
    tr.reward_fn = lambda problem, text: float(len(text) % 2)
    tr.train()
    logs = [h for h in tr.state.log_history if "reward" in h]
    assert logs and 0 <= logs[0]["reward"] <= 1 and logs[0]["completion_tokens"] <= 4
    assert logs[0]["tag_entropy"] <= logs[0]["tag_entropy_max"] + 1e-9


@pytest.mark.parametrize("tied", [True, False])
def test_tags_only_moves_the_tag_distribution_with_untied_embeddings(tmp_path, tied):
    """tags_only trains the rows the tag's log-prob depends on: on a model whose output embeddings are not tied
    to its input embeddings, those are the output rows, and one step must change π(g|x) (docs/methods.md §1.10)."""
    from ponder.ssft import tag_distribution
    model, tok = models.load("tiny-random", add_tokens=TAGS, token_init="mean+noise",
                             config_overrides={"tie_word_embeddings": tied})
    assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied
    make_tags_likely(model, tok)
    probs = load_problems("testbed", n=3, split="train")
    before = tag_distribution(model, tok, probs, 4)
    tr = make(model, tok, tmp_path, [0.0, 0.0, 1.0, 0.0], max_steps=1, learning_rate=1e-1,
              per_device_train_batch_size=3, num_generations=8, tags_only=True)
    frozen = {n: p.detach().clone() for n, p in tr.model.named_parameters() if not p.requires_grad}
    tr.train()
    after = tag_distribution(tr.model, tok, probs, 4)
    assert (after - before).abs().max() > 1e-3
    assert all(torch.equal(p, frozen[n]) for n, p in tr.model.named_parameters() if n in frozen)


def test_rollouts_run_in_the_configs_rollout_dtype(tmp_path, monkeypatch):
    from ponder import rollout
    model, tok = models.load("tiny-random", add_tokens=TAGS, token_init="mean+noise")
    seen, real = [], rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda *a, **kw: seen.append(kw.get("dtype")) or real(*a, **kw))
    make(model, tok, tmp_path, rollout_dtype="bfloat16", max_steps=1, per_device_train_batch_size=1).train()
    assert seen and set(seen) == {"bfloat16"}
