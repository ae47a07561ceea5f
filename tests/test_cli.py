"""The command line, run in-process on tiny models."""

import json

from typer.testing import CliRunner

from ponder.cli import app


def _bench_runner():
    """bench/run.py (the benchmark runner lives next to the benchmarks, outside the package)."""
    import runpy
    from pathlib import Path
    from types import SimpleNamespace
    return SimpleNamespace(**runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "run.py")))

runner = CliRunner()


def test_eval_writes_metrics(tmp_path):
    r = runner.invoke(app, ["eval", "--model", "tiny-random", "--task", "testbed", "--n", "3", "--samples", "2",
                            "--max-new-tokens", "6", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert {"greedy_accuracy", "pass@1", "pass@2", "maj@2", "n"} <= set(m) and m["n"] == 3
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3


def test_eval_unknown_task_is_a_clear_error(tmp_path):
    r = runner.invoke(app, ["eval", "--model", "tiny-random", "--task", "rg:nope", "--out", str(tmp_path)])
    assert r.exit_code == 2
    assert "unknown task 'rg:nope'" in r.output


def test_sft_from_yaml_with_overrides(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{i}+1=?"},
                          {"role": "assistant", "content": f"The answer is {i + 1}."}]} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: tiny-random\ndataset: {data}\nmax_steps: 2\nper_device_train_batch_size: 4\n"
                   "report_to: none\nsave_strategy: 'no'\n")
    out = tmp_path / "run"
    r = runner.invoke(app, ["sft", "--config", str(cfg), f"output_dir={out}", "learning_rate=0.01"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 2 and m["data"]["train"]["examples"] == 8
    assert (out / "final" / "config.json").exists() and "learning_rate: 0.01" in (out / "config.yaml").read_text()


def test_sft_bad_config_field(tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("model: tiny-random\nmax_step: 2\n")
    r = runner.invoke(app, ["sft", "--config", str(cfg)])
    assert r.exit_code == 2 and "sft.yaml:2: unknown field 'max_step'" in r.output


def test_bench_ratio_lines_parse_with_comments_and_bad_lines_are_kept():
    parse_ratios = _bench_runner().parse_ratios
    out = "x\nRATIO a=1.5\nRATIO b=2.73  # best row_tokens: packed/256\nRATIO c=oops\nRATIO d=\n"
    ratios, bad = parse_ratios(out)
    assert ratios == {"a": 1.5, "b": 2.73}
    assert bad == ["RATIO c=oops", "RATIO d="]


def test_bench_only_replaces_its_section_and_keeps_the_others(tmp_path, monkeypatch):
    run_benchmarks = _bench_runner().run_benchmarks
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench/a.py").write_text("print('RATIO a=1.0')\n")
    (tmp_path / "bench/b.py").write_text("print('RATIO b=2.0')\nraise SystemExit(3)\n")
    out = tmp_path / "bench/results.md"
    assert run_benchmarks([], out) == {"a": 1.0, "b": 2.0}
    text = out.read_text()
    assert "Failed: b" in text and "exit 3" in text and "| a | 1.000 |" in text
    (tmp_path / "bench/a.py").write_text("print('RATIO a=1.5')\n")
    assert run_benchmarks(["a"], out) == {"a": 1.5, "b": 2.0}
    text = out.read_text()
    assert "| a | 1.500 |" in text and "| b | 2.000 |" in text and text.count("## a") == 1
