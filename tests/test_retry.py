"""Multi-turn retry RL (`ponder retry`, docs/methods.md §7): the one-tree loss and its gradients equal the per-turn
samples (each attempt forwarded as its own sequence after its rendered history) on real sampled episodes, fp64,
both history modes; per-turn advantages against hand computations (early-stopped episodes included); a short
training run that logs and resumes exactly; one-line errors for bad options; the CLI recipe."""

import copy
import json
import math
import os

import pytest
import torch

from ponder import models, retry, rise, tree
from ponder.data import load_problems
from ponder.logprobs import token_logprobs
from ponder.trainers.retry import RetryConfig, RetryTrainer

PROBLEMS = load_problems("testbed", n=12, split="train")  # the testbed solves ~15% of them at turn 1


def rmsnorm_fp64(self, h):
    """LlamaRMSNorm in the input's dtype: HF's casts to fp32 even in an fp64 model, which rounds the gradients
    summed over a tree's branches at fp32 (~1e-7 relative; tests/test_tree.py); computed in fp64 the tree and
    the per-turn samples agree to 1e-9 in the gradients too."""
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def load64():
    model, tok = models.load("testbed", dtype="float64")
    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.forward = rmsnorm_fp64.__get__(m)
    return model, tok


@pytest.fixture(scope="module")
def testbed64():
    return load64()


# ----------------------------------------------------------------------------------------------------------
# (a) one tree == per-turn samples, on real episodes
# ----------------------------------------------------------------------------------------------------------


def per_turn_reference(model, episodes, weights, ref_model=None, beta=0.0):
    """Σ over episodes and attempts of Σ_j w·(-log π(a_j | prompt_t a_<j)) + β·k3, each [prompt_t attempt_t]
    forwarded alone through the plain causal model."""
    total = 0.0
    for e, ws in zip(episodes, weights):
        for (prompt, att), w in zip(e.sequences, ws):
            ids = torch.tensor([prompt + att])
            tg = torch.arange(len(prompt), len(prompt) + len(att))
            pairs = torch.stack([torch.zeros_like(tg), tg - 1, tg])
            lp = token_logprobs(model, ids, pairs=pairs)
            total = total - w * lp.sum()
            if beta:
                with torch.no_grad():
                    ref = token_logprobs(ref_model, ids, pairs=pairs)
                d = ref - lp
                total = total + beta * (torch.exp(d) - d - 1).sum()
    return total


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    g = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return g


@pytest.mark.parametrize("history", ["strip", "keep"])
def test_one_tree_equals_per_turn_samples(testbed64, history):
    model, tok = testbed64
    env = rise.Env(history_reasoning=history)
    eps = retry.rollout_episodes(model, tok, PROBLEMS[4:7], env, num_generations=3, max_turns=3,
                                 max_new_tokens=48, seed=1)
    flat = [e for row in eps for e in row]
    # episodes of every length: some stopped early (correct), some reached turn 3
    assert {len(e.attempts) for e in flat} == {1, 2, 3}
    # the prompts the attempts were sampled from are the history as rendered at inference
    for e in flat:
        seqs = retry.turn_sequences(tok, e.messages, history, e.attempts)
        assert [p for p, _ in seqs] == e.prompts
    if history == "strip":  # the hidden reasoning really is absent from later prompts
        e = next(e for e in flat if len(e.attempts) > 1)
        think = tok.convert_tokens_to_ids("<think>") if "<think>" in tok.get_vocab() else None
        assert think is None or think not in e.prompts[1]
    weights = [[0.7 - 0.3 * t + 0.1 * i for t in range(len(e.attempts))] for i, e in enumerate(flat)]
    trees = [retry.episode_tree(tok, e.messages, w, history, e.attempts) for e, w in zip(flat, weights)]
    packed = tree.pack([tree.flatten(t) for t in trees], pad_id=0, row_length=700)
    assert packed.input_ids.shape[0] < len(trees)  # several episodes share a row
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for attention in ("dense", "sparse"):
        lp = tree.logprobs(model, packed, attention)
        with torch.no_grad():
            ref = tree.logprobs(ref_model, packed, attention)
        d = ref - lp
        loss = -(packed.pair_weight * lp).sum() + 0.3 * (torch.exp(d) - d - 1).sum()
        expect = per_turn_reference(model, flat, weights, ref_model, beta=0.3)
        assert abs(loss.item() - expect.item()) <= 1e-9
        n = sum(len(a) for e in flat for a in e.attempts)
        assert packed.pairs.shape[1] == n
        for a, b in zip(grads(model, loss / n), grads(model, expect / n)):
            assert (a - b).abs().max().item() <= 1e-9 * max(1.0, b.abs().max().item())
    # fewer tokens than the per-turn samples, and with `strip` the trunk keeps only the answers
    per_turn = sum(len(p) + len(a) for e in flat for p, a in e.sequences)
    assert packed.tokens < per_turn


def test_prefix_tree_separate_sequences_are_the_turns():
    """Model-free: `ponder.tree.separate` of an episode's tree gives back exactly its per-turn sequences, every
    attempt token once with its weight; a scored token is never merged with another sequence's."""
    seqs = [([1, 2, 3], [7, 8, 9]), ([1, 2, 3, 8, 9, 4], [7, 5]), ([1, 2, 3, 8, 9, 4, 7, 5, 6], [5, 5, 5])]
    weights = [[1.0] * 3, [-2.0] * 2, [0.1, 0.2, 0.3]]
    t = retry.prefix_tree(seqs, [1.0, -2.0, [0.1, 0.2, 0.3]])
    got = sorted((g, tuple(s.ids[:at]), s.ids[at], w) for s in tree.separate(t)
                 for at, w, g in zip(s.targets, s.weights, s.groups))
    want = sorted((k, tuple(c + a[:j]), a[j], w[j]) for k, ((c, a), w) in enumerate(zip(seqs, weights))
                  for j in range(len(a)))
    assert got == want
    assert len(tree.flatten(t)) < sum(len(c) + len(a) for c, a in seqs)  # prefixes shared
    # keep-like episode: attempt 1 is also the start of prompt 2: one chain, attempt tokens scored where they stand
    seqs = [([1, 2], [3, 4]), ([1, 2, 3, 4, 5], [6])]
    t = retry.prefix_tree(seqs, [1.0, 1.0])
    assert len(tree.flatten(t)) == 6 and len(tree.flatten(t).pairs) == 3
    # a scored token identical to another sequence's scored token at the same place is not merged
    t = retry.prefix_tree([([1], [2, 3]), ([1], [2, 4])], [1.0, 2.0])
    assert len(tree.flatten(t).pairs) == 4


# ----------------------------------------------------------------------------------------------------------
# (b) per-turn advantages
# ----------------------------------------------------------------------------------------------------------


def close(a, b, tol=1e-12):
    assert [len(x) for x in a] == [len(x) for x in b]
    assert all(abs(x - y) <= tol for u, v in zip(a, b) for x, y in zip(u, v)), (a, b)


def test_turn_advantages_by_hand():
    # 4 episodes, T = 3: e0 right at turn 1 (stops), e1 right at turn 2, e2 and e3 wrong three times
    r = [[1.0], [0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    # turn: turn 1 group {0,1,2,3} values 1,0,0,0; turn 2 group {1,2,3} 1,0,0; turn 3 group {2,3} 0,0
    a = retry.turn_advantages(r, "rloo", "turn")
    close(a, [[1.0], [-1 / 3, 1.0], [-1 / 3, -0.5, 0.0], [-1 / 3, -0.5, 0.0]])
    # return, γ = 0.5: e0 [1]; e1 [0.5, 1]; e2, e3 [0, 0, 0]
    a = retry.turn_advantages(r, "rloo", "return", gamma=0.5)
    close(a, [[1 - 0.5 / 3], [0.5 - 1 / 3, 1.0], [0 - 1.5 / 3, -0.5, 0.0], [0 - 1.5 / 3, -0.5, 0.0]])
    # grpo (population std, eps 1e-6): turn 1 values 1,0,0,0: mean .25, std sqrt(3)/4
    a = retry.turn_advantages(r, "grpo", "turn")
    s = 3 ** 0.5 / 4
    assert a[0][0] == pytest.approx(0.75 / (s + 1e-6), abs=1e-12)
    assert a[2][0] == pytest.approx(-0.25 / (s + 1e-6), abs=1e-12)
    # turn 2 values 1,0,0: mean 1/3, std sqrt(2)/3; turn 3: all equal -> 0
    assert a[1][1] == pytest.approx((2 / 3) / (2 ** 0.5 / 3 + 1e-6), abs=1e-12)
    assert a[2][2] == 0.0 and a[3][2] == 0.0
    # a group of one gets no baseline: 0
    a = retry.turn_advantages([[0.0, 1.0], [1.0]], "rloo", "turn")
    assert a == [[-1.0, 0.0], [1.0]]


def test_turn_advantages_non_finite_rewards():
    """The issue's case: grpo used to return NaN advantages with no guard. Refused by default; skipped, the
    reward leaves its turn's group (and, with credit: return, the earlier turns of its episode) with A = 0."""
    r = [[0.0, 1.0], [0.0, -math.inf], [1.0], [0.0, 0.0]]
    for mode in ("rloo", "grpo"):
        with pytest.raises(ValueError, match="not finite"):
            retry.turn_advantages(r, mode)
    # turn 1: values 0,0,1,0 (all finite); turn 2: e0 1, e1 skipped, e3 0 -> RLOO over {e0, e3}: +1, -1
    a = retry.turn_advantages(r, "rloo", skip_nan=True)
    close(a, [[-1 / 3, 1.0], [-1 / 3, 0.0], [1.0, ], [-1 / 3, -1.0]])
    # grpo turn 2 over {1, 0}: mean 0.5, population std 0.5
    a = retry.turn_advantages(r, "grpo", skip_nan=True)
    assert a[1][1] == 0.0 and a[0][1] == pytest.approx(0.5 / (0.5 + 1e-6), abs=1e-12) and a[3][1] == -a[0][1]
    # return credit: e1's turn-1 return holds the -inf too, so it leaves turn 1's group: {e0: 1, e2: 1, e3: 0}
    a = retry.turn_advantages(r, "rloo", "return", skip_nan=True)
    close(a, [[1 - 1 / 2, 1.0], [0.0, 0.0], [1 - 1 / 2, ], [0 - 1.0, -1.0]])
    # equal values in a turn give exactly 0 in both modes
    assert retry.turn_advantages([[0.1], [0.1], [0.1]], "grpo") == [[0.0], [0.0], [0.0]]


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_trainer_non_finite_reward(tmp_path, monkeypatch, policy):
    """A reward of NaN from the environment: one line naming the reward and the problem, or a counted skip
    with a finite loss."""
    real = rise.Env.score
    monkeypatch.setattr(rise.Env, "score", lambda self, p, text: math.nan if p.id == PROBLEMS[1].id
                        else real(self, p, text))
    model, tok = models.load("tiny-random")
    tr = make_trainer(model, tok, tmp_path, nan_rewards=policy, max_steps=1, beta=0.0, max_new_tokens=4,
                      per_device_train_batch_size=2)
    tr.train_dataset = [{"index": 0}, {"index": 1}]
    if policy == "raise":
        with pytest.raises(ValueError, match=rf"^reward verify is nan for problem {PROBLEMS[1].id} "):
            tr.train()
        return
    tr.train()
    log = [h for h in tr.state.log_history if "loss" in h][0]
    assert math.isfinite(log["loss"]) and log["nonfinite_rewards"] == 4 * 2  # G episodes x T = 2 turns, all wrong


def test_turn_advantages_bad_options():
    with pytest.raises(ValueError, match=r"^advantage must be one of rloo, grpo, got 'ppo'$"):
        retry.turn_advantages([[1.0], [0.0]], "ppo")
    with pytest.raises(ValueError, match=r"^credit must be one of turn, return, got 'x'$"):
        retry.turn_advantages([[1.0], [0.0]], credit="x")
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        retry.turn_advantages([[1.0], [0.0]], credit="return", gamma=2.0)


# ----------------------------------------------------------------------------------------------------------
# (c) training: logs, the per-turn layout gives the same update, resume is exact
# ----------------------------------------------------------------------------------------------------------


def make_trainer(model, tok, out, **kw):
    args = dict(output_dir=str(out), num_generations=4, max_turns=2, max_new_tokens=32, per_device_train_batch_size=3,
                learning_rate=1e-3, max_steps=2, logging_steps=1, save_strategy="no", report_to="none", seed=1,
                beta=0.05)
    args.update(kw)
    return RetryTrainer(model=model, args=RetryConfig(**args), train_dataset=PROBLEMS, processing_class=tok)


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_tree_and_turns_layouts_give_the_same_update(tmp_path):
    got = {}
    for layout in ("tree", "turns"):
        model, tok = load64()
        start = params(model)
        tr = make_trainer(model, tok, tmp_path / layout, layout=layout, max_steps=1, gradient_accumulation_steps=2)
        tr.train()
        got[layout] = (params(model), [h for h in tr.state.log_history if "loss" in h][0])
        assert got[layout][1]["advantage_abs"] > 0 and not torch.equal(start, got[layout][0])
    assert (got["tree"][0] - got["turns"][0]).abs().max().item() <= 1e-9
    a, b = got["tree"][1], got["turns"][1]
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-9)
    assert a["tokens_forwarded"] < b["tokens_forwarded"] == b["tokens_per_turn_samples"]
    for key in ("reward/turn1", "accuracy/turn1", "solved_by_turn2", "kl", "tokens_ratio", "attempts_per_episode"):
        assert key in a, key


def test_training_logs_and_resume_is_exact(tmp_path):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            control.should_training_stop = True

    def run(out, resume=None, crash=False):
        model, tok = models.load("testbed", dtype="float64", lora={"r": 4, "alpha": 8})
        tr = make_trainer(model, tok, out, max_steps=3, save_strategy="steps", save_steps=2)
        if crash:
            tr.add_callback(Crash())
        tr.train(resume_from_checkpoint=resume)
        return params(model), tr.state.log_history

    straight, logs = run(tmp_path / "a")
    logs = [h for h in logs if "loss" in h]
    assert sum(h["advantage_abs"] for h in logs) > 0
    assert len(logs) == 3 and all(h["kl"] >= 0 for h in logs) and all(h["tokens_ratio"] > 1 for h in logs)
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-12)  # step 1: the adapter is still the identity
    run(tmp_path / "b", crash=True)
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-2", "log.jsonl"]
    resumed, _ = run(tmp_path / "b", resume=True)
    assert torch.equal(straight, resumed)


# ----------------------------------------------------------------------------------------------------------
# (d) bad options: one line naming the option and the allowed values
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("history_reasoning", "hide", r"^history_reasoning must be one of strip, keep, got 'hide'$"),
    ("advantage", "ppo", r"^advantage must be one of rloo, grpo, got 'ppo'$"),
    ("credit", "episode", r"^credit must be one of turn, return, got 'episode'$"),
    ("loss_normalization", "seq", r"^loss_normalization must be one of tokens, attempts, got 'seq'$"),
    ("layout", "npass", r"^layout must be one of tree, turns, got 'npass'$"),
    ("attention", "fast", r"^attention must be one of auto, dense, sparse, flex, got 'fast'$"),
    ("num_generations", 1, r"^num_generations must be >= 2"),
    ("max_turns", 0, r"^max_turns must be >= 1, got 0$"),
    ("temperature", 0.0, r"^temperature must be > 0"),
    ("gamma", 1.5, r"^gamma must be in \[0, 1\], got 1.5$"),
    ("beta", -1.0, r"^beta must be >= 0, got -1.0$"),
])
def test_bad_config_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        RetryConfig(output_dir=str(tmp_path), **{field: value})


def test_cli_retry_bad_option_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from ponder.cli import app
    r = CliRunner().invoke(app, ["retry", "credit=episode", f"output_dir={tmp_path}"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "credit must be one of turn, return, got 'episode'" in lines[0]


# ----------------------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------------------


def test_cli_retry_writes_report_and_plot(tmp_path):
    from typer.testing import CliRunner

    from ponder.cli import app
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["retry", "-c", "configs/retry/testbed.yaml", f"output_dir={out}", "max_steps=1",
                                 "n_train=4", "n_eval=4", "eval_turns=2", "eval_parallel=2",
                                 "per_device_train_batch_size=2", "num_generations=2", "max_new_tokens=32"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["evals"]) == {"base", "trained"}
    for name in ("base", "trained"):
        assert len(m["evals"][name]["accuracy_by_turn"]) == 2 and "m1@t1" in m["evals"][name]
    text = (out / "report.md").read_text()
    assert "m1@t1" in text and "accuracy_by_turn.png" in text and (out / "accuracy_by_turn.png").exists()


def test_rollouts_run_in_the_configs_rollout_dtype(tmp_path, monkeypatch):
    from ponder import rollout
    model, tok = models.load("tiny-random")
    seen, real = [], rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda *a, **kw: seen.append(kw.get("dtype")) or real(*a, **kw))
    make_trainer(model, tok, tmp_path, rollout_dtype="bfloat16", max_steps=1).train()
    assert seen and set(seen) == {"bfloat16"}
