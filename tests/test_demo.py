"""`ponder demo` in a reduced mode: seconds, real numbers, the report's structure."""

import json

from typer.testing import CliRunner

from ponder.cli import app


def test_demo_reduced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["demo", "--n", "8"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "runs/demo/metrics.json").read_text())
    assert m["eval"]["n"] == 8 and 0 <= m["eval"]["greedy_accuracy"] <= 1
    report = (tmp_path / "runs/demo/report.md").read_text()
    assert report.startswith("# ponder demo") and "| greedy_accuracy |" in report
