"""SFT: the loss equals an independent per-example reference, is exact under gradient accumulation, and a
run resumed from a checkpoint ends with exactly the same weights as an uninterrupted one."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from ponder import chat, models
from ponder.trainers.sft import SFTConfig, SFTTrainer, encode, pad_collate

CONVS = [
    [{"role": "user", "content": "1+2*3=?"}, {"role": "assistant", "reasoning": "2*3=6. 1+6=7.",
                                               "content": "The answer is 7."}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "wrong", "weight": 0.5},
     {"role": "user", "content": "try again"}, {"role": "assistant", "content": "right one", "weight": 2.0}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello there"},
     {"role": "assistant", "content": "hi", "weight": 1.0}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning": "hidden later"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "reasoning": "shown"}],
]


def reference_losses(model, tok, convs):
    """Per trained message: (weight, mean CE over its trained tokens), from full logits + F.cross_entropy on
    the conversation truncated after that message (the 'one example per message' formulation)."""
    out = []
    for msgs in convs:
        norm = chat.normalize_messages(msgs)
        for k, m in enumerate(norm):
            if m["role"] != "assistant" or (k != len(norm) - 1 and m["reasoning"]):
                continue
            segs = chat.render(tok, norm[:k + 1])
            ids = torch.tensor([segs.ids])
            labels = torch.tensor([[t if on else -100 for t, on in zip(segs.ids, segs.trained_mask([k]))]])
            logits = model(ids).logits
            ce = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
            out.append((m.get("weight", 1.0), ce, int((labels != -100).sum())))
    return out


@pytest.fixture
def tiny64():
    return models.load("tiny-random", dtype="float64")


def trainer_for(model, tok, tmp_path, **kw):
    args = SFTConfig(output_dir=str(tmp_path), report_to=[], disable_tqdm=True, **kw)
    return SFTTrainer(model=model, args=args, train_dataset=CONVS, processing_class=tok)


@pytest.mark.parametrize("norm", ["tokens", "messages"])
def test_loss_matches_per_message_reference(tiny64, tmp_path, norm):
    model, tok = tiny64
    tr = trainer_for(model, tok, tmp_path, loss_normalization=norm)
    batch = pad_collate(tok.pad_token_id)([encode(tok, c, norm) for c in CONVS])
    with torch.no_grad():
        loss = tr.compute_loss(model, batch, num_items_in_batch=batch["units"].sum())
        ref = reference_losses(model, tok, CONVS)
    if norm == "messages":   # RISE: mean over examples of weight * per-example mean CE
        expected = sum(w * ce for w, ce, _ in ref) / len(ref)
    else:                    # tokens: weighted sum of token CEs / number of trained tokens
        expected = sum(w * ce * n for w, ce, n in ref) / sum(n for _, _, n in ref)
    assert abs(loss.item() - expected.item()) < 1e-10


def test_history_reasoning_turns_are_not_trained(tb_tok):
    ex = encode(tb_tok, CONVS[3])
    assert ex["hidden_reasoning_turns"] == 1
    segs = chat.render(tb_tok, CONVS[3])
    trained = [t for t, w in zip(segs.ids, ex["weights"]) if w]
    assert tb_tok.decode(trained) == "<think>\nshown\n</think>\n\nd<|im_end|>"


def test_gradient_accumulation_is_exact(tmp_path):
    params = []
    for bs, ga in [(4, 1), (2, 2), (1, 4)]:
        model, tok = models.load("tiny-random", dtype="float64")
        tr = trainer_for(model, tok, tmp_path / f"{bs}", per_device_train_batch_size=bs,
                         gradient_accumulation_steps=ga, max_steps=1, learning_rate=1e-2, save_strategy="no",
                         train_sampling_strategy="sequential", loss_normalization="messages", warmup_steps=0)
        tr.train()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (params[0] - params[1]).abs().max() < 1e-12
    assert (params[0] - params[2]).abs().max() < 1e-12


def test_resume_is_exact_and_checkpoints_are_atomic(tmp_path):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):  # stop the first run right after its step-3 checkpoint, as a kill would
        def on_save(self, args, state, control, **kw):
            control.should_training_stop = True

    def run(out, resume=None, crash=False):
        model, tok = models.load("tiny-random", dtype="float64")
        tr = trainer_for(model, tok, out, per_device_train_batch_size=2, max_steps=6, learning_rate=5e-3,
                         save_strategy="steps", save_steps=3, seed=1, data_seed=1)
        if crash:
            tr.add_callback(Crash())
        tr.train(resume_from_checkpoint=resume)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    straight = run(tmp_path / "a")
    run(tmp_path / "b", crash=True)
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-3", "log.jsonl"]  # no staging folder left behind
    resumed = run(tmp_path / "b", resume=True)
    assert torch.equal(straight, resumed)
    state = json.loads((tmp_path / "b" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_over_length_examples_are_skipped_and_counted(tiny, tmp_path):
    model, tok = tiny
    tr = trainer_for(model, tok, tmp_path, max_length=40)
    assert tr.data_stats["train"]["skipped_too_long"] >= 1
    assert tr.data_stats["train"]["examples"] + tr.data_stats["train"]["skipped_too_long"] == len(CONVS)


def test_bad_record_names_its_index(tiny, tmp_path):
    model, tok = tiny
    args = SFTConfig(output_dir=str(tmp_path), report_to=[])
    with pytest.raises(ValueError, match=r"train_dataset\[1\]: messages\[0\]\.role: unknown role 'robot'"):
        SFTTrainer(model=model, args=args, processing_class=tok,
                   train_dataset=[CONVS[0], [{"role": "robot", "content": "x"}]])


def test_lora_training_changes_only_adapters(tmp_path):
    model, tok = models.load("tiny-random")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = trainer_for(model, tok, tmp_path, lora={"r": 4}, max_steps=2, learning_rate=1e-2, save_strategy="no")
    tr.train()
    for n, p in tr.model.named_parameters():
        base = n.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" not in n:
            assert torch.equal(p, before[base]), n


def test_packed_loss_equals_padded(tiny64, tmp_path):
    from ponder.trainers.sft import pack_collate
    model, tok = tiny64
    tr = trainer_for(model, tok, tmp_path)
    exs = [encode(tok, c) for c in CONVS] * 3
    padded = pad_collate(tok.pad_token_id)(exs)
    packed = pack_collate(tok.pad_token_id, 128)(exs)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    with torch.no_grad():
        a = tr.weighted_loss_sum(model, padded)
        b = tr.weighted_loss_sum(model, packed)
    assert abs(a.item() - b.item()) < 1e-9


def test_model_object_without_tokenizer_is_a_clear_error(tiny, tmp_path):
    model, _ = tiny
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", max_steps=1)
    with pytest.raises(ValueError, match="SFTTrainer needs the tokenizer"):
        SFTTrainer(model=model, args=args, train_dataset=[[{"role": "user", "content": "1+1"},
                                                          {"role": "assistant", "content": "2"}]])


def test_console_shows_a_bar_and_logs_go_to_a_file(tmp_path, capsys):
    """Users see a progress bar and the summary, not transformers' printed log dictionaries; every logged
    dictionary is in output_dir/log.jsonl."""
    import json

    from ponder.data import load_conversations
    cfg = SFTConfig(model="tiny-random", output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                    logging_steps=2, report_to="none", save_strategy="no")
    SFTTrainer(args=cfg, train_dataset=load_conversations("testbed:single", n=8)).train()
    out = capsys.readouterr()
    assert "'loss'" not in out.out + out.err and "{'train_runtime'" not in out.out + out.err
    logs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logs if "loss" in x] == [2, 4] and "train_loss" in logs[-1]
