"""What a user does after training: `ponder <method>` with LoRA, then `ponder eval --model runs/<run>/final` and
`AutoModelForCausalLM.from_pretrained(final)`. Every method's `final/` (each RISE iteration's too) must be a plain
model whose greedy output is the trained in-memory model's, with the adapter kept in `final/adapter/`."""

import json
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from ponder import models
from ponder.cli import app

runner = CliRunner()

#: A LoRA whose adapter is not the identity from the start (init_lora_weights false), so a final model saved
#: without the adapter (or with it twice) gives other logits than the in-memory one.
LORA = ["lora.r=4", "lora.init_lora_weights=false"]
COMMON = ["model=tiny-random", "max_steps=1", "report_to=none", "save_strategy=no", "logging_steps=1", "seed=0"]

#: Per method: the sub-command and its tiny overrides (1 step, a few problems, short generations).
RUNS = {
    "sft": ["dataset=testbed:single", "per_device_train_batch_size=2"],
    "onepass": ["dataset=testbed:multi", "per_device_train_batch_size=2"],
    "ssft": ["dataset=testbed:traces", "n_train=2", "num_tags=4", "per_device_train_batch_size=2"],
    "gfpo": ["dataset=testbed", "n_train=2", "num_tags=2", "num_generations=2", "max_new_tokens=4",
             "per_device_train_batch_size=2"],
    "latro": ["dataset=testbed", "n_train=2", "num_generations=2", "per_device_train_batch_size=4",
              "max_new_tokens=4", "n_eval=2", "eval_samples=2", "eval_max_new_tokens=4"],
    "retry": ["dataset=testbed", "n_train=2", "num_generations=2", "max_turns=2", "max_new_tokens=4",
              "per_device_train_batch_size=2", "n_eval=2", "eval_turns=2", "eval_parallel=1"],
    "rise": ["dataset=testbed", "n_train=2", "collect_turns=1", "samples=[1]", "max_new_tokens=4",
             "per_device_train_batch_size=2", "n_eval=2", "eval_turns=2", "eval_parallel=1"],
}
#: The recipe module whose `save_final` writes each method's final model.
SAVER = {"sft": "common", "onepass": "common", "ssft": "common", "gfpo": "common", "latro": "latro",
         "retry": "retry", "rise": "rise"}


def greedy_ids(model, tok, n_new=6):
    ids = torch.tensor([tok("3+4*2=")["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        logits = model(input_ids=ids).logits[0, -1]
    return out[0, ids.shape[1]:].tolist(), logits


@pytest.mark.parametrize("method", list(RUNS))
def test_lora_run_final_is_a_plain_model(method, tmp_path, monkeypatch):
    from importlib import import_module
    saved = []
    recipe = import_module(f"ponder.recipes.{SAVER[method]}")
    real = recipe.save_final

    def spy(trainer, final):  # the in-memory model at the moment its final/ is written
        real(trainer, final)
        saved.append((trainer.accelerator.unwrap_model(trainer.model), final))
    monkeypatch.setattr(recipe, "save_final", spy)
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = runner.invoke(app, [method, *COMMON, *RUNS[method], *LORA, f"output_dir={out}"])
    assert r.exit_code == 0, r.output
    # transformers warns on every LoRA run about a name PEFT uses: the CLI filters it (and nothing else)
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]
    assert saved, "no final model was written"
    trained, final = saved[-1]
    assert isinstance(trained, PeftModel)
    assert (final / "config.json").exists() and (final / "adapter" / "adapter_config.json").exists()

    # `ponder eval` reads it as any model folder
    ev = runner.invoke(app, ["eval", "--model", str(final), "--n", "2", "--samples", "0", "--max-new-tokens", "4",
                             "--out", str(tmp_path / "eval")])
    assert ev.exit_code == 0, ev.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 2

    # plain transformers: the same greedy tokens and logits as the trained in-memory (PEFT) model
    tok = AutoTokenizer.from_pretrained(final)
    plain = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    trained.eval()
    want_ids, want_logits = greedy_ids(trained, tok)
    got_ids, got_logits = greedy_ids(plain, tok)
    assert got_ids == want_ids
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    # ... which is not the base model's: the adapter is in the saved weights
    base, _ = models.load("tiny-random")
    if len(tok) > base.get_input_embeddings().weight.shape[0]:  # SSFT/GFPO added the forking tags
        base.resize_token_embeddings(len(tok), mean_resizing=False)
    assert (greedy_ids(base, tok)[1] - want_logits).abs().max() > 1e-3
    if method == "rise":  # a resumed RISE run goes on from the kept adapter, on the same weights
        from ponder.config import load_config
        from ponder.recipes.rise import RISERunConfig, load_iteration_model
        cfg = load_config(RISERunConfig, None, [*COMMON, *RUNS[method], *LORA, f"output_dir={out}"])
        resumed = load_iteration_model(cfg, final).eval()
        assert isinstance(resumed, PeftModel)
        torch.testing.assert_close(greedy_ids(resumed, tok)[1], want_logits, atol=1e-4, rtol=1e-4)
