"""Reports after training: `ponder report` keeps each method's own tables, every number in them is right or shown
as undefined ("—"), plots have fixed labelled axes, `--help` lists the config, skipped input is counted."""

import json
import warnings

import pytest
from typer.testing import CliRunner

from ponder import metrics, ui
from ponder.cli import app

runner = CliRunner()
COMMON = ["model=tiny-random", "report_to=none", "save_strategy=no", "seed=0"]


def _run(args, out):
    r = runner.invoke(app, [*args, f"output_dir={out}"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def rise_run(tmp_path_factory):
    return _run(["rise", *COMMON, "dataset=testbed", "n_train=2", "collect_turns=1", "samples=[1]",
                 "max_new_tokens=4", "max_steps=1", "per_device_train_batch_size=2", "n_eval=3",
                 "eval_turns=2", "eval_parallel=2"], tmp_path_factory.mktemp("rise") / "run")


@pytest.fixture(scope="module")
def latro_run(tmp_path_factory):
    return _run(["latro", *COMMON, "dataset=testbed", "n_train=2", "num_generations=2", "max_steps=2",
                 "per_device_train_batch_size=4", "max_new_tokens=4", "n_eval=4", "eval_samples=2",
                 "eval_max_new_tokens=4", "logging_steps=1"], tmp_path_factory.mktemp("latro") / "run")


def test_report_rebuilds_rise_tables(rise_run):
    before = (rise_run / "report.md").read_text()
    for title in ("## Evaluation (%)", "## Accuracy (%) at each turn", "## Self-correction diagnostics",
                  "## Iteration 1", "accuracy_by_turn.png"):
        assert title in before, title
    r = runner.invoke(app, ["report", str(rise_run)])
    assert r.exit_code == 0, r.output
    assert (rise_run / "report.md").read_text() == before


def test_report_rebuilds_latro_sections_and_counts_eval_problems(latro_run):
    before = (latro_run / "report.md").read_text()
    assert "## Held-out evaluation (%), 4 problems" in before and "latro.png" in before
    r = runner.invoke(app, ["report", str(latro_run)])
    assert r.exit_code == 0, r.output
    assert (latro_run / "report.md").read_text() == before
    m = json.loads((latro_run / "metrics.json").read_text())
    assert m["data"]["eval"]["problems"] == 4  # was data.train.eval_problems: 0
    assert "eval_problems" not in m["data"]["train"]
    assert "| data.eval.problems | 4 |" in before


def test_report_never_overwrites_a_report_it_cannot_rebuild(tmp_path):
    (tmp_path / "report.md").write_text("# a method's own report\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"train_loss": 1.5, "data": {"train": {"examples": 3}}}))
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "report.md").read_text() == "# a method's own report\n"
    assert "| data.train.examples | 3 |" in (tmp_path / "summary.md").read_text()


# ---- numbers ------------------------------------------------------------------------------------------------


def test_rate_after_a_correct_turn_is_undefined_without_one():
    # two problems, never correct: no turn follows a correct one
    recs = [{"answers": ["1", "2", "2"], "correct": [False, False, False]},
            {"answers": [None, "5", "6"], "correct": [False, False, False]}]
    t = metrics.transitions(recs)
    assert t["right_after_right"] is None                        # was 0.0
    assert t["right_after_wrong"] == 0.0 and t["changed_answer_rate"] == 0.75
    assert t["repeats_shown_wrong"] == pytest.approx(1 / 3)      # shown 1, 2, 5: repeated 2 once
    one_turn = metrics.transitions([{"answers": ["1"], "correct": [True]}])
    assert set(one_turn.values()) == {None}
    assert ui.fmt(None) == ui.fmt(float("nan")) == "—"


def test_rise_report_shows_undefined_rates_as_a_dash(rise_run):
    evals = json.loads((rise_run / "metrics.json").read_text())["evals"]
    text = (rise_run / "report.md").read_text()
    diag = text.split("## Self-correction diagnostics")[1].split("##")[0]
    for name, r in evals.items():
        row = next(line for line in diag.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        keys = ["right_after_wrong", "right_after_right", "repeats_shown_wrong", "fresh_gives_shown_wrong"]
        for key, cell in zip(keys, cells):
            v = r.get(key)
            assert cell == ("—" if v is None else f"{100 * v:.1f}") if key in r else cell == "-"


def test_distinct_answers_leave_out_samples_and_problems_without_an_answer():
    from ponder.ssft import distinct_answers
    groups = [[{"answer": None}, {"answer": None}], [{"answer": "3"}, {"answer": "4"}, {"answer": None}],
              [{"answer": "5"}, {"answer": "5"}]]
    assert distinct_answers(groups) == 1.5  # (2 + 1) / 2 problems with an answer; was (0 + 2 + 1) / 3 = 1.0
    assert distinct_answers([[{"answer": None}]]) is None


def test_gfpo_tag_table_shows_small_probabilities():
    from ponder.recipes.ssft import tag_distribution_rows
    rows = tag_distribution_rows([2.5e-6, 1e-7], [3.1e-5, 4e-7], ["<think1>", "<think2>"])
    assert rows[0] == ["`<think1>`", "2.5e-06", "3.1e-05"]  # was 0.000 / 0.000 (rounded to 4 decimals)
    assert rows[-1] == ["all tags", "2.6e-06", "3.14e-05"]
    assert tag_distribution_rows(None, [0.5, 0.5], ["a", "b"])[0] == ["`a`", "—", "0.5"]


def test_onepass_tokens_forwarded_counts_the_steps_run(tmp_path):
    import random

    from ponder import testbed
    from ponder.trainers.onepass import OnePassConfig, OnePassTrainer
    rng = random.Random(0)
    convs = [testbed.multi_turn(testbed.sample_problem(rng), rng, turns=2) for _ in range(12)]
    cfg = OnePassConfig(model="tiny-random", output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                        report_to=[], save_strategy="no", train_sampling_strategy="sequential", seed=0)
    tr = OnePassTrainer(args=cfg, train_dataset=convs)
    tr.train()
    s = tr.data_stats["train"]
    # 2 steps x 2 conversations, in order: exactly the first four laid-out examples' tokens
    assert s["tokens_forwarded"] == sum(tr.train_dataset[i]["tokens"] for i in range(4))
    assert s["dataset_tokens"] == sum(ex["tokens"] for ex in tr.train_dataset) > s["tokens_forwarded"]


# ---- plots --------------------------------------------------------------------------------------------------


def test_accuracy_by_turn_axis_is_0_to_100_percent_for_all_zero_data(tmp_path):
    from ponder.recipes.report import plot_by_turn
    zero = {"accuracy_by_turn": [0.0, 0.0], "majority_by_turn": [0.0, 0.0], "pass_by_turn": [0.0, 0.0],
            "m2@t1": 0.0, "p2@t1": 0.0}
    fig = plot_by_turn({"base": zero}, tmp_path / "a.png")
    assert (tmp_path / "a.png").exists()
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert lo >= -5 and hi >= 100  # was ±1e-17 with negative tick labels
        assert min(ax.get_yticks()) >= 0 and max(ax.get_yticks()) == 100
    assert fig.axes[0].get_ylabel() == "% of problems"


def test_latro_plot_has_integer_steps_and_both_accuracy_markers():
    from ponder.recipes.latro import PLOTS, figure
    hist = [{"step": s, "reward": -s / 3, "kl": 0.1 * s, "advantage_std": 0.5} for s in (1, 2, 3)]
    hist += [{"step": s, "eval_greedy_accuracy": 0.25, "eval_maj@2": 0.25} for s in (0, 3)]
    fig = figure(hist)
    for ax in fig.axes:
        ax.figure.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    acc = fig.axes[[k for k, _ in PLOTS].index("eval_greedy_accuracy")]
    lines = {line.get_label(): line for line in acc.get_lines()}
    greedy, maj = lines["greedy"], lines["maj@2"]
    assert list(greedy.get_ydata()) == [25.0, 25.0]  # percentages
    assert greedy.get_zorder() > maj.get_zorder() and maj.get_markerfacecolor() == "none"
    assert maj.get_markersize() > greedy.get_markersize()  # the hollow square rings the dot: both visible
    assert acc.get_ylim() == (-2, 102)


# ---- help, warnings ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sft", "rise", "gfpo"])
def test_method_help_lists_config_fields(method):
    r = runner.invoke(app, [method, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "Config fields" in r.output and "TrainingArguments" in r.output
    assert "learning_rate: float = 5e-05" in r.output
    if method == "rise":
        assert "eval_turns: int = 5" in r.output and "sequential turns" in r.output
        heads = [r.output.index(f"\n{h}") for h in ("RISERunConfig:", "RISEConfig:", "PonderConfig:",
                                                    "TrainingArguments:")]
        assert heads == sorted(heads)  # the method's own group first, TrainingArguments last
    if method == "gfpo":
        assert "eval_per_tag: int = 2" in r.output and "samples per tag" in r.output
    if method == "sft":
        assert "lora: dict | None = None" in r.output and "PEFT LoRA options" in r.output


def test_gradient_checkpointing_warning_is_filtered_and_others_are_not():
    from ponder.cli import quiet_library_warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_warnings()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
                      "`is_activation_checkpointing` instead.", FutureWarning, stacklevel=2)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=2)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
