
import pytest
import torch

from ponder import models


def test_tiny_random_is_deterministic():
    a, tok = models.load("tiny-random", seed=3)
    b, _ = models.load("tiny-random", seed=3)
    c, _ = models.load("tiny-random", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.config.vocab_size == len(tok)


def test_dtype():
    m, _ = models.load("tiny-random", dtype="float64")
    assert next(m.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="unknown dtype"):
        models.load("tiny-random", dtype="float7")


@pytest.mark.parametrize("init", ["mean", "mean+noise", "<think>"])
def test_add_special_tokens(init):
    m, tok = models.load("tiny-random")
    old = m.get_input_embeddings().weight.detach().clone()
    tags = [f"<think{i}>" for i in range(1, 4)]
    m2, tok2 = models.load("tiny-random", add_tokens=tags, token_init=init)
    ids = tok2.convert_tokens_to_ids(tags)
    assert ids == list(range(len(tok), len(tok) + 3))
    assert tok2("<think2>x", add_special_tokens=False)["input_ids"][0] == ids[1]
    w = m2.get_input_embeddings().weight.detach()
    assert torch.equal(w[: len(tok)], old)
    if init == "mean":
        assert torch.allclose(w[ids[0]], old.mean(0)) and torch.equal(w[ids[0]], w[ids[2]])
    elif init == "mean+noise":
        assert not torch.equal(w[ids[0]], w[ids[1]])
        assert (w[ids[0]] - old.mean(0)).abs().max() < 0.01
    else:
        assert torch.equal(w[ids[0]], old[tok.convert_tokens_to_ids("<think>")])
    assert torch.equal(m2.lm_head.weight, m2.get_input_embeddings().weight)  # still tied


def test_bad_token_init():
    with pytest.raises(ValueError, match="token_init"):
        models.load("tiny-random", add_tokens=["<t1>"], token_init="<nope>")


def test_lora_trains_only_adapters():
    m, _ = models.load("tiny-random", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_unknown_spec_and_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotFound, match="unknown model spec 'smollm3'"):
        models.load("smollm3")
    with pytest.raises(models.ModelNotFound, match="not in the local Hugging Face cache and the hub is unreachable"):
        models.load("some-org/some-model-that-is-not-cached")


def test_local_directory_round_trip(tmp_path):
    m, tok = models.load("tiny-random")
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, tok2 = models.load(str(tmp_path))
    x = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(m(x).logits, m2(x).logits)
    assert tok2.chat_template == tok.chat_template


def test_smollm2_from_wheel(smol_dir):
    m, tok = models.load("smollm2-135m")
    assert m.config.num_hidden_layers == 30 and len(tok) == 49152
    assert sum(p.numel() for p in m.parameters()) == 134_515_008
    assert not getattr(m, "is_quantized", False)
    assert (smol_dir / "model.safetensors").exists()
    from ponder import rollout
    out = rollout.sample(m, tok, ["What is 12 + 7?"], temperature=0.0, max_new_tokens=8, progress=False)
    assert out[0][0].text.startswith("12 + 7 = ")  # the real pretrained model answers (wrongly: "= 9")
