"""`ponder experiment`: arms over seeds, resumable per (arm, seed), a results table with claims and verdicts."""

import json

from typer.testing import CliRunner

from ponder.cli import app
from ponder.recipes import experiment


def test_experiment_runs_arms_over_seeds_and_writes_claims(tmp_path, monkeypatch):
    calls = []

    def fake(config, overrides, seed, out, after):   # a run kind whose numbers we know
        calls.append((overrides["shift"], seed))
        return {"m": {"acc": 0.3 + overrides["shift"] + 0.01 * seed}}

    monkeypatch.setitem(experiment.RUNS, "fake", fake)
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: toy\nseeds: [0, 1, 2]\nmetrics: [acc]\narms:\n"
                    "  a: {run: fake, overrides: {shift: 0.1}}\n  b: {run: fake, overrides: {shift: 0.0}}\n"
                    "claims:\n  - {claim: a beats b, left: 'a/m:acc', op: '>', right: 'b/m:acc'}\n"
                    "  - {claim: b beats a, left: 'b/m:acc', right: 'a/m:acc'}\n")
    r = CliRunner().invoke(app, ["experiment", str(spec)])
    assert r.exit_code == 0, r.output
    assert len(calls) == 6
    res = json.loads((tmp_path / "runs/experiments/toy/results.json").read_text())
    ab, ba = res["claims"]
    assert abs(ab["diff"]["mean"] - 0.1) < 1e-12 and ab["verdict"] == "yes"   # constant difference: se 0
    assert ba["verdict"] == "opposite"
    md = (tmp_path / "docs/results/toy.md").read_text()
    assert "| a/m | 41.0 ± 0.6 |" in md and "**yes**" in md and (tmp_path / "docs/results/toy.png").exists()
    # finished (arm, seed) runs are not repeated
    r = CliRunner().invoke(app, ["experiment", str(spec)])
    assert r.exit_code == 0 and len(calls) == 6


def test_bad_spec_is_one_line(tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: toy\nseeds: [0]\nmetrics: [acc]\narms:\n  a: {run: nope}\n")
    r = CliRunner().invoke(app, ["experiment", str(spec)])
    assert r.exit_code == 2 and "arms.a.run must be one of" in r.output
