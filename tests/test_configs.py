"""Every shipped config under configs/ parses into its method's config class (fields, types, YAML quirks), and
each method directory has the three scales."""

import json
from importlib import import_module
from pathlib import Path

import pytest
import torch

from ponder.config import load_config

ROOT = Path(__file__).resolve().parents[1] / "configs"
# what `ponder <method> --config` loads: the trainer's config, or the recipe's when it adds recipe settings
CLASSES = {"sft": "ponder.trainers.sft:SFTConfig", "onepass": "ponder.trainers.onepass:OnePassConfig",
           "latro": "ponder.trainers.latro:LaTROConfig",
           "ssft": "ponder.trainers.ssft:SSFTConfig", "gfpo": "ponder.trainers.gfpo:GFPOConfig",
           "rise": "ponder.recipes.rise:RISERunConfig",
           "retry": "ponder.trainers.retry:RetryConfig"}


def config_class(method: str):
    module, name = CLASSES[method].split(":")
    return getattr(import_module(module), name)


METHOD_CONFIGS = sorted(p for p in ROOT.glob("*/*.yaml") if p.parent.name not in ("experiments", "accelerate"))


@pytest.mark.parametrize("path", METHOD_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(path, tmp_path):
    assert path.parent.name in CLASSES, f"{path}: no config class registered for {path.parent.name!r}"
    overrides = [f"output_dir={tmp_path}"]
    if path.stem.endswith("gpu") and "bf16: true" in path.read_text():
        overrides.append("bf16=false")  # TrainingArguments refuses bf16 on a machine without a GPU
    if path.stem.endswith("gpu") and not torch.cuda.is_available():  # FlexAttention cannot train on CPU: refused
        text = path.read_text()
        overrides += ["attention=auto"] * ("attention: flex" in text) + \
            ["attn_implementation=sdpa"] * ("attn_implementation: flex_attention" in text)
    cfg = load_config(config_class(path.parent.name), path, overrides)
    assert cfg.model and cfg.output_dir == str(tmp_path)


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_three_scales(method):
    assert {p.stem for p in (ROOT / method).glob("*.yaml")} >= {"testbed", "smollm2", "gpu"}


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_specs_parse(path):
    """Every experiment spec names known run kinds and method configs that parse, and claims of the right shape."""
    from ponder.recipes import experiment
    spec = experiment.load_spec(path)
    for arm in spec["arms"].values():
        if arm.get("config"):
            assert (ROOT.parent / arm["config"]).exists(), arm["config"]


ACCELERATE = {"cpu": "MULTI_GPU", "ddp": "MULTI_GPU", "fsdp2": "FSDP", "deepspeed-zero2": "DEEPSPEED",
              "deepspeed-zero3": "DEEPSPEED"}


@pytest.mark.parametrize("name", sorted(ACCELERATE))
def test_accelerate_configs_load(name):
    """configs/accelerate/*.yaml load with accelerate's own reader, and every FSDP / DeepSpeed key is an option
    `accelerate launch` knows (the GPU ones are not run here; tests/test_procs.py launches cpu.yaml)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    path = ROOT / "accelerate" / f"{name}.yaml"
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.value == ACCELERATE[name] and cfg.num_processes >= 2
    known = {a.dest for a in launch_command_parser()._actions}
    assert not ({*cfg.fsdp_config, *cfg.deepspeed_config} - known)
    assert name == "cpu" or "not run here" in path.read_text()
    assert {p.stem for p in (ROOT / "accelerate").glob("*.yaml")} == set(ACCELERATE)


@pytest.mark.parametrize("path", sorted(ROOT.glob("experiments/*.yaml")), ids=lambda p: p.name)
def test_experiment_spec_parses(path, tmp_path):
    """Experiment specs (`ponder experiment`): the spec is valid and every arm's config loads with its overrides."""
    from ponder.recipes import experiment
    spec = experiment.load_spec(path)
    for arm, a in spec["arms"].items():
        if a["run"] in ("latro", "sft_gold") and a.get("config"):
            o = {k: v for k, v in a.get("overrides", {}).items() if k not in ("sft", "eval", "gold_strategy")}
            o.update(output_dir=str(tmp_path / arm), model="tiny-random")  # `after` arms get their model later
            over = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in o.items()]
            cfg = load_config(config_class("latro"), ROOT.parent / a["config"], over)
            assert cfg.output_dir == str(tmp_path / arm)
