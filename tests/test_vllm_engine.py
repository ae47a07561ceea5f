"""The vllm rollout backend without vLLM: a fake `LLM` that decodes with its OWN copy of the weights (updated
only through ``collective_rpc("reload_weights")``, as the real engine) and vLLM's stopping semantics (token ids end with the token
that finished the request). Checks the sampling-params mapping, batching and seeds, the conversion into
Samples (equal to the generate backend, field by field), the weight push (PEFT merged, names as the
checkpoint's) and that samples after an optimizer step come from the updated weights."""

import copy
from types import SimpleNamespace

import pytest
import torch

from ponder import chat, decode, models, rollout, vllm_engine
from ponder.vllm_engine import Sampling, VLLMEngine


class FakeSamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.kw = kw


class FakeLLM:
    """vLLM's `LLM` surface used by VLLMEngine, decoding greedily or by seeded sampling with `ponder.decode` on
    a private copy of a model; `tok` detokenizes for stop strings (vLLM checks the generated text)."""

    def __init__(self, model, tok):
        self.model, self.tok = copy.deepcopy(model).eval(), tok
        self.params = self.model.state_dict()
        self.loaded: list[str] = []
        self.resets = 0
        self.rpcs = 0
        self.calls: list[tuple[list, list]] = []

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights"
        self.rpcs += 1
        with torch.no_grad():
            for name, t in kwargs["weights_iterator"]:
                assert name in self.params, f"vLLM would not know {name!r}"
                self.params[name].copy_(t)
                self.loaded.append(name)

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, sampling_params, use_tqdm=False):
        if getattr(sampling_params[0], "prompt_logprobs", None) is not None:  # the push's probe
            ids = prompts[0]["prompt_token_ids"]
            with torch.no_grad():
                lp = self.model(torch.tensor([ids])).logits[0].log_softmax(-1)
            rows = [None] + [{t: SimpleNamespace(logprob=float(lp[i, t]))} for i, t in enumerate(ids[1:])]
            return [SimpleNamespace(prompt_logprobs=rows)]
        self.calls.append((prompts, sampling_params))
        outs = []
        for pr, sp in zip(prompts, sampling_params):
            gen = torch.Generator().manual_seed(sp.seed)

            def pick(logits, sp=sp, gen=gen):
                if sp.temperature == 0:
                    return logits.argmax(-1)
                probs = decode.filtered_logits(logits, sp.temperature, max(sp.top_k, 0), sp.top_p).softmax(-1)
                return torch.multinomial(probs, 1, generator=gen)[:, 0]
            stops = sp.stop or []

            def hit(rows, stops=stops):
                return [any(s in self.tok.decode(r) for s in stops) for r in rows]
            with torch.no_grad():
                ids = decode.decode(self.model, [pr["prompt_token_ids"]], sp.max_tokens, 0,
                                    set(sp.stop_token_ids), pick, hit if stops else None)[0]
            text = self.tok.decode(ids)
            done = len(ids) < sp.max_tokens or (ids and ids[-1] in sp.stop_token_ids) or any(s in text for s in stops)
            reason = next((s for s in stops if s in text), ids[-1] if ids and ids[-1] in sp.stop_token_ids else None)
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tuple(ids), text=text,
                                                                 finish_reason="stop" if done else "length",
                                                                 stop_reason=reason)]))
        return outs


@pytest.fixture
def lively():
    return models.load("tiny-random", config_overrides={"initializer_range": 0.2})


@pytest.fixture
def fake(lively):
    model, tok = lively
    llm = FakeLLM(model, tok)
    vllm_engine.set_engine(VLLMEngine(llm, FakeSamplingParams))
    yield llm
    vllm_engine.set_engine(None)


def fields(rows):
    return [[(s.prompt_index, s.prompt_ids, s.ids, s.text, s.finish_reason, s.stop_index, s.stop) for s in r]
            for r in rows]


PROMPTS = ["1+1=?", "a much longer question that forces left padding on the others", "x", "What is 17+23*4?"]


def test_sampling_params_mapping():
    sp = vllm_engine.sampling_params(Sampling(32, 0.0, 0.9, 5, ["The answer is"], [2, 7]), 11, FakeSamplingParams)
    assert sp.kw == dict(n=1, max_tokens=32, temperature=0.0, seed=11, stop=["The answer is"], stop_token_ids=[2, 7],
                         ignore_eos=False, skip_special_tokens=False, spaces_between_special_tokens=False,
                         include_stop_str_in_output=True)  # greedy: no top-p / top-k (vLLM forces them)
    sp = vllm_engine.sampling_params(Sampling(8, 0.7, 0.9, 0, (), (), True), 3, FakeSamplingParams)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.stop, sp.stop_token_ids, sp.ignore_eos) == \
        (0.7, 0.9, -1, None, [], True)  # top_k 0 (all tokens) is vLLM's -1; suppress_eos: no stop ids at all
    assert vllm_engine.sampling_params(Sampling(8, 1.0, 1.0, 20), 3, FakeSamplingParams).top_k == 20


def test_greedy_samples_equal_generate_backend(lively, fake):
    """Result conversion: eos (kept in ids), stop strings (cut at the exact character, the token where the stop
    begins dropped), length — identical Samples to the generate backend, from one batched engine call."""
    model, tok = lively
    free = rollout.sample(model, tok, PROMPTS[1:2], temperature=0.0, max_new_tokens=30, suppress_eos=True,
                          progress=False, backend="generate")[0][0]
    m = copy.deepcopy(model)
    m.generation_config.eos_token_id = [free.ids[12], *rollout.stop_ids(model, tok)]
    fake.model.generation_config = m.generation_config
    stop = [free.text[3:6], "NEVER"]
    reasons = set()
    for kw in (dict(stop=stop), dict(suppress_eos=True), dict(stop=stop, n=2)):
        args = dict(temperature=0.0, max_new_tokens=30, progress=False, **kw)
        got = rollout.sample(m, tok, PROMPTS, backend="vllm", **args)
        assert fields(got) == fields(rollout.sample(m, tok, PROMPTS, backend="generate", **args))
        reasons |= {s.finish_reason for r in got for s in r}
    assert reasons == {"stop", "eos", "length"}
    prompts, sps = fake.calls[-1]
    assert len(prompts) == len(PROMPTS) * 2 and all(sp.n == 1 for sp in sps)  # one request per sample


def test_seeds_per_sample_and_deterministic(lively, fake):
    model, tok = lively
    kw = dict(n=3, max_new_tokens=8, temperature=1.0, progress=False, backend="vllm")
    a = rollout.sample(model, tok, PROMPTS[:2], seed=5, **kw)
    seeds = [sp.seed for sp in fake.calls[-1][1]]
    b = rollout.sample(model, tok, PROMPTS[:2], seed=5, batch_size=1, **kw)
    c = rollout.sample(model, tok, PROMPTS[:2], seed=6, **kw)
    assert len(set(seeds)) == 6
    assert fields(a) == fields(b) and fields(a) != fields(c)  # batch size plays no part: seeds are per sample
    assert [[s.prompt_index for s in r] for r in a] == [[0, 0, 0], [1, 1, 1]]


def test_weights_pushed_once_per_change_and_used(lively, fake):
    """The engine starts with its own copy; a push happens before the first samples and after every optimizer
    step, never twice for the same weights; after a step, samples come from the updated weights."""
    model, tok = lively
    kw = dict(temperature=0.0, max_new_tokens=12, suppress_eos=True, progress=False)
    engine = vllm_engine.engine_for(model)
    before = rollout.sample(model, tok, PROMPTS, backend="vllm", **kw)
    assert engine.pushes == 1 and fake.resets == 1
    rollout.sample(model, tok, PROMPTS, backend="vllm", **kw)
    assert engine.pushes == 1  # unchanged weights: no second push
    # one optimizer step that certainly changes greedy outputs: push up the logit of a token nobody emits
    target = 13
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    ids = chat.generation_prompt(tok, [{"role": "user", "content": PROMPTS[0]}])
    loss = -model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)[target]
    loss.backward()
    opt.step()
    after = rollout.sample(model, tok, PROMPTS, backend="vllm", **kw)
    assert engine.pushes == 2 and fake.resets == 2
    assert fields(after) != fields(before)
    assert fields(after) == fields(rollout.sample(model, tok, PROMPTS, backend="generate", **kw))
    assert after[0][0].ids[0] == target


def test_peft_pushed_merged_under_base_names(fake):
    model, tok = models.load("tiny-random", lora={"r": 4, "init_lora_weights": False, "trainable_token_indices": [5]},
                             config_overrides={"initializer_range": 0.2})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(0.5)
    engine = VLLMEngine(fake, FakeSamplingParams)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pushed = engine.sync_weights(model)
    base = [n for n, _ in model.get_base_model().named_parameters()]
    ref = copy.deepcopy(model).merge_and_unload().state_dict()
    assert "lm_head.weight" in ref  # tied to the embedding: pushed too (the full state, in one call)
    assert set(fake.loaded) == set(ref) and pushed == len(ref) and fake.rpcs == 1 and len(base) > len(ref)
    assert all(torch.equal(fake.params[n], ref[n]) for n in ref)
    # the trainer's weights come back bit for bit (merge + unmerge alone would leave rounding drift)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the adapter is unmerged again: the model still computes base + LoRA, not base + 2 LoRA
    kw = dict(temperature=0.0, max_new_tokens=10, suppress_eos=True, progress=False)
    vllm_engine.set_engine(engine)
    assert fields(rollout.sample(model, tok, PROMPTS, backend="vllm", **kw)) == \
        fields(rollout.sample(model, tok, PROMPTS, backend="generate", **kw))


def test_fingerprint_tracks_in_place_updates(lively):
    model, _ = lively
    f0 = vllm_engine.fingerprint(model)
    assert vllm_engine.fingerprint(model) == f0
    with torch.no_grad():
        next(model.parameters()).mul_(1.0)
    f1 = vllm_engine.fingerprint(model)
    assert f1 != f0
    # fused AdamW (transformers' default optim) does not bump version counters: the content hash sees the step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    versions = [p._version for p in model.parameters()]
    opt.step()
    assert [p._version for p in model.parameters()] == versions and vllm_engine.fingerprint(model) != f1


def test_vllm_unavailable_fails_in_one_line(monkeypatch):
    """Without vLLM installed, or on a CPU without the instructions its kernels need, selecting the backend fails
    at config time, in one line (both cases simulated: this machine may well run vLLM)."""
    real_find = vllm_engine.importlib.util.find_spec
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real_find(n, *a))
    with pytest.raises(vllm_engine.BackendUnavailable) as e:
        rollout.check_backend("vllm")
    assert "\n" not in str(e.value) and "rollout backend 'vllm' needs vLLM: install the vllm extra" in str(e.value)
    from ponder.trainers.latro import LaTROConfig
    with pytest.raises(ValueError, match="rollout backend 'vllm' needs"):
        LaTROConfig(output_dir="/tmp/unused", rollout_backend="vllm")
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda n, *a: object())
    monkeypatch.setattr(vllm_engine, "_cpu_build", lambda: True)
    monkeypatch.setattr(vllm_engine.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert vllm_engine.unavailable_reason() == ("rollout backend 'vllm' on a CPU needs AVX2 or AVX-512 (vLLM's CPU "
                                                "kernels) and this CPU has DEFAULT; use rollout_backend=auto")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert vllm_engine.unavailable_reason() is None


def test_failed_push_leaves_engine_refusing(lively, fake):
    """A push that raises half-way (the fake engine got some tensors) or that the probe finds wrong: EngineBroken,
    and sampling refuses until a later push passes its probe."""
    model, tok = lively
    engine = vllm_engine.current()
    kw = dict(temperature=0.0, max_new_tokens=8, suppress_eos=True, progress=False, backend="vllm")
    rollout.sample(model, tok, PROMPTS, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.2)
    real = fake.collective_rpc

    def half(method, kwargs):
        items = list(kwargs["weights_iterator"])
        real(method, {"weights_iterator": iter(items[: len(items) // 2])})
        raise RuntimeError("connection reset")
    fake.collective_rpc = half
    with pytest.raises(vllm_engine.EngineBroken, match="connection reset"):
        rollout.sample(model, tok, PROMPTS, **kw)
    with pytest.raises(vllm_engine.EngineBroken, match="refuses to sample"):
        engine.generate([[1, 2]], Sampling(4, 0.0), [0])
    fake.collective_rpc = lambda method, kwargs: real(method, {"weights_iterator": iter(
        [(n, t + 1.0 if n.endswith("norm.weight") else t) for n, t in kwargs["weights_iterator"]])})
    with pytest.raises(vllm_engine.EngineBroken, match="log-probs differ from the trainer's"):
        rollout.sample(model, tok, PROMPTS, **kw)
    with pytest.raises(vllm_engine.EngineBroken):
        engine.generate([[1, 2]], Sampling(4, 0.0), [0])
    fake.collective_rpc = real
    ref = rollout.sample(model, tok, PROMPTS, **{**kw, "backend": "generate"})
    assert fields(rollout.sample(model, tok, PROMPTS, **kw)) == fields(ref) and engine.broken is None


def test_kv_cache_size_setting(monkeypatch):
    """PONDER_VLLM_KV_CACHE_GB sets it; on a CPU the default is an eighth of the available memory, 1-4 GiB (vLLM's
    own CPU default reserves most of the machine); a bad value is one line."""
    monkeypatch.setenv("PONDER_VLLM_KV_CACHE_GB", "1.5")
    assert vllm_engine.kv_cache_bytes() == int(1.5 * 2 ** 30)
    for bad in ("0", "-2", "lots"):
        monkeypatch.setenv("PONDER_VLLM_KV_CACHE_GB", bad)
        with pytest.raises(vllm_engine.BackendUnavailable, match=f"PONDER_VLLM_KV_CACHE_GB must be a positive "
                                                                  f"number of GiB, got '{bad}'"):
            vllm_engine.kv_cache_bytes()
    monkeypatch.delenv("PONDER_VLLM_KV_CACHE_GB")
    monkeypatch.setattr(vllm_engine, "_cpu_build", lambda: True)
    for avail_gib, want in ((4, 1), (24, 3), (200, 4)):
        monkeypatch.setattr(vllm_engine.os, "sysconf", lambda k, a=avail_gib: a * 2 ** 18 if k == "SC_AVPHYS_PAGES"
                            else 4096)
        assert vllm_engine.kv_cache_bytes() == want * 2 ** 30


def test_cpu_engines_take_whole_prefills_only(tmp_path):
    """On a CPU a prefill split over engine steps rewinds a seeded generator, which CPU generators cannot do (the
    real engine crashed on any sampled batch of more than 4096 prompt tokens; tests/test_vllm_real.py runs one):
    chunked prefill off and a step that holds the longest prompt, for the colocated engine and the server."""
    assert vllm_engine.step_settings(cpu=True, max_model_len=8192) == (8192, False)
    assert vllm_engine.step_settings(cpu=True, max_model_len=512) == (4096, False)
    assert vllm_engine.step_settings(cpu=False, max_model_len=8192) == (4096, True)
    from ponder import vllm_server
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 8192}')
    argv, _ = vllm_server.serve_command(str(tmp_path), cpu=True)
    assert "--no-enable-chunked-prefill" in argv and argv[argv.index("--max-num-batched-tokens") + 1] == "8192"
    argv, _ = vllm_server.serve_command(str(tmp_path), cpu=False, max_model_len=2048)
    assert "--no-enable-chunked-prefill" not in argv and argv[argv.index("--max-num-batched-tokens") + 1] == "4096"
