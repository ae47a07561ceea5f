"""Every row of docs/errors.md, through the command line where a user meets it (`ponder.cli.app` in-process).

A bad input or setting gets exit code 2 and ONE line ``error: ...`` naming the file, line and field (or the
option and its allowed values), never a traceback; the rows that are not errors (counted skips, warnings,
stops, Ctrl-C, resume) check what is printed and what is left on disk. Each case is registered under the slug
of its row; `test_every_row_is_tested` keeps the table and the tests in step.
"""

import errno
import gc
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ponder.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
CASES = {}   # slug -> builder(tmp_path) -> (argv, pattern of the one error line)


@pytest.fixture(autouse=True, scope="module")
def _quick_gc():
    """Trainer.train() runs a full gc.collect() (accelerate's free_memory): ~0.5 s per run in a long test session.
    The objects alive before each test of this module are set aside (gc.freeze) and given back after the module."""
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _freeze(_quick_gc):
    gc.freeze()


def case(slug):
    def register(fn):
        CASES[slug] = fn
        return fn
    return register


def cli(*args, env=None):
    r = runner.invoke(app, [str(a) for a in args], env=env)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output + repr(r.exception)
    assert "Traceback" not in r.output
    return r


def error_line(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.output
    return lines[0]


def write(path: Path, text) -> Path:
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return path


def jsonl(path: Path, rows) -> Path:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def conv(i, **extra):
    return {"messages": [{"role": "user", "content": f"{i}+1=?"},
                         {"role": "assistant", "content": f"The answer is {i + 1}.", **extra}]}


def sft_args(tmp, data=None, *more):
    data = data or jsonl(tmp / "d.jsonl", [conv(i) for i in range(8)])
    return ["sft", "model=tiny-random", f"dataset={data}", "max_steps=1", "per_device_train_batch_size=4",
            "report_to=none", "save_strategy=no", f"output_dir={tmp / 'run'}", *more]


# ----------------------------------------------------------------------------------------------------------
# settings: config files, overrides, options
# ----------------------------------------------------------------------------------------------------------

@case("unknown-field")
def _(tmp):
    return ["sft", "-c", write(tmp / "c.yaml", "model: tiny-random\nmax_step: 2\n")], \
        r"c\.yaml:2: unknown field 'max_step' in SFTConfig \(did you mean 'max_steps'\?\)"


@case("bad-rollout-backend")
def _(tmp):
    return ["latro", "rollout_backend=fast"], r"rollout_backend must be one of auto, generate, lean, vllm, vllm-server, got 'fast'"


@case("bad-rollout-dtype")
def _(tmp):
    return ["latro", "rollout_dtype=half"], r"rollout_dtype must be one of auto, float32, bfloat16, got 'half'"


@case("bf16-rollouts-on-vllm")
def _(tmp):
    return (["latro", "rollout_backend=vllm", "rollout_dtype=bfloat16"],
            r"rollout_dtype 'bfloat16' runs on the lean and generate backends, not 'vllm'")


@case("vllm-serve-bad-model")
def _(tmp):
    return ["vllm-serve", "--model", "nope"], \
        r"^error: --model must be testbed, smollm2-135m or a folder written by save_pretrained; 'nope' is none of these$"


@case("unknown-override")
def _(tmp):
    return ["sft", "max_stepz=3"], r"command line \(max_stepz=3\): unknown field 'max_stepz' in SFTConfig"


@case("override-syntax")
def _(tmp):
    return ["sft", "max_steps"], r"command line: override 'max_steps' is not of the form key=value"


@case("wrong-type")
def _(tmp):
    return ["sft", "-c", write(tmp / "c.yaml", "max_steps: lots\n")], r"c\.yaml:1: field 'max_steps' must be int, got 'lots'"


@case("lora-r-not-int")
def _(tmp):
    return ["sft", "lora.r=x"], r"command line \(lora\.r=x\): lora\.r must be int, got 'x'"


@case("lora-not-mapping")
def _(tmp):
    return ["sft", "lora=8"], r"command line \(lora=8\): field 'lora' is a mapping of options \(e\.g\. lora\.r=8"


@case("dotted-key-on-scalar")
def _(tmp):
    return ["sft", "max_steps.x=1"], r"command line \(max_steps\.x=1\): field 'max_steps' is not a mapping"


@case("lora-unknown-option")
def _(tmp):
    return sft_args(tmp, None, "lora.rr=4"), r"lora: unknown option 'rr' \(did you mean 'r'\?\)"


@case("duplicated-yaml-key")
def _(tmp):
    return ["sft", "-c", write(tmp / "c.yaml", "model: tiny-random\nmax_steps: 1\nmax_steps: 2\n")], \
        r"c\.yaml:3: duplicated key 'max_steps' \(also on line 2\)"


@case("duplicated-nested-key")
def _(tmp):
    return ["sft", "-c", write(tmp / "c.yaml", "lora:\n  r: 4\n  alpha: 8\n  r: 16\n")], \
        r"c\.yaml:4: duplicated key 'r' \(also on line 2\)"


@case("config-not-utf8")
def _(tmp):
    return ["sft", "-c", write(tmp / "c.yaml", b"model: tiny-random\n# caf\xe9\n")], \
        r"c\.yaml:2: not UTF-8 text \(byte 0xe9 at column 6\)"


@case("invalid-yaml")
def _(tmp):
    return ["sft", "-c", write(tmp / "c.yaml", "model: a\nmax_steps: [1, 2\n")], r"c\.yaml:\d: invalid YAML"


@case("yaml-python-tag")
def _(tmp):
    text = f"model: !!python/object/apply:os.system ['touch {tmp / 'pwned'}']\n"
    return ["sft", "-c", write(tmp / "c.yaml", text)], \
        r"c\.yaml:1: invalid YAML \(could not determine a constructor for the tag .*python/object/apply"


@case("config-missing")
def _(tmp):
    return ["sft", "-c", tmp / "nope.yaml"], r"nope\.yaml: no such config file"


@case("config-not-mapping")
def _(tmp):
    return ["sft", "-c", write(tmp / "c.yaml", "- model\n- tiny-random\n")], r"c\.yaml:1: expected a mapping"


@case("bad-choice")
def _(tmp):
    return ["sft", "loss_normalization=foo"], \
        r"command line \(loss_normalization=foo\): loss_normalization must be one of tokens, messages, got 'foo'"


@case("bad-hf-choice")
def _(tmp):
    return ["sft", "save_strategy=sometimes"], \
        r"command line \(save_strategy=sometimes\): sometimes is not a valid SaveStrategy, please select one of " \
        r"\['no', 'steps', 'epoch', 'best'\]"


@case("bad-dtype")
def _(tmp):
    return sft_args(tmp, None, "dtype=float8"), r"unknown dtype 'float8' \(expected one of float32, fp32"


@case("negative-learning-rate")
def _(tmp):
    return ["sft", "learning_rate=-1"], r"command line \(learning_rate=-1\): learning_rate must be >= 0, got -1\.0"


@case("batch-not-multiple-of-group")
def _(tmp):
    return ["latro", "num_generations=4", "per_device_train_batch_size=6"], \
        r"per_device_train_batch_size \(6\) must be a multiple of num_generations \(4\)"


@case("eval-strategy-without-eval-data")
def _(tmp):
    return sft_args(tmp, None, "eval_strategy=steps"), r"`args\.eval_strategy` to IntervalStrategy\.STEPS but " \
        r"you didn't pass an `eval_dataset`"


@case("tags-only-without-tags")
def _(tmp):
    return ["ssft", "model=tiny-random", "assignment=mixed", "tags_only=true", f"output_dir={tmp / 'run'}"], \
        r"tags_only trains the forking-token rows; assignment=mixed has none"


@case("sampling-at-temperature-zero")
def _(tmp):
    return ["latro", "temperature=0"], r"command line \(temperature=0\): temperature must be > 0"


@case("resume-without-checkpoint")
def _(tmp):
    return sft_args(tmp, None, "resume_from_checkpoint=last"), r"No valid checkpoint found in output directory"


@case("resume-from-missing-path")
def _(tmp):
    return sft_args(tmp, None, f"resume_from_checkpoint={tmp / 'nock'}"), r"Can't find a valid checkpoint at .*nock"


@case("output-dir-is-a-file")
def _(tmp):
    return sft_args(tmp, None, f"output_dir={write(tmp / 'afile', 'x')}"), r"output_dir .*afile: is a file, not a directory"


@case("flex-attention-on-cpu")
def _(tmp):
    return ["onepass", "model=tiny-random", "dataset=testbed:multi", "max_steps=1", "attention=flex",
            "attn_implementation=flex_attention", "report_to=none", f"output_dir={tmp / 'run'}"], \
        r"command line \(attention=flex\): attention=flex cannot train on CPU: FlexAttention has no backward on " \
        r"CPU in torch [\d.]+; use one of auto, sparse, dense \(flex needs a CUDA GPU\)"


@case("report-missing-run-dir")
def _(tmp):
    return ["report", tmp / "nope"], r"nope: no such run directory \(a folder a ponder run wrote, e\.g\. runs/sft\)"


@case("eval-prompt-unknown-field")
def _(tmp):
    return ["eval", "--model", "tiny-random", "--prompt", "Q: {questoin}", "--out", tmp / "e"], \
        r"--prompt: unknown field \{questoin\} in 'Q: \{questoin\}' \(allowed: \{question\}\)"


@case("template-unknown-field")
def _(tmp):
    return ["latro", "prompt_template={question} {hint}"], \
        r"command line \(prompt_template=\{question\} \{hint\}\): prompt_template: unknown field \{hint\}"


@case("eval-bad-count")
def _(tmp):
    return ["eval", "--model", "tiny-random", "--n", "0", "--out", tmp / "e"], \
        r"--n, --max-new-tokens and --batch-size must be >= 1"


@case("unknown-rg-task")
def _(tmp):
    return ["eval", "--model", "tiny-random", "--task", "rg:nope", "--out", tmp / "e"], r"unknown task 'rg:nope'"


@case("bad-rg-option")
def _(tmp):
    return ["eval", "--model", "tiny-random", "--task", "rg:chain_sum", "--task-config", "nope=1", "--out", tmp / "e"], \
        r"rg:chain_sum: bad task option\(s\) \{'nope': 1\}"


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------

def eval_on(tmp, rows, *more):
    return ["eval", "--model", "tiny-random", "--task", jsonl(tmp / "p.jsonl", rows), "--n", "2", "--samples", "0",
            "--max-new-tokens", "4", "--out", tmp / "e", *more]


@case("dataset-file-missing")
def _(tmp):
    return sft_args(tmp, tmp / "missing.jsonl"), r"missing\.jsonl: no such file"


@case("dataset-folder-missing")
def _(tmp):
    return sft_args(tmp, tmp / "data" / "gsm8k"), r"gsm8k: no such file or directory"


@case("malformed-json")
def _(tmp):
    return sft_args(tmp, jsonl(tmp / "d.jsonl", [conv(0), "{oops"])), r"d\.jsonl:2: malformed JSON"


@case("data-not-utf8")
def _(tmp):
    return sft_args(tmp, write(tmp / "d.jsonl", json.dumps(conv(0)).encode() + b'\n{"messages": "caf\xe9"}\n')), \
        r"d\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 18\)"


@case("data-not-utf8-past-n")
def _(tmp):
    p = write(tmp / "p.jsonl", b'{"question": "1+1", "answer": "2"}\n{"question": "2+2", "answer": "4"}\n'
                               b'{"question": "caf\xe9", "answer": "4"}\n')
    return ["eval", "--model", "tiny-random", "--task", p, "--n", "2", "--samples", "0", "--max-new-tokens", "4",
            "--out", tmp / "e"], r"p\.jsonl:3: not UTF-8 text \(byte 0xe9 at column 18\)"


@case("record-not-object")
def _(tmp):
    return sft_args(tmp, jsonl(tmp / "d.jsonl", ["[1, 2]"])), r"d\.jsonl:1: expected a JSON object, got list"


@case("messages-missing")
def _(tmp):
    return sft_args(tmp, jsonl(tmp / "d.jsonl", [{"text": "hi"}])), \
        r"d\.jsonl:1: missing field 'messages' \(or ShareGPT 'conversations'\)"


@case("text-under-unexpected-key")
def _(tmp):
    rows = [conv(0), {"messages": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "yo"}]}]
    return sft_args(tmp, jsonl(tmp / "d.jsonl", rows)), r"d\.jsonl:2: messages\[0\]: missing field 'content' \(found 'text'\)"


@case("sharegpt-text-under-unexpected-key")
def _(tmp):
    rows = [{"conversations": [{"from": "human", "message": "hi"}, {"from": "gpt", "value": "yo"}]}]
    return sft_args(tmp, jsonl(tmp / "d.jsonl", rows)), \
        r"d\.jsonl:1: messages\[0\]: missing field 'value' \(found 'message'\)"


@case("message-without-text")
def _(tmp):
    rows = [{"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}]
    return sft_args(tmp, jsonl(tmp / "d.jsonl", rows)), \
        r"d\.jsonl:1: messages\[0\]: missing field 'content' \(the message has no text\)"


@case("message-text-null")
def _(tmp):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}]
    return sft_args(tmp, jsonl(tmp / "d.jsonl", rows)), \
        r"d\.jsonl:1: messages\[1\]: field 'content' is null \(the message has no text\)"


@case("unknown-role")
def _(tmp):
    rows = [{"messages": [{"role": "bot", "content": "hi"}]}]
    return sft_args(tmp, jsonl(tmp / "d.jsonl", rows)), r"d\.jsonl:1: messages\[0\]\.role: unknown role 'bot'"


@case("content-not-string")
def _(tmp):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["yo"]}]}]
    return sft_args(tmp, jsonl(tmp / "d.jsonl", rows)), r"d\.jsonl:1: messages\[1\]\.content: expected a string, got list"


@case("no-assistant-turn")
def _(tmp):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}]
    return sft_args(tmp, jsonl(tmp / "d.jsonl", rows)), r"d\.jsonl:1: messages: the conversation has no assistant turn"


@case("weight-not-finite")
def _(tmp):
    return sft_args(tmp, jsonl(tmp / "d.jsonl", [conv(0, weight=float("nan"))])), \
        r"d\.jsonl:1: messages\[1\]\.weight: expected a number, got nan"


@case("reasoning-on-user-message")
def _(tmp):
    rows = [{"messages": [{"role": "user", "content": "hi", "reasoning": "x"}, {"role": "assistant", "content": "y"}]}]
    return sft_args(tmp, jsonl(tmp / "d.jsonl", rows)), \
        r"d\.jsonl:1: messages\[0\]\.reasoning: only assistant messages carry reasoning"


@case("problem-missing-answer")
def _(tmp):
    return eval_on(tmp, [{"question": "1+1"}]), r"p\.jsonl:1: missing field 'answer' \(or solution, final_answer\)"


@case("unknown-verifier")
def _(tmp):
    # raised while loading the data: before the (here nonexistent) model is looked at, long before generation
    args = eval_on(tmp, [{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4", "meta": {"verifier": "nope"}}])
    args[2] = tmp / "no-such-model"
    return args, r"p\.jsonl:2: meta\.verifier: unknown verifier 'nope' \(expected one of math, gsm8k, boxed, " \
        r"answer_is, testbed, arc, text or rg:<task>\)"


@case("unknown-rg-verifier")
def _(tmp):
    return eval_on(tmp, [{"question": "q", "answer": "a", "meta": {"verifier": "rg:nope"}}]), \
        r"p\.jsonl:1: meta\.verifier: reasoning-gym has no task 'nope'"


@case("meta-not-object")
def _(tmp):
    return eval_on(tmp, [{"question": "q", "answer": "a", "meta": "rg:chain_sum"}]), \
        r"p\.jsonl:1: field 'meta' must be an object, got str"


@case("empty-eval-file")
def _(tmp):
    return eval_on(tmp, []), r"p\.jsonl: no problems in it \(the source is empty\)"


@case("empty-train-file")
def _(tmp):
    return sft_args(tmp, write(tmp / "d.jsonl", "\n")), r"d\.jsonl: no conversations in it \(the source is empty\)"


@case("every-example-too-long")
def _(tmp):
    return sft_args(tmp, None, "max_length=3"), \
        r"no trainable examples left in .*d\.jsonl: 8 read, skipped 8 longer than max_length \(3 tokens\)"


@case("nothing-to-train")
def _(tmp):
    return sft_args(tmp, jsonl(tmp / "d.jsonl", [conv(0, weight=0), conv(1, weight=0)])), \
        r"no trainable examples left in .*d\.jsonl: 2 read, skipped 2 with nothing to train"


@case("empty-traces")
def _(tmp):
    rows = [{"question": "q", "answer": "1", "traces": []}]
    return ["ssft", "model=tiny-random", f"dataset={jsonl(tmp / 't.jsonl', rows)}", f"output_dir={tmp / 'run'}"], \
        r"t\.jsonl:1: field 'traces' is empty"


@case("rg-record-tampered")
def _(tmp):
    from ponder import data
    p = data.load_problems("rg:chain_sum", n=2)[1]
    meta = {k: v for k, v in p.meta.items() if k != "entry"}
    return eval_on(tmp, [{"question": p.question + " + 1", "answer": p.answer, "meta": meta}]), \
        r"p\.jsonl:1: meta\.rg regenerates a different problem than this record's question/answer"


@case("eval-every-prompt-too-long")
def _(tmp):
    return eval_on(tmp, [{"question": "1 " * 2500, "answer": "2"}]), \
        r"1 of 1 prompts do not fit the model's context \(4096 tokens\) with max_new_tokens=4 \(prompt 0 has \d+ tokens\)"


@case("rollout-prompt-too-long")
def _(tmp):
    p = jsonl(tmp / "p.jsonl", [{"question": "1 " * 2500, "answer": "2"}])
    return ["latro", "model=tiny-random", f"dataset={p}", "max_steps=1", "num_generations=2",
            "per_device_train_batch_size=2", "max_new_tokens=8", "report_to=none", "save_strategy=no",
            f"output_dir={tmp / 'run'}"], r"1 of 1 prompts do not fit the model's context \(4096 tokens\) with " \
        r"max_new_tokens=8"


# ----------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from ponder import models
    d = tmp_path_factory.mktemp("tiny")
    m, tok = models.load("tiny-random")
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d, m, tok


def model_dir(tmp, files):
    import shutil
    d, _, _ = CASES_STATE["saved_tiny"]
    out = tmp / "model"
    out.mkdir()
    for f in files(d):
        shutil.copy(f, out / f.name)
    return out


CASES_STATE = {}
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@case("model-without-tokenizer")
def _(tmp):
    d = model_dir(tmp, lambda d: [f for f in d.iterdir() if f.name not in TOKENIZER])
    return ["eval", "--model", d, "--out", tmp / "e"], r"model: no tokenizer files \(none of tokenizer\.json"


@case("model-without-config")
def _(tmp):
    d = model_dir(tmp, lambda d: [f for f in d.iterdir() if f.name != "config.json"])
    return ["eval", "--model", d, "--out", tmp / "e"], r"model: no config\.json, so this is not a model folder"


@case("model-folder-missing")
def _(tmp):
    return ["eval", "--model", tmp / "runs" / "sft" / "final", "--out", tmp / "e"], \
        r"final: no such model directory \(a folder written by save_pretrained was expected\)"


@case("model-unknown-name")
def _(tmp):
    return ["eval", "--model", "smollm3", "--out", tmp / "e"], r"unknown model spec 'smollm3'"


@case("model-not-cached-offline")
def _(tmp):
    return ["eval", "--model", "some-org/not-cached", "--out", tmp / "e"], \
        r"model 'some-org/not-cached' is not a local directory, not in the local Hugging Face cache and the hub is " \
        r"unreachable \(offline\)"


@case("model-ships-code")
def _(tmp):
    d = model_dir(tmp, lambda d: list(d.iterdir()))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evil_llama", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text(f"import pathlib\npathlib.Path({str(tmp / 'pwned')!r}).touch()\n")
    return ["eval", "--model", d, "--out", tmp / "e"], r"contains custom code which must be executed .*" \
        r"trust_remote_code=True"


@case("model-weights-pickle-code")
def _(tmp):
    import pickle
    d = model_dir(tmp, lambda d: [f for f in d.iterdir() if not f.name.endswith(".safetensors")])

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    return ["eval", "--model", d, "--out", tmp / "e"], r"the weights file holds more than tensors and torch's " \
        r"weights_only unpickler refused it"


@pytest.mark.parametrize("slug", list(CASES))
def test_error_row(slug, tmp_path, saved_tiny):
    CASES_STATE["saved_tiny"] = saved_tiny
    args, pattern = CASES[slug](tmp_path)
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert re.search(pattern, error_line(r)), error_line(r)
    assert not (tmp_path / "pwned").exists()  # nothing in a config, data or model folder ran as code


# ----------------------------------------------------------------------------------------------------------
# rows that are not errors, or need more than the error line
# ----------------------------------------------------------------------------------------------------------

ROWS = set()


def row(slug):
    def register(fn):
        ROWS.add(slug)
        return fn
    return register


@row("old-config-name")
def test_old_config_name_loads_with_a_notice(monkeypatch, capsys):
    from ponder import config
    from ponder.trainers.ssft import SSFTConfig

    monkeypatch.setattr(config, "_NOTED", set())
    cfg = config.load_config(SSFTConfig, None, ["dataset_size=8", "report_to=none"])
    assert cfg.n_train == 8
    assert capsys.readouterr().err == "note: 'dataset_size' is deprecated; use 'n_train'\n"


@row("old-and-new-config-name")
def test_old_and_new_config_name_is_an_error(tmp_path):
    from ponder.config import ConfigError, load_config
    from ponder.trainers.ssft import SSFTConfig

    path = tmp_path / "c.yaml"
    path.write_text("dataset_size: 8\nn_train: 8\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:1: 'dataset_size' is the old name of 'n_train'; give only "
                                          r"'n_train'"):
        load_config(SSFTConfig, path)


@row("transformers-version")
def test_other_transformers_release_is_refused_in_one_line(monkeypatch):
    from ponder.trainers.base import check_transformers

    check_transformers()  # the installed (pinned) release passes
    with pytest.raises(RuntimeError, match=r"as they are in transformers 5\.23\.x; found 5\.24\.0\. Install "
                                           r"transformers==5\.23\.\* \(pyproject\.toml\), or set "
                                           r"PONDER_ANY_TRANSFORMERS=1 to try anyway$"):
        check_transformers("5.24.0")
    monkeypatch.setenv("PONDER_ANY_TRANSFORMERS", "1")
    check_transformers("5.24.0")  # a warning only


@row("diverging-learning-rate")
def test_diverging_learning_rate_stops_naming_step_and_lr(tmp_path):
    r = cli(*sft_args(tmp_path, None, "learning_rate=1e10", "lr_scheduler_type=constant", "max_steps=4",
                      "save_strategy=steps", "save_steps=1"))
    assert r.exit_code == 2
    assert re.search(r"error: non-finite loss \(nan\) at step 2 \(learning rate 1e\+10\): the run diverged and was "
                     r"stopped; nothing was saved as final", error_line(r)), error_line(r)
    run = tmp_path / "run"
    assert not (run / "final").exists() and not (run / "metrics.json").exists()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]  # only the finite step


@row("infinite-loss")
def test_infinite_loss_stops(tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [conv(i, weight=1e308) for i in range(8)])
    r = cli(*sft_args(tmp_path, data))
    assert r.exit_code == 2 and re.search(r"non-finite loss \(inf\) at step 1 \(learning rate", error_line(r))
    assert not (tmp_path / "run" / "final").exists()


@row("zero-variance-reward-groups")
def test_zero_variance_reward_groups_are_counted_without_nan(tmp_path, tiny):
    import torch

    from ponder.advantages import group_normalized
    from ponder.trainers.gfpo import GFPOConfig, GFPOTrainer
    a = group_normalized(torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64))
    assert torch.equal(a[0], torch.zeros(3)) and torch.isfinite(a).all()  # a flat group has no signal, not NaN
    cfg = GFPOConfig(output_dir=str(tmp_path), model="tiny-random", num_tags=2, num_generations=2, max_new_tokens=2,
                     max_steps=2, per_device_train_batch_size=2, logging_steps=1, report_to="none",
                     save_strategy="no", n_train=4)
    tr = GFPOTrainer(args=cfg, reward_fn=lambda p, text: 1.0)
    out = tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["frac_reward_zero_std"] == 1.0 and h["loss"] == 0.0 for h in logs)
    assert math.isfinite(out.training_loss)


@row("some-examples-too-long")
@row("non-finite-reward")
def test_a_non_finite_reward_is_one_line_or_a_counted_skip(tmp_path, monkeypatch):
    from ponder import latro
    real = latro.score_ids

    def poisoned(*args, **kw):  # R = −inf for every rollout's reward pass (the reference pass has no y)
        lz, score = real(*args, **kw)
        return lz, torch.full_like(score, -math.inf) if len(args[3][0]) else score
    monkeypatch.setattr(latro, "score_ids", poisoned)
    p = jsonl(tmp_path / "p.jsonl", [{"id": "p0", "question": "1+1", "answer": "2"}])
    args = ["latro", "model=tiny-random", f"dataset={p}", "max_steps=1", "num_generations=4", "reward=mean_logprob",
            "per_device_train_batch_size=4", "max_new_tokens=4", "report_to=none", "save_strategy=no",
            "logging_steps=1", "stop=[]"]
    r = cli(*args, f"output_dir={tmp_path / 'a'}")
    assert r.exit_code == 2 and re.fullmatch(
        r"error: reward mean_logprob is -inf for problem p0 \(4 of 4 rewards of this update are not finite\); fix "
        r"the reward, or set nan_rewards: skip .*\(counted in the logs\)", error_line(r)), r.output
    r = cli(*args, "nan_rewards=skip", "eval_samples=0", f"output_dir={tmp_path / 'b'}")
    assert r.exit_code == 0, r.output
    logs = json.loads((tmp_path / "b" / "metrics.json").read_text())["log_history"]
    assert [h["nonfinite_rewards"] for h in logs if "nonfinite_rewards" in h] == [4.0]


def test_over_length_examples_are_counted_and_reported(tmp_path):
    rows = [conv(i) for i in range(6)] + [{"messages": [{"role": "user", "content": "1 " * 300},
                                                         {"role": "assistant", "content": "2"}]}] * 2
    r = cli(*sft_args(tmp_path, jsonl(tmp_path / "d.jsonl", rows), "max_length=200"))
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["data"]["train"]["skipped_too_long"] == 2 and m["data"]["train"]["examples"] == 6
    assert re.search(r"data: skipped_too_long\s*│\s*2", r.output)


@row("blank-lines")
def test_blank_jsonl_lines_are_counted_and_reported(tmp_path):
    rows = [conv(0), "", conv(1), "   ", conv(2), conv(3), ""]
    r = cli(*sft_args(tmp_path, jsonl(tmp_path / "d.jsonl", rows)))
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["data"]["train"]["skipped_blank_lines"] == 3 and m["data"]["train"]["examples"] == 4
    assert re.search(r"data: skipped_blank_lines\s*│\s*3", r.output)


@row("max-length-over-context")
def test_max_length_beyond_the_models_context_is_capped_and_reported(tmp_path):
    rows = [conv(i) for i in range(7)] + [{"messages": [{"role": "user", "content": "1 " * 2300},
                                                         {"role": "assistant", "content": "2"}]}]
    r = cli(*sft_args(tmp_path, jsonl(tmp_path / "d.jsonl", rows), "max_length=8192"))
    assert r.exit_code == 0, r.output
    assert "warning: max_length 8192 is longer than the model's context (4096 tokens); examples longer than 4096 " \
           "tokens are skipped and counted" in r.output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]["train"]["skipped_too_long"] == 1


@row("eval-some-prompts-too-long")
def test_eval_skips_and_counts_prompts_longer_than_the_context(tmp_path):
    r = cli(*eval_on(tmp_path, [{"question": "1+1", "answer": "2"}, {"question": "1 " * 2500, "answer": "2"}]))
    assert r.exit_code == 0, r.output
    assert "warning: skipped 1 of 2 problems whose prompt plus --max-new-tokens 4 does not fit the model's " \
           "context (4096 tokens)" in r.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["n"] == 1 and m["skipped_too_long"] == 1


@row("temperature-zero-several-samples")
def test_temperature_zero_with_several_samples_warns(tmp_path):
    r = cli("eval", "--model", "tiny-random", "--n", "1", "--samples", "3", "--temperature", "0",
            "--max-new-tokens", "2", "--out", tmp_path / "e")
    assert r.exit_code == 0
    assert "warning: temperature 0 with 3 samples per prompt: greedy decoding gives 3 identical samples" in r.output


def _lock(run: Path, pid: int) -> None:
    import socket
    run.mkdir(parents=True, exist_ok=True)
    (run / ".ponder.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))


@row("second-run-same-output-dir")
def test_a_second_run_into_a_busy_output_dir_is_refused(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _lock(tmp_path / "run", other.pid)
        r = cli(*sft_args(tmp_path))
        assert r.exit_code == 2
        assert f"in use by another ponder run (pid {other.pid}, since earlier)" in error_line(r)
        assert not (tmp_path / "run" / "config.yaml").exists()  # the busy directory was not touched
    finally:
        other.kill()
        other.wait()


@row("stale-lock")
def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    _lock(tmp_path / "run", gone.pid)
    r = cli(*sft_args(tmp_path))
    assert r.exit_code == 0, r.output
    assert "warning: taking over the stale lock" in r.output and f"of pid {gone.pid}" in r.output
    assert (tmp_path / "run" / "final" / "config.json").exists()
    assert not (tmp_path / "run" / ".ponder.lock").exists()  # released when the command ends


@row("disk-full-at-checkpoint")
def test_disk_full_at_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from transformers import Trainer
    real, calls = Trainer._save_checkpoint, []

    def save(self, model, trial):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, model, trial)
    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    r = cli(*sft_args(tmp_path, None, "max_steps=3", "save_strategy=steps", "save_steps=1"))
    assert r.exit_code == 2
    run = tmp_path / "run"
    assert re.search(rf"could not write checkpoint-2 to {re.escape(str(run))}: the disk is full; the previous "
                     r"checkpoint checkpoint-1 is intact \(resume with resume_from_checkpoint=last\)", error_line(r))
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-1"] and not (run / ".staging").exists()
    from safetensors.torch import load_file
    assert load_file(run / "checkpoint-1" / "model.safetensors")  # readable, complete
    assert not (run / "final").exists()


@row("disk-full-at-final")
def test_disk_full_at_the_final_save_leaves_no_half_written_model(tmp_path, monkeypatch):
    from ponder.trainers.sft import SFTTrainer

    def save_model(self, output_dir=None, _internal_call=False):
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(SFTTrainer, "save_model", save_model)
    r = cli(*sft_args(tmp_path))
    assert r.exit_code == 2
    assert re.search(r"could not write the final model to .*final: the disk is full", error_line(r))
    assert not [p for p in (tmp_path / "run").iterdir() if "final" in p.name]


@row("ctrl-c")
def test_ctrl_c_exits_with_a_short_message_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    from ponder.trainers.base import PonderTrainer
    real = PonderTrainer.training_step

    def step(self, *a, **kw):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)
    monkeypatch.setattr(PonderTrainer, "training_step", step)
    r = cli(*sft_args(tmp_path, None, "max_steps=4", "save_strategy=steps", "save_steps=1"))
    assert r.exit_code == 130
    assert r.output.strip().splitlines()[-1] == ("interrupted: nothing half-written is left (checkpoints and the final "
                                                 "model are written atomically); resume with "
                                                 "resume_from_checkpoint=last")
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (run / "final").exists() and not (run / ".staging").exists() and not (run / ".ponder.lock").exists()


@row("resume-reports-whole-run-loss")
def test_after_a_resume_metrics_report_the_whole_runs_train_loss(tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [conv(i) for i in range(8)])
    common = ["model=tiny-random", f"dataset={data}", "per_device_train_batch_size=4", "report_to=none",
              "lr_scheduler_type=constant", "learning_rate=0.01", "logging_steps=1"]
    assert cli("sft", *common, "max_steps=4", "save_strategy=no", f"output_dir={tmp_path / 'a'}").exit_code == 0
    assert cli("sft", *common, "max_steps=2", "save_strategy=steps", "save_steps=2",
               f"output_dir={tmp_path / 'b'}").exit_code == 0
    assert cli("sft", *common, "max_steps=4", "save_strategy=steps", "save_steps=2", "resume_from_checkpoint=last",
               f"output_dir={tmp_path / 'b'}").exit_code == 0
    whole = json.loads((tmp_path / "a" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "b" / "metrics.json").read_text())
    steps = [h["loss"] for h in whole["log_history"] if "loss" in h]
    assert len(steps) == 4 and abs(whole["train_loss"] - sum(steps) / 4) < 1e-9
    assert resumed["steps"] == 4 and abs(resumed["train_loss"] - whole["train_loss"]) < 1e-6
    assert abs(sum(steps[2:]) / 2 - whole["train_loss"]) > 1e-3  # the last segment alone would be a different number


# ----------------------------------------------------------------------------------------------------------
# the table and the tests stay in step
# ----------------------------------------------------------------------------------------------------------

def doc_rows() -> list[str]:
    text = (REPO / "docs" / "errors.md").read_text()
    return re.findall(r"^\| `([a-z0-9-]+)` \|", text, re.M)


def test_every_row_is_tested():
    rows = doc_rows()
    assert len(rows) >= 40 and len(rows) == len(set(rows))
    security = set(re.findall(r'@row\("([a-z0-9-]+)"\)', (REPO / "tests" / "test_security.py").read_text()))
    tested = set(CASES) | ROWS | security
    assert set(rows) == tested, (sorted(set(rows) - tested), sorted(tested - set(rows)))


@row("vllm-server-bad-address")
def test_vllm_server_bad_address(monkeypatch):
    monkeypatch.setenv("PONDER_VLLM_SERVER", "localhost:8000")
    r = cli("latro", "rollout_backend=vllm-server")
    assert r.exit_code == 2 and re.search(r"PONDER_VLLM_SERVER must be an http\(s\) URL such as http://127\.0\.0\.1:8000, "
                                          r"got 'localhost:8000'", error_line(r)), r.output
