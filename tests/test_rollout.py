"""Sampling: greedy equals a plain no-cache argmax loop; stop strings, finish reasons, seeds; the lean decode
loop against HF generate (every Sample field), its sampling distribution against the model's softmax."""

import copy
from collections import Counter

import pytest
import torch
from scipy import stats

from ponder import chat, decode, rollout


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


# ----------------------------------------------------------------------------------------------------------
# Backends: the lean decode loop (ponder.decode) against HF generate
# ----------------------------------------------------------------------------------------------------------

def fields(rows):
    return [[(s.prompt_index, s.prompt_ids, s.ids, s.text, s.finish_reason, s.stop_index, s.stop) for s in r]
            for r in rows]


@pytest.fixture(scope="module")
def lively():
    """tiny-random with larger weights: varied greedy continuations (the default init repeats one token)."""
    from ponder import models
    return models.load("tiny-random", config_overrides={"initializer_range": 0.2})


PROMPTS = ["1+1=?", "a much longer question that forces left padding on the others", "x", "What is 17+23*4?"]


@pytest.fixture(params=["packed", "unpacked"])
def packing(request, monkeypatch):
    """Decode steps with packed projections (`decode.step_linear`) and without, whatever the batch's size."""
    monkeypatch.setattr(decode, "PACK_MIN_TOKENS", 0 if request.param == "packed" else 10 ** 9)
    calls = []
    real = decode.step_linear
    monkeypatch.setattr(decode, "step_linear", lambda m, rows: calls.append(m) or real(m, rows))
    yield request.param
    assert bool(calls) == (request.param == "packed")


@pytest.mark.parametrize("backend", ["generate", "lean"])
def test_greedy_matches_no_cache_reference(lively, backend):
    model, tok = lively
    got = rollout.sample(model, tok, PROMPTS[:3], temperature=0.0, max_new_tokens=12, progress=False,
                         suppress_eos=True, backend=backend)
    for p, row in zip(PROMPTS, got):
        assert row[0].ids == argmax_loop(model, chat.generation_prompt(tok, [{"role": "user", "content": p}]), 12)


def test_lean_greedy_identical_to_generate(lively, packing):
    model, tok = lively
    kw = dict(temperature=0.0, max_new_tokens=16, progress=False, suppress_eos=True, batch_size=3)
    assert fields(rollout.sample(model, tok, PROMPTS, backend="lean", **kw)) == \
        fields(rollout.sample(model, tok, PROMPTS, backend="generate", **kw))


def test_lean_greedy_identical_to_generate_on_the_testbed(packing):
    from ponder import models
    model, tok = models.load("testbed")
    qs = [f"What is {17 + i}+{23 * i}*{i % 7 + 2}?" for i in range(12)]
    kw = dict(temperature=0.0, max_new_tokens=40, progress=False, batch_size=12)
    lean, gen = (rollout.sample(model, tok, qs, backend=b, **kw) for b in ("lean", "generate"))
    assert fields(lean) == fields(gen)
    assert "eos" in {r[0].finish_reason for r in gen}  # the testbed ends its turns: eos handling is exercised


def test_lean_finish_reasons_and_compaction_match_generate(lively, packing):
    """Rows end at different steps (an extra eos id, a stop string, the length cap): every Sample field equals
    `generate`'s, including the rows decoded after the batch was compacted."""
    model, tok = lively
    prompts = PROMPTS + [f"question {i} " * i for i in range(8)]
    free = rollout.sample(model, tok, prompts, temperature=0.0, max_new_tokens=30, progress=False,
                          suppress_eos=True, backend="generate")
    rows = [r[0].ids for r in free]
    # an extra end id that ends about half of the rows, a stop string from a row it does not end
    eos_tok = min({t for r in rows for t in r}, key=lambda t: abs(sum(t in r for r in rows) - len(rows) / 2))
    other = next(r[0] for r in free if eos_tok not in r[0].ids)
    stop = other.text[8:11]
    m = copy.deepcopy(model)
    m.generation_config.eos_token_id = [eos_tok, *rollout.stop_ids(model, tok)]
    kw = dict(temperature=0.0, max_new_tokens=30, progress=False, stop=[stop, "NEVER"], batch_size=16)
    lean, gen = (rollout.sample(m, tok, prompts, backend=b, **kw) for b in ("lean", "generate"))
    assert fields(lean) == fields(gen)
    reasons = [r[0].finish_reason for r in gen]
    assert {"eos", "stop"} <= set(reasons) and 2 * reasons.count("eos") >= len(rows)  # compaction happened


def test_lean_stop_string_cut_exactly(lively):
    model, tok = lively
    full = rollout.sample(model, tok, ["stop test"], temperature=0.0, max_new_tokens=30, progress=False,
                          suppress_eos=True, backend="lean")[0][0]
    stop = full.text[10:13]
    s = rollout.sample(model, tok, ["stop test"], temperature=0.0, max_new_tokens=30, progress=False,
                       suppress_eos=True, stop=[stop], backend="lean")[0][0]
    assert (s.finish_reason, s.stop, s.text) == ("stop", stop, full.text[:full.text.find(stop)])
    assert s.ids == full.ids[:s.stop_index] and tok.decode(s.ids) == s.text


def test_lean_sampling_seeded(lively):
    model, tok = lively
    kw = dict(n=3, max_new_tokens=10, progress=False, backend="lean", top_k=20, top_p=0.9, temperature=0.8)
    a, b, c = (rollout.sample(model, tok, ["q1", "q2"], seed=s, **kw) for s in (7, 7, 8))
    assert fields(a) == fields(b) and fields(a) != fields(c)
    assert [len(r) for r in a] == [3, 3] and all(s.prompt_index == i for i, r in enumerate(a) for s in r)


@pytest.mark.parametrize("backend", ["generate", "lean"])
def test_greedy_independent_of_batch_size_and_n(lively, backend):
    model, tok = lively
    prompts = [f"prompt number {i} " * (i + 1) for i in range(5)]
    kw = dict(temperature=0.0, max_new_tokens=8, progress=False, suppress_eos=True, backend=backend)
    one = [r[0].ids for r in rollout.sample(model, tok, prompts, batch_size=1, **kw)]
    for bs in (2, 64):
        assert [r[0].ids for r in rollout.sample(model, tok, prompts, batch_size=bs, **kw)] == one
    # n copies of a prompt share their prefill in the lean loop: every copy is the n=1 greedy result
    assert all([s.ids for s in r] == [ids] * 3
               for r, ids in zip(rollout.sample(model, tok, prompts, n=3, batch_size=64, **kw), one))


def test_lean_greedy_with_lora_matches_generate(lively, packing):
    from ponder import models
    _, tok = lively
    model, _ = models.load("tiny-random", lora={"r": 4, "init_lora_weights": False},
                           config_overrides={"initializer_range": 0.2})
    kw = dict(temperature=0.0, max_new_tokens=12, progress=False, suppress_eos=True)
    assert fields(rollout.sample(model, tok, PROMPTS, backend="lean", **kw)) == \
        fields(rollout.sample(model, tok, PROMPTS, backend="generate", **kw))


SYSTEM = {"role": "system", "content": "You are a careful assistant. Think step by step, then answer briefly."}


def test_shared_prefix_rule():
    """Hand cases: the longest common prefix, capped one token short of the shortest prompt, kept only where
    it saves SHARED_PREFIX_MIN_SAVED prefill tokens."""
    big = decode.SHARED_PREFIX_MIN_SAVED
    assert decode.shared_prefix([[1] * 100]) == 0                          # one prompt: nothing shared
    assert decode.shared_prefix([[1] * 40 + [2], [1] * 40 + [3]]) == 40
    assert decode.shared_prefix([[1] * 40, [1] * 40 + [3]]) == 39         # the shorter keeps its last token
    assert decode.shared_prefix([[7] + [1] * 40, [1] * 41]) == 0           # differ at the first token
    assert decode.shared_prefix([[1] * (big - 1) + [2], [1] * (big - 1) + [3]]) == 0   # saves < big tokens
    assert decode.shared_prefix([[1] * 9 + [k] for k in range(2 + big // 9)]) == 9    # 9 x (rows - 1) >= big


def test_shared_prefix_prefilled_once_with_the_no_cache_reference_ids(lively, packing, monkeypatch):
    """Prompts behind one system prompt: the prefix is prefilled by a 1-row forward (spied) and every greedy
    row equals the no-cache argmax loop (independent reference) and the lean loop without sharing."""
    model, tok = lively
    msgs = [[SYSTEM, {"role": "user", "content": p}] for p in PROMPTS]
    ids = [chat.generation_prompt(tok, m) for m in msgs]
    n = decode.shared_prefix(ids)
    assert n > 10
    calls = []
    real = decode.Decoder.forward
    monkeypatch.setattr(decode.Decoder, "forward", lambda self, x, *a: calls.append(tuple(x.shape)) or real(self, x, *a))
    kw = dict(temperature=0.0, max_new_tokens=10, progress=False, suppress_eos=True, backend="lean")
    got = [r[0].ids for r in rollout.sample(model, tok, msgs, **kw)]
    assert calls[:2] == [(1, n), (len(PROMPTS), max(map(len, ids)) - n)]
    assert got == [argmax_loop(model, p, 10) for p in ids]
    monkeypatch.setattr(decode, "SHARED_PREFIX_MIN_SAVED", 10 ** 9)
    calls.clear()
    assert [r[0].ids for r in rollout.sample(model, tok, msgs, **kw)] == got
    assert calls[0] == (len(PROMPTS), max(map(len, ids)))  # one prefill of the whole prompts


def test_shared_prefix_with_one_token_passes(lively, packing):
    """The shared-prefix prefill when one of its passes is a single token: 33 prompts sharing only their first
    token (a 1-token prefix pass, then ragged rests), and prompts differing only in their last token (a 1-token
    pass for the rests). Every greedy row equals the no-cache argmax loop."""
    model, tok = lively
    ragged = [[5] + [10 + (3 * i + j) % 90 for j in range(1 + i % 4)] for i in range(33)]
    last = [[7, 8, 9] * 12 + [20 + i] for i in range(4)]
    for prompts, shared in ((ragged, 1), (last, 36)):
        assert decode.shared_prefix(prompts) == shared
        got = rollout.sample(model, tok, prompts, temperature=0.0, max_new_tokens=6, progress=False,
                             suppress_eos=True, backend="lean", batch_size=64)
        assert [r[0].ids for r in got] == [argmax_loop(model, p, 6) for p in prompts]


def test_step_linear_packs_cpu_projections(monkeypatch):
    """Decode steps run plain fp32/bf16 CPU Linears from a packed weight: equal to F.linear to rounding, bias
    included; a LoRA projection equals PEFT's own forward; fp64, DoRA and a build
    whose oneDNN cannot pack are left as they are (the module itself)."""
    from peft import LoraConfig, get_peft_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 24, generator=g)
    assert decode._packing_works(torch.float32)  # x86 and ARM torch builds pack fp32: the test is not vacuous
    for dtype, bias in [(torch.float32, True), (torch.bfloat16, False), (torch.float32, False)]:
        lin = torch.nn.Linear(24, 40, bias=bias).to(dtype)
        step = decode.step_linear(lin, 5)
        assert (step is not lin) == decode._packing_works(dtype)  # bf16 packs where oneDNN has a bf16 path
        ref = torch.nn.functional.linear(x.to(dtype), lin.weight, lin.bias)
        if dtype == torch.bfloat16:  # F.linear may take another bf16 kernel: equal to bf16 rounding
            torch.testing.assert_close(step(x.to(dtype)), ref, rtol=1.6e-2, atol=1e-2)
        else:
            torch.testing.assert_close(step(x), ref, rtol=1e-5, atol=1e-6)
    fp64 = torch.nn.Linear(24, 40).double()
    assert decode.step_linear(fp64, 5) is fp64
    with monkeypatch.context() as m:  # a torch build whose oneDNN cannot pack: the module as it is
        m.setattr(decode, "_packing_works", lambda dtype: False)
        assert decode.step_linear(lin, 5) is lin

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(24, 40)
    for dora in (False, True):
        net = get_peft_model(Net(), LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False, use_dora=dora))
        net.eval()
        module = net.base_model.model.proj
        step = decode.step_linear(module, 5)
        if dora:
            assert step is module
        else:
            assert step is not module
            torch.testing.assert_close(step(x), module(x), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(module(x), module.base_layer(x), atol=1e-3)  # the adapter matters


def test_bf16_decode_keeps_an_fp32_cache_and_matches_the_full_forward(lively, packing):
    """A bf16 model decodes over an fp32 KV cache with fp32 scores: every step's logits match the bf16 model's
    own full forward (HF, no cache) over the same ids to bf16 rounding; a wrong key, position or mask would
    be off by O(1)."""
    model = copy.deepcopy(lively[0]).to(torch.bfloat16)
    tok = lively[1]
    prompts = [chat.generation_prompt(tok, [SYSTEM, {"role": "user", "content": p}]) for p in PROMPTS]
    assert decode.Decoder(model, 1, 4).cache_dtype == torch.float32
    seen = []

    def greedy(logits):
        seen.append(logits.float())
        return logits.float().argmax(-1)
    with torch.no_grad():
        out = decode.decode(model, prompts, 8, pad=0, eos=set(), next_token=greedy)
        for r, (p, row) in enumerate(zip(prompts, out)):
            full = model(torch.tensor([p + row])).logits[0, len(p) - 1:-1].float()
            mine = torch.stack([s[r] for s in seen])
            scale = full.abs().max()
            assert (mine - full).abs().max() < 0.03 * scale  # measured 1.1-1.3%; a position off by one: 110%


def test_filtered_logits_equal_transformers_warpers():
    """Independent reference: transformers' own temperature / top-k / top-p warpers, in generate's order."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    for t, k, p in [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.5, 5, 0.6), (1.0, 50, 0.95)]:
        ref = logits.clone()
        if t != 1.0:
            ref = TemperatureLogitsWarper(t)(None, ref)
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1.0:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(decode.filtered_logits(logits, t, k, p), ref)


def _first_token_counts(model, tok, prompt, n, **kw):
    rows = rollout.sample(model, tok, [prompt], n=n, max_new_tokens=1, suppress_eos=True, progress=False,
                          backend="lean", batch_size=n, **kw)[0]
    return Counter(s.ids[0] if s.ids else -1 for s in rows)


def _chi2_pvalue(counts: Counter, probs: torch.Tensor, n: int) -> float:
    """Chi-square goodness of fit, tokens with expected count < 5 pooled into one cell."""
    exp = probs.double() * n
    big = (exp >= 5).nonzero().flatten().tolist()
    obs = [counts.get(i, 0) for i in big]
    e = [float(exp[i]) for i in big]
    rest_o, rest_e = n - sum(obs), n - sum(e)
    if rest_e >= 1e-9:
        obs.append(rest_o)
        e.append(rest_e)
    else:
        assert rest_o == 0, "a token with probability 0 was sampled"
    return float(stats.chisquare(obs, e).pvalue)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 12, 1.0), (1.5, 0, 0.7)])
def test_lean_sampling_distribution_is_the_models_softmax(temperature, top_k, top_p):
    """4000 first tokens from one prompt against the model's next-token softmax, filtered in fp64 by hand
    (sorted cumulative probabilities); fixed seed, so the p-value is a fixed number. The same counts against
    the unfiltered (or untempered) softmax are rejected: the test has power."""
    from ponder import models
    model, tok = models.load("tiny-random", config_overrides={"initializer_range": 0.4})  # a peaked softmax
    prompt = "the distribution test"
    ids = chat.generation_prompt(tok, [{"role": "user", "content": prompt}])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double()
    p = (logits / temperature).softmax(-1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k:
        keep &= p >= p.sort(descending=True).values[top_k - 1]
    if top_p < 1.0:
        sp, order = p.sort(descending=True)
        before = sp.cumsum(0) - sp                  # mass of the strictly more likely tokens
        keep &= torch.zeros_like(keep).scatter(0, order, before < top_p)
    expected = torch.where(keep, p, 0.0)
    expected /= expected.sum()
    n = 4000
    counts = _first_token_counts(model, tok, prompt, n, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    assert _chi2_pvalue(counts, expected, n) > 1e-3
    wrong = logits.softmax(-1) if (top_k or top_p < 1.0 or temperature != 1.0) else (logits / 0.5).softmax(-1)
    assert _chi2_pvalue(counts, wrong, n) < 1e-6


def test_backend_choice():
    from transformers import GPT2Config, GPT2LMHeadModel

    from ponder import models
    tiny_model, _ = models.load("tiny-random")
    assert rollout.resolve_backend("auto", tiny_model) == "lean"  # CPU + Llama-shaped: measured faster
    assert rollout.resolve_backend("auto", tiny_model, batch=16) == "lean"
    assert rollout.resolve_backend("auto", tiny_model, batch=4) == "generate"  # small batches: generate measured faster
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert rollout.resolve_backend("auto", gpt2) == "generate"
    with pytest.raises(ValueError, match="lean' cannot run this model: model type 'gpt2'"):
        rollout.resolve_backend("lean", gpt2)
    with pytest.raises(ValueError, match="rollout_backend must be one of auto, generate, lean, vllm, vllm-server, got 'fast'"):
        rollout.check_backend("fast")


def bf16_by_hand(model):
    """Independent reference for `rollout.sampling_copy`: a fresh deep copy with every parameter cast."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.data = p.data.to(torch.bfloat16)
    return ref


@pytest.mark.parametrize("backend", ["generate", "lean"])
def test_bf16_rollouts_sample_from_a_bf16_copy_of_the_current_weights(lively, backend):
    """dtype=bfloat16 samples exactly what a hand-cast bf16 copy samples, after a weight update too (the kept
    copy is refreshed, not stale), and leaves the trained model in fp32."""
    model, tok = copy.deepcopy(lively[0]), lively[1]
    kw = dict(temperature=1.0, max_new_tokens=12, progress=False, seed=3, n=2, backend=backend)
    ids = lambda out: [[s.ids for s in row] for row in out]  # noqa: E731
    got = ids(rollout.sample(model, tok, PROMPTS, dtype="bfloat16", **kw))
    assert got == ids(rollout.sample(bf16_by_hand(model), tok, PROMPTS, **kw))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    shadow = rollout.sampling_copy(model, torch.bfloat16)
    assert shadow is rollout.sampling_copy(model, torch.bfloat16)  # kept, not rebuilt
    assert {p.dtype for p in shadow.parameters()} == {torch.bfloat16}
    assert all(b.dtype == c.dtype for b, c in zip(shadow.buffers(), model.buffers()))  # rotary stays fp32
    with torch.no_grad():  # an "RL step"
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    after = ids(rollout.sample(model, tok, PROMPTS, dtype="bfloat16", **kw))
    assert after == ids(rollout.sample(bf16_by_hand(model), tok, PROMPTS, **kw))
    assert after != got
    model.resize_token_embeddings(model.config.vocab_size + 8)  # new tag tokens: a new copy, not a failed refresh
    assert ids(rollout.sample(model, tok, PROMPTS, dtype="bfloat16", **kw)) == \
        ids(rollout.sample(bf16_by_hand(model), tok, PROMPTS, **kw))
    # float32 on an fp32 model is the model itself
    assert rollout.sampling_copy(model, torch.float32) is model


def test_rollout_dtype_resolution_and_refusals():
    assert rollout.resolve_dtype("auto", "auto", trains_in_bf16=True) == "bfloat16"
    assert rollout.resolve_dtype("auto", "lean", trains_in_bf16=True) == "bfloat16"
    assert rollout.resolve_dtype("auto", "vllm", trains_in_bf16=True) == "float32"  # the engine's push check
    assert rollout.resolve_dtype("auto", "lean", trains_in_bf16=False) == "float32"
    assert rollout.resolve_dtype("bfloat16", "generate", trains_in_bf16=False) == "bfloat16"
    with pytest.raises(ValueError, match="rollout_dtype must be one of auto, float32, bfloat16"):
        rollout.check_dtype("fp16")
    with pytest.raises(ValueError, match="not 'vllm-server'"):
        rollout.check_dtype("bfloat16", "vllm-server")


def test_dtype_auto_gives_bf16_rollouts_where_bf16_training_pays(monkeypatch, tmp_path):
    """One knob: `dtype: auto` trains under bf16 autocast where it pays, and its rollouts follow."""
    from ponder import runtime
    from ponder.trainers.latro import LaTROConfig
    for pays in (False, True):
        monkeypatch.setattr(runtime, "bf16_pays", lambda m=None, pays=pays: pays)
        cfg = LaTROConfig(output_dir=str(tmp_path), dtype="auto", report_to="none")
        assert cfg.rollout_dtype == ("bfloat16" if pays else "float32")
        assert LaTROConfig(output_dir=str(tmp_path), dtype="auto", report_to="none",
                           rollout_dtype="float32").rollout_dtype == "float32"
