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
                    "  - {claim: b beats a, left: 'b/m:acc', right: 'a/m:acc'}\n"
                    "  - {claim: b not below a, left: 'b/m:acc', op: '>=', right: 'a/m:acc', margin: 12.0}\n"
                    "  - {claim: b within 8 of a, left: 'b/m:acc', op: '>=', right: 'a/m:acc', margin: 8}\n")
    r = CliRunner().invoke(app, ["experiment", str(spec)])
    assert r.exit_code == 0, r.output
    assert len(calls) == 6
    res = json.loads((tmp_path / "runs/experiments/toy/results.json").read_text())
    ab, ba, within12, within8 = res["claims"]
    assert abs(ab["diff"]["mean"] - 0.1) < 1e-12 and ab["verdict"] == "yes"   # constant difference: se 0
    assert ba["verdict"] == "opposite"
    # b is 10 points below a: not below within a 12-point margin, below by more than an 8-point one
    assert within12["verdict"] == "yes" and within8["verdict"].startswith("no (below by more than")
    md = (tmp_path / "docs/results/toy.md").read_text()
    assert "`a/m:acc` >= (δ 12) |" in md
    assert "| a/m | 41.0 ± 0.6 |" in md and "**yes**" in md and (tmp_path / "docs/results/toy.png").exists()
    # finished (arm, seed) runs are not repeated
    r = CliRunner().invoke(app, ["experiment", str(spec)])
    assert r.exit_code == 0 and len(calls) == 6


def test_bad_spec_is_one_line(tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: toy\nseeds: [0]\nmetrics: [acc]\narms:\n  a: {run: nope}\n")
    r = CliRunner().invoke(app, ["experiment", str(spec)])
    assert r.exit_code == 2 and "arms.a.run must be one of" in r.output


def test_not_below_claim_needs_a_margin(tmp_path):
    spec = tmp_path / "exp.yaml"
    base = "name: toy\nseeds: [0]\nmetrics: [acc]\narms:\n  a: {run: eval}\n  b: {run: eval}\nclaims:\n"
    for claim, message in (("{claim: c, left: 'a/m:acc', op: '>=', right: 'b/m:acc'}", "needs margin"),
                           ("{claim: c, left: 'a/m:acc', op: '>=', right: 'b/m:acc', margin: 0}", "needs margin"),
                           ("{claim: c, left: 'a/m:acc', op: '>', right: 'b/m:acc', margin: 2}", "'>=' claims only")):
        spec.write_text(base + f"  - {claim}\n")
        r = CliRunner().invoke(app, ["experiment", str(spec)])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_once_arms_curves_and_scales(tmp_path, monkeypatch):
    """A `once` arm runs for the first seed only and is every seed's `after`; curves.json files become a
    mean ± s.e. plot; `scales` shows token counts unscaled."""
    calls = []

    def start(config, overrides, seed, out, after):
        calls.append(("start", seed))
        (out / "final").mkdir(parents=True)
        return {"m": {"acc": 0.1}}

    def learner(config, overrides, seed, out, after):
        calls.append(("learner", seed, str(after["model"])))
        out.mkdir(parents=True, exist_ok=True)
        (out / "curves.json").write_text(json.dumps({"len": [[0, 10 + seed], [5, 20 + seed]]}))
        return {"m": {"acc": 0.2 + 0.01 * seed, "len": 12.5}}

    monkeypatch.setitem(experiment.RUNS, "start", start)
    monkeypatch.setitem(experiment.RUNS, "learner", learner)
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: toy2\nseeds: [3, 4]\nmetrics: [acc, len]\nscales: {len: 1}\ncurves: [len]\narms:\n"
                    "  s: {run: start, once: true}\n  l: {run: learner, after: s}\n")
    r = CliRunner().invoke(app, ["experiment", str(spec)])
    assert r.exit_code == 0, r.output
    start_dir = "runs/experiments/toy2/s/seed-3/final"
    assert calls == [("start", 3), ("learner", 3, start_dir), ("learner", 4, start_dir)]
    md = (tmp_path / "docs/results/toy2.md").read_text()
    assert "| l/m | 23.5 ± 0.5 | 12.5 ± 0.0 |" in md and "| s/m | 10.0 | - |" in md
    assert "toy2-curves.png" in md and (tmp_path / "docs/results/toy2-curves.png").stat().st_size > 5000
    xs, ms, es = experiment.curve_stats(tmp_path / "runs/experiments/toy2", "l", [3, 4], "len")
    assert xs == [0.0, 5.0] and ms == [13.5, 23.5] and abs(es[0] - 0.5) < 1e-12
