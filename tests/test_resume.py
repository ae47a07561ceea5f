"""Kill and resume: a `ponder` run killed with SIGKILL after a checkpoint (or in the middle of writing one, or
between RISE iterations) and resumed with ``resume_from_checkpoint=last`` ends with the weights of an
uninterrupted run (<= 1e-6; bit-identical here) and the whole run's train_loss — including the RL trainers'
sampling (rollout seeds are functions of (seed, step, slot), not of a consumed RNG stream).

The killed run is the CLI in a child process forked from this one (its imports are already paid). So that the
kill lands where the test means it to, the child pauses at that point (right after checkpoint-N is renamed into
place, or after a checkpoint is written into its staging folder but before the rename, or when RISE starts its
second collection) and says so with a marker file; this process waits for it and for checkpoint-N, then sends
SIGKILL. Resumed and uninterrupted runs run in this process.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer
from typer.testing import CliRunner

from ponder.cli import app
from ponder.recipes import rise as rise_recipe
from ponder.trainers.base import PonderTrainer

TRAIN = ["model=tiny-random", "learning_rate=0.01", "warmup_steps=0", "report_to=none", "logging_steps=1",
         "per_device_train_batch_size=2", "seed=3", "save_strategy=steps"]


def conversations(path: Path, n: int = 8) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"{i}*3=?"},
                          {"role": "assistant", "reasoning": f"three times {i}", "content": f"The answer is {3 * i}."},
                          {"role": "user", "content": "sure?"}, {"role": "assistant", "content": "yes" * (i % 3 + 1)}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def problems(path: Path, n: int = 8) -> Path:
    """One-digit answers scored on the text's last number: a random model sometimes gets them (rewards differ)."""
    path.write_text("".join(json.dumps({"id": f"p{i}", "question": f"{i} + 1 mod 10 = ?", "answer": str((i + 1) % 10),
                                        "meta": {"verifier": "gsm8k"}}) + "\n" for i in range(n)))
    return path


def invoke(args: list[str]) -> None:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output


def _pause(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    time.sleep(3600)


def pause_after_checkpoint(step: int, marker: Path) -> None:
    """In the child: stop right after checkpoint-`step` is in place."""
    orig = PonderTrainer._save_checkpoint

    def hooked(self, model, trial):
        orig(self, model, trial)
        if self.state.global_step == step:
            _pause(marker)
    PonderTrainer._save_checkpoint = hooked


def pause_inside_checkpoint(step: int, marker: Path) -> None:
    """In the child: stop once checkpoint-`step` is fully written into the staging folder, before its rename."""
    orig = Trainer._save_checkpoint

    def hooked(self, model, trial):
        orig(self, model, trial)
        if self.state.global_step == step:
            _pause(marker)
    Trainer._save_checkpoint = hooked


def pause_at_collection(iteration: int, marker: Path) -> None:
    """In the child: stop when the RISE recipe starts collecting for `iteration` (earlier ones finished)."""
    orig, calls = rise_recipe.collect, []

    def hooked(*a, **kw):
        calls.append(1)
        if len(calls) == iteration:
            _pause(marker)
        return orig(*a, **kw)
    rise_recipe.collect = hooked


def kill_during(args: list[str], pause, tmp: Path, expect: Path) -> None:
    """Run `ponder ARGS` in a forked child that pauses at `pause(marker)`; once paused (and `expect` exists),
    SIGKILL it."""
    marker = tmp / f"paused-{time.time_ns()}"
    pid = os.fork()
    if pid == 0:  # the child: the CLI, as `ponder ARGS` would run it
        code = 1
        try:
            torch.set_num_threads(1)  # no OpenMP team inherited across fork
            pause(marker)
            app(args, standalone_mode=False)
            code = 0
        finally:
            os._exit(code)
    t = time.time()
    try:
        while not marker.exists():
            done, status = os.waitpid(pid, os.WNOHANG)
            assert done == 0, f"the run ended (status {status}) before reaching its pause point"
            assert time.time() - t < 600, "the run did not reach its pause point in 10 minutes"
            time.sleep(0.02)
        assert expect.exists(), f"{expect} is not there at the pause point"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def assert_same_final(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff <= 1e-6, f"resumed final weights differ from the uninterrupted run's by {diff:.3g}"


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


CASES = {
    # name: (arguments, pause, the step it pauses at, checkpoint that must exist at the kill)
    "sft": (["sft", "max_steps=4", "save_steps=2"], "after", 2, "checkpoint-2"),
    # killed after the last checkpoint (mid-epoch), before final/ was saved: the resumed run trains no step more
    # (at a constant learning rate one more step would move the weights)
    "sft-last": (["sft", "max_steps=3", "save_steps=3", "lr_scheduler_type=constant"], "after", 3, "checkpoint-3"),
    # killed while checkpoint-4 is half in place (written to .staging, not renamed): resume takes checkpoint-2
    "onepass": (["onepass", "max_steps=6", "save_steps=2"], "inside", 4, ".staging/checkpoint-4"),
    "ssft": (["ssft", "dataset=testbed:traces", "n_train=8", "num_tags=4", "max_steps=4", "save_steps=2",
              "n_eval=0"], "after", 2, "checkpoint-2"),
    "gfpo": (["gfpo", "n_train=8", "num_tags=4", "num_generations=4", "max_new_tokens=12", "max_steps=3",
              "save_steps=1", "n_eval=0", "tags_only=true", "tag_policy=tags"], "after", 1, "checkpoint-1"),
    # LaTRO: the rationales after the resume are sampled with the seeds of their (step, slot); the reference
    # model is the starting model again
    "latro": (["latro", "n_train=4", "num_generations=4", "per_device_train_batch_size=8", "max_new_tokens=8",
               "max_steps=3", "save_steps=1", "n_eval=2", "eval_samples=0", "eval_max_new_tokens=4", "beta=0.1"],
              "after", 1, "checkpoint-1"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kill_after_checkpoint_and_resume(tmp_path, name):
    args, where, step, expect = CASES[name]
    data = conversations(tmp_path / "c.jsonl") if name in ("sft", "sft-last", "onepass") else \
        problems(tmp_path / "p.jsonl")
    args = [args[0], *TRAIN, *args[1:]] + ([f"dataset={data}"] if name != "ssft" else [])  # later wins
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    invoke([*args, f"output_dir={straight}"])
    pause = {"after": pause_after_checkpoint, "inside": pause_inside_checkpoint}[where]
    kill_during([*args, f"output_dir={killed}"], lambda m: pause(step, m), tmp_path, killed / expect)
    assert not (killed / "final").exists() and not (killed / "metrics.json").exists()
    if where == "inside":  # the half-written checkpoint is never taken for a complete one
        from transformers.trainer_utils import get_last_checkpoint
        assert Path(get_last_checkpoint(str(killed))).name == f"checkpoint-{step - 2}"
    invoke([*args, f"output_dir={killed}", "resume_from_checkpoint=last"])
    assert not (killed / ".staging").exists()
    assert_same_final(straight, killed)
    a, b = metrics(straight), metrics(killed)
    assert b["steps"] == a["steps"] and abs(b["train_loss"] - a["train_loss"]) <= 1e-6 * abs(a["train_loss"])
    losses = [[h["loss"] for h in m["log_history"] if "loss" in h] for m in (a, b)]
    assert losses[1][-1] == pytest.approx(losses[0][-1], rel=1e-6)  # the steps after the resume
    if name in ("gfpo", "latro"):  # the resumed run sampled what the uninterrupted one did after the kill
        rewards = [[h["reward"] for h in m["log_history"] if "reward" in h] for m in (a, b)]
        assert rewards[1][-1] == rewards[0][-1] and max(h["grad_norm"] for h in a["log_history"]
                                                        if "grad_norm" in h) > 1e-3


RISE = ["rise", "n_train=4", "collect_turns=2", "samples=[1,2]", "max_steps=2", "save_steps=1",
        "n_eval=4", "eval_turns=2", "eval_parallel=2", "max_new_tokens=6", "iterations=2", "criteria=all"]


@pytest.mark.parametrize("where", ["training", "between_iterations"])
def test_rise_recipe_killed_and_resumed(tmp_path, where):
    """RISE killed inside iteration 1's training (after its checkpoint-1: the trajectories are reused and
    training resumes) or between iterations (iteration 1 finished: its model, trajectories and evaluation are
    reused, iteration 2 runs), then resumed: the same iteration-2 model and the same metrics."""
    args = [*RISE, *TRAIN, f"dataset={problems(tmp_path / 'p.jsonl')}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    invoke([*args, f"output_dir={straight}"])
    if where == "training":
        kill_during([*args, f"output_dir={killed}"], lambda m: pause_after_checkpoint(1, m), tmp_path,
                    killed / "iter-1" / "train" / "checkpoint-1")
        assert not (killed / "iter-1" / "final").exists()
    else:
        kill_during([*args, f"output_dir={killed}"], lambda m: pause_at_collection(2, m), tmp_path,
                    killed / "iter-1" / "iteration.json")
        assert not (killed / "iter-2").exists()
    trajectories = (killed / "iter-1" / "trajectories.jsonl").read_bytes()
    invoke([*args, f"output_dir={killed}", "resume_from_checkpoint=last"])
    assert (killed / "iter-1" / "trajectories.jsonl").read_bytes() == trajectories  # reused, not collected again
    for it in ("iter-1", "iter-2"):
        assert_same_final(straight / it, killed / it)
        assert (killed / it / "trajectories.jsonl").read_text() == (straight / it / "trajectories.jsonl").read_text()
    a, b = metrics(straight), metrics(killed)
    assert b["evals"] == a["evals"] and set(a["evals"]) == {"base", "iter-1", "iter-2"}
    for x, y in zip(a["iterations"], b["iterations"]):
        assert y["steps"] == x["steps"] and y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-6)
    assert (killed / "report.md").exists()
