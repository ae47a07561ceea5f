import pytest

from ponder.config import ConfigError, load_config
from ponder.trainers.sft import SFTConfig


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "model: tiny-random\nmax_steps: 5\nlearning_rate: 1e-3\nlora:\n  r: 4\n")
    cfg = load_config(SFTConfig, p, ["max_steps=7", "lora.alpha=8", "output_dir=" + str(tmp_path / "o")])
    assert (cfg.model, cfg.max_steps, cfg.learning_rate, cfg.lora) == ("tiny-random", 7, 1e-3, {"r": 4, "alpha": 8})


def test_unknown_field_names_file_line_and_suggests(tmp_path):
    p = write(tmp_path, "model: tiny-random\n\nlerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: unknown field 'lerning_rate' in SFTConfig "
                                          r"\(did you mean 'learning_rate'\?\)"):
        load_config(SFTConfig, p)
    with pytest.raises(ConfigError, match=r"command line \(max_stepz=3\): unknown field 'max_stepz'"):
        load_config(SFTConfig, None, ["max_stepz=3"])


def test_wrong_type_names_field(tmp_path):
    p = write(tmp_path, "max_steps: lots\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:1: field 'max_steps' must be int, got 'lots'"):
        load_config(SFTConfig, p)


def test_invalid_yaml_names_line(tmp_path):
    p = write(tmp_path, "model: a\nmax_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(SFTConfig, p)


def test_invalid_value_from_post_init(tmp_path):
    p = write(tmp_path, "loss_normalization: per_vibe\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:1: loss_normalization must be one of tokens, messages"):
        load_config(SFTConfig, p, ["output_dir=" + str(tmp_path)])


def test_override_syntax():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(SFTConfig, None, ["max_steps"])


def test_yes_no_stay_strings(tmp_path):
    p = write(tmp_path, "save_strategy: no\nreport_to: none\nbf16: false\n")
    cfg = load_config(SFTConfig, p, ["eval_strategy=no", "output_dir=" + str(tmp_path)])
    assert cfg.save_strategy == "no" and cfg.eval_strategy == "no" and cfg.bf16 is False


def test_dotted_overrides_reach_only_fields_that_hold_a_mapping(tmp_path):
    cfg = load_config(SFTConfig, None, ["lr_scheduler_kwargs.min_lr=0.1", "lora.r=4", f"output_dir={tmp_path}"])
    assert cfg.lr_scheduler_kwargs == {"min_lr": 0.1} and cfg.lora == {"r": 4}  # dict | str, dict | None
    with pytest.raises(ConfigError, match=r"field 'max_steps' is not a mapping"):
        load_config(SFTConfig, None, ["max_steps.x=1"])


# Old field names: each loads (YAML, command line, constructor) into the new field, with a one-line notice.
ALIAS_CASES = [
    ("ponder.trainers.ssft", "SSFTConfig", "dataset_size", "n_train", 7),
    ("ponder.trainers.gfpo", "GFPOConfig", "dataset_size", "n_train", 7),
    ("ponder.recipes.rise", "RISERunConfig", "train_problems", "n_train", 7),
    ("ponder.recipes.rise", "RISERunConfig", "task", "dataset", "rg:leg_counting"),
    ("ponder.recipes.rise", "RISERunConfig", "eval_problems", "n_eval", 7),
    ("ponder.recipes.rise", "RISERunConfig", "generation_batch_size", "rollout_batch_size", 7),
    ("ponder.trainers.retry", "RetryConfig", "eval_task", "eval_dataset", "testbed:words"),
    ("ponder.trainers.retry", "RetryConfig", "eval_problems", "n_eval", 7),
    ("ponder.trainers.retry", "RetryConfig", "generation_batch_size", "rollout_batch_size", 7),
    ("ponder.trainers.retry", "RetryConfig", "dataset_seed", "data_seed", 7),
    ("ponder.trainers.ssft", "SSFTConfig", "eval_task", "eval_dataset", "testbed:words"),
    ("ponder.trainers.ssft", "SSFTConfig", "eval_problems", "n_eval", 7),
    ("ponder.trainers.gfpo", "GFPOConfig", "generation_batch_size", "rollout_batch_size", 7),
    ("ponder.trainers.latro", "LaTROConfig", "eval_problems", "eval_dataset", "testbed:words"),  # was a source here
    ("ponder.trainers.latro", "LaTROConfig", "dataset_seed", "data_seed", 7),
    ("ponder.trainers.latro", "LaTROConfig", "max_rationale_length", "max_new_tokens", 7),
]


@pytest.mark.parametrize("module,cls_name,old,new,value", ALIAS_CASES, ids=[f"{c[1]}.{c[2]}" for c in ALIAS_CASES])
def test_old_names_load_with_a_notice(tmp_path, monkeypatch, capsys, module, cls_name, old, new, value):
    import importlib

    from ponder import config

    cls = getattr(importlib.import_module(module), cls_name)
    out = ["output_dir=" + str(tmp_path / "o")]
    notice = f"note: '{old}' is deprecated; use '{new}'\n"
    for build in (lambda: load_config(cls, write(tmp_path, f"{old}: {value}\n"), out),
                  lambda: load_config(cls, None, [f"{old}={value}", *out]),
                  lambda: cls(**{old: value}, output_dir=str(tmp_path / "o"))):
        monkeypatch.setattr(config, "_NOTED", set())
        assert getattr(build(), new) == value
        assert capsys.readouterr().err == notice
    with pytest.raises(ConfigError, match=rf"c\.yaml:1: '{old}' is the old name of '{new}'; give only '{new}'"):
        load_config(cls, write(tmp_path, f"{old}: {value}\n{new}: {value}\n"), out)


def test_configs_are_shallow_and_never_built_on_another_methods():
    """At most two config classes between a method's config and TrainingArguments: the shared groups, and for the
    RISE loop the RISE trainer's own config (RISERunConfig -> RISEConfig -> PonderConfig)."""
    import importlib

    from transformers import TrainingArguments

    from ponder.cli import CONFIGS
    from ponder.trainers.configs import PonderConfig, SamplingConfig, SupervisedConfig
    from ponder.trainers.rise import RISEConfig

    allowed = {PonderConfig, SamplingConfig, SupervisedConfig, RISEConfig}
    for method, (module, name) in CONFIGS.items():
        cls = getattr(importlib.import_module(module), name)
        above = [k for k in cls.__mro__[1:] if issubclass(k, TrainingArguments) and k is not TrainingArguments]
        assert len(above) <= 2 and set(above) <= allowed, (method, above)
