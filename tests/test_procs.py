"""Several processes: every trainer and recipe run under ``accelerate launch --config_file
configs/accelerate/cpu.yaml`` (2 processes on CPU, gloo; `ponder.trainers.base.cpu_processes`) equals a
single-process run of the same global batch (2 processes x 1 micro-batch against 1 process x 2 accumulated
micro-batches): the same losses at every step and the same final weights; RL groups stay whole on one process (a GFPO question's G rollouts are made in one training
step of one process); RISE collection and evaluation are split across the processes without a duplicate or a
loss and their metrics computed once; only rank 0 writes a run's files.

All 2-process runs share ONE launch (tests/launch_runs.py: the imports are paid once); the single-process
references run here meanwhile. The runs are fp64 with an fp64 RMSNorm (tests/exact.py): the two add the same
per-example gradients in another order, and in fp32 AdamW amplifies that rounding to ~lr on some CPUs (1e-5 on an
Intel AVX-512 box, 0.0 on others), so a tolerance read off one machine failed on another; the fp64 tolerance is
derived from the arithmetic (tests/exact.py) and holds on any CPU.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ponder import models
from ponder.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from exact import LOSS_RTOL, WEIGHT_ATOL, exact_norm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATOL = WEIGHT_ATOL  # final weights after a few AdamW steps (lr 1e-2), 2 processes vs 1
RTOL = LOSS_RTOL    # per-step losses (relative)


def launch_cmd(port: int) -> list[str]:
    """`accelerate launch` with the shipped CPU config (configs/accelerate/cpu.yaml: 2 processes)."""
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "cpu.yaml"), "--main_process_port", str(port)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PONDER_QUIET="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def conversations(path: Path, n: int = 16) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"{i}+{i * 3 % 7}=?"},
                          {"role": "assistant", "reasoning": f"{i} plus {i * 3 % 7}",
                           "content": f"The answer is {i + i * 3 % 7}."},
                          {"role": "user", "content": "and times two?"},
                          {"role": "assistant", "reasoning": "double it", "content": "x" * (i % 5 + 1)}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def problems(path: Path, n: int = 16) -> Path:
    """Problems a random model sometimes solves (a one-digit answer, the gsm8k verifier takes the last number of
    the text), so RL groups have rewards that differ and gradients that do not vanish."""
    path.write_text("".join(json.dumps({"id": f"p{i}", "question": f"{i} + {i} mod 10 = ?", "answer": str(2 * i % 10),
                                        "meta": {"verifier": "gsm8k"}}) + "\n" for i in range(n)))
    return path


TRAIN = ["model=tiny-random", "dtype=float64", "learning_rate=0.01", "warmup_steps=0", "report_to=none", "save_strategy=no",
         "per_device_train_batch_size=2", "seed=3", "logging_steps=1"]


def runs(data: Path, probs: Path) -> dict[str, tuple[list[list[str]], list[str] | None]]:
    """name -> (the commands of the 2-process run, each getting `output_dir=<2p>/<name>`; the single-process
    reference, run with `output_dir=<1p>/<name> gradient_accumulation_steps=2`: the same global batch)."""
    sft = ["sft", *TRAIN, f"dataset={data}"]
    constant = [*sft, "lr_scheduler_type=constant", "save_strategy=steps", "save_steps=2"]
    one = {
        # checkpoints written by both processes (each its RNG state) between barriers; logging every 3rd of 4
        # steps: the last step's loss is not logged before the end (train_loss must still be the whole run's)
        "sft": [*sft, "max_steps=4", "logging_steps=3", "save_strategy=steps", "save_steps=2"],
        "onepass": ["onepass", *TRAIN, f"dataset={data}", "max_steps=3"],
        "ssft": ["ssft", *TRAIN, "dataset=testbed:traces", "n_train=8", "num_tags=4", "max_steps=2",
                 "n_eval=2", "eval_max_new_tokens=6", "eval_per_tag=1"],
        "gfpo": ["gfpo", *TRAIN, f"dataset={probs}", "n_train=8", "num_tags=4", "num_generations=4",
                 "max_new_tokens=12", "max_steps=2", "n_eval=0", "tags_only=true", "tag_policy=tags"],
        # RISE: collection and evaluation in work units of 2 problems (the same units and seeds however many
        # processes), training on the gathered trajectories (8: a whole number of global batches of 4, else the
        # 2-process data loader repeats examples to fill its last batch, as accelerate does, and the runs differ)
        "rise": ["rise", *TRAIN, f"dataset={probs}", "n_train=8", "collect_turns=2", "samples=[1,2]",
                 "max_steps=2", "n_eval=6", "eval_turns=2", "eval_parallel=2", "max_new_tokens=6",
                 "unit_size=2", "criteria=all"],
        # LaTRO: 4 questions x K=4 a global batch, 2 steps = 2 epochs (the group sampler's order per epoch)
        "latro": ["latro", *TRAIN, f"dataset={probs}", "n_train=4", "num_generations=4",
                  "per_device_train_batch_size=8", "max_new_tokens=8", "max_steps=2", "n_eval=5",
                  "eval_samples=2", "eval_max_new_tokens=6", "beta=0.1"],
        # multi-turn retry RL: 4 problems x G = 2 episodes of up to 2 attempts a global batch, one tree each
        "retry": ["retry", *TRAIN, f"dataset={probs}", "n_train=8", "num_generations=4", "max_turns=2",
                  "max_new_tokens=12", "max_steps=2", "beta=0.1", "n_eval=4", "eval_turns=2",
                  "eval_parallel=2", "unit_size=2"],
        # stopped after 2 of 4 steps, resumed by 2 processes from checkpoint-2 (constant learning rate, so the
        # 2-step run's schedule is the 4-step run's)
        "resumed": [*constant, "max_steps=4"],
    }
    out = {name: ([a], a) for name, a in one.items()}
    out["resumed"] = ([[*constant, "max_steps=2"], [*constant, "max_steps=4", "resume_from_checkpoint=last"]],
                      one["resumed"])
    out["eval"] = ([["eval", "--model", "tiny-random", "--task", str(probs), "--n", "7", "--samples", "2",
                     "--max-new-tokens", "6"]], None)
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """Launch the 2-process runs, run the single-process references meanwhile, wait; (dir 1p, dir 2p, log dir)."""
    tmp = tmp_path_factory.mktemp("procs")
    one, two, log = tmp / "1p", tmp / "2p", tmp / "log"
    todo = runs(conversations(tmp / "convs.jsonl"), problems(tmp / "problems.jsonl"))
    out = {n: ["--out", str(two / n)] if cmds[0][0] == "eval" else [f"output_dir={two / n}"]
           for n, (cmds, _) in todo.items()}
    (tmp / "runs.json").write_text(json.dumps([[*c, *out[n]] for n, (cmds, _) in todo.items() for c in cmds]))
    t = time.time()
    with exact_norm():  # here and (PONDER_TEST_EXACT_NORM) in the launched processes
        proc = subprocess.Popen([*launch_cmd(free_port()), str(ROOT / "tests" / "launch_runs.py"),
                                 str(tmp / "runs.json"), str(log)], env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            for name, (_, ref) in todo.items():
                if ref is not None:
                    r = CliRunner().invoke(app, [*ref, f"output_dir={one / name}", "gradient_accumulation_steps=2"])
                    assert r.exit_code == 0, f"{name}: {r.output}"
            output, _ = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    print(f"2-process launch + references: {time.time() - t:.0f} s")
    assert proc.returncode == 0, output[-4000:]
    return one, two, log


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff <= ATOL, f"final weights differ by {diff:.3g} (> {ATOL})"
    return diff


def losses(run: Path, key: str = "loss") -> list[float]:
    return [h[key] for h in json.loads((run / "metrics.json").read_text())["log_history"] if key in h]


def moved(run: Path) -> None:
    """The reference run's gradients were not all zero (else equal weights would prove nothing)."""
    norms = losses(run, "grad_norm")
    assert norms and max(norms) > 1e-3, norms


def assert_close(a, b, what: str) -> None:
    assert len(a) == len(b) and a, f"{what}: {a} vs {b}"
    for x, y in zip(a, b):
        assert abs(x - y) <= RTOL * max(1.0, abs(y)), f"{what}: {a} vs {b}"


def only_rank0_wrote(log: Path, out: Path) -> None:
    """Rank 1 opened no file for writing inside the runs, but its RNG state in a checkpoint's staging folder."""
    mine = [p for p in (log / "writes-1.txt").read_text().split() if str(out) in p and "rng_state_1.pth" not in p]
    assert not mine, mine[:5]
    assert any(str(out) in p for p in (log / "writes-0.txt").read_text().split())


def test_launch_ran_every_run_on_both_ranks(both):
    _, two, log = both
    for r in (0, 1):
        assert json.loads((log / f"exit-{r}.json").read_text()) == [0] * 10
    only_rank0_wrote(log, two)


@pytest.mark.parametrize("name", ["sft", "onepass"])
def test_sft_and_onepass_match_one_process(both, name):
    one, two, _ = both
    assert_close(losses(two / name), losses(one / name), f"{name} losses")
    assert_close(losses(two / name, "train_loss"), losses(one / name, "train_loss"), f"{name} train_loss")
    m1, m2 = (json.loads((d / name / "metrics.json").read_text()) for d in (one, two))
    assert m2["steps"] == m1["steps"] and m2["data"] == m1["data"]
    moved(one / name)
    assert_same_weights(one / name, two / name)


def test_ssft_matches_one_process_and_counts_every_assignment(both):
    one, two, _ = both
    assert_close(losses(two / "ssft"), losses(one / "ssft"), "ssft losses")
    moved(one / "ssft")
    assert_same_weights(one / "ssft", two / "ssft")
    m1, m2 = (json.loads((d / "ssft" / "matching.json").read_text()) for d in (one, two))
    # every question of both processes counted once, in the one-process order: the same statistics
    assert m2["totals"] == m1["totals"] and sum(map(sum, m2["totals"].values())) == 2 * 4 * 4  # steps x questions x traces
    assert [{k: v for k, v in h.items() if k != "counts"} for h in m2["history"]] == \
        [{k: v for k, v in h.items() if k != "counts"} for h in m1["history"]]


def test_gfpo_matches_one_process(both):
    """Rollout and tag seeds are functions of (seed, step, slot): the 2-process run samples exactly what the
    accumulating single process samples, so losses, rewards and weights agree; the reward statistics are
    gathered over both processes' groups (frac_reward_zero_std counts groups of G)."""
    one, two, _ = both
    assert_close(losses(two / "gfpo"), losses(one / "gfpo"), "gfpo losses")
    for key in ("reward", "frac_reward_zero_std", "completion_tokens", "tag_entropy"):
        assert_close(losses(two / "gfpo", key), losses(one / "gfpo", key), f"gfpo {key}")
    assert min(losses(one / "gfpo", "frac_reward_zero_std")) < 1  # some group has rewards that differ
    moved(one / "gfpo")
    assert_same_weights(one / "gfpo", two / "gfpo")


def test_latro_matches_one_process(both):
    """Each micro-batch's K rationales per question sampled with its slot's seed, the update's rewards and RLOO
    advantages over both processes' rollouts: the losses, reward statistics and weights of one process; the
    held-out evaluation split between the processes, each problem once."""
    one, two, _ = both
    assert_close(losses(two / "latro"), losses(one / "latro"), "latro losses")
    for key in ("reward", "reward_total", "kl", "advantage_std", "rationale_length", "rollout_tokens"):
        assert_close(losses(two / "latro", key), losses(one / "latro", key), f"latro {key}")
    moved(one / "latro")
    assert_same_weights(one / "latro", two / "latro")
    m = json.loads((two / "latro" / "metrics.json").read_text())
    assert m["steps"] == 2 and m["final_eval"]["step"] == 2 and "eval_greedy_accuracy" in m["final_eval"]


def test_rise_recipe_matches_one_process(both):
    """Collection and evaluation in work units split between the processes: the same trajectories (each
    problem once, in order), the same evaluation records and metrics, the same trained model."""
    one, two, _ = both
    t1, t2 = ((d / "rise" / "iter-1" / "trajectories.jsonl").read_text().splitlines() for d in (one, two))
    assert len(t2) == 8 and len({json.loads(x)["id"] for x in t2}) == 8 and t2 == t1
    for name in ("base", "iter-1"):
        e1, e2 = ((d / "rise" / "eval" / f"{name}.jsonl").read_text().splitlines() for d in (one, two))
        assert len(e2) == 6 and len({json.loads(x)["id"] for x in e2}) == 6
        if name == "base":
            assert e2 == e1
    m1, m2 = (json.loads((d / "rise" / "metrics.json").read_text()) for d in (one, two))
    assert m2["evals"]["base"] == m1["evals"]["base"] and m2["evals"]["base"]["n"] == 6
    assert m2["iterations"][0]["steps"] == 2
    assert abs(m2["iterations"][0]["train_loss"] - m1["iterations"][0]["train_loss"]) <= RTOL * 10
    start = models.load("tiny-random")[0].state_dict()
    assert max(float((w - start[k]).abs().max()) for k, w in weights(one / "rise" / "iter-1").items()) > 1e-3
    assert_same_weights(one / "rise" / "iter-1", two / "rise" / "iter-1")


def test_retry_matches_one_process(both):
    """Each micro-batch's episodes sampled with its slot's seed, per-turn advantages within each problem's
    group (whole on one process): the losses and weights of one process; base and trained evaluations split
    between the processes and gathered (the same metrics)."""
    one, two, _ = both
    m1, m2 = (json.loads((d / "retry" / "metrics.json").read_text()) for d in (one, two))
    h1, h2 = m1["train"]["log_history"], m2["train"]["log_history"]
    assert_close([h["loss"] for h in h2 if "loss" in h], [h["loss"] for h in h1 if "loss" in h], "retry losses")
    assert max(h["grad_norm"] for h in h1 if "grad_norm" in h) > 1e-3  # it moved: equal weights mean something
    assert_same_weights(one / "retry", two / "retry")
    assert m2["evals"]["base"] == m1["evals"]["base"] and m2["evals"]["base"]["n"] == 4


def test_checkpoints_hold_every_process_state_and_a_resume_by_two_processes_is_exact(both):
    """Both processes wrote their RNG state into the staged checkpoint before rank 0 renamed it; a 2-process run
    stopped at step 2 and resumed from checkpoint-2 ends where one uninterrupted process ends."""
    one, two, _ = both
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        files = {p.name for p in (two / "sft" / ckpt).iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "ponder_loss.json"} <= files
    assert not (two / "sft" / ".staging").exists()
    assert json.loads((two / "resumed" / "metrics.json").read_text())["steps"] == 4
    assert_close(losses(two / "resumed", "train_loss")[-1:], losses(one / "resumed", "train_loss")[-1:], "train_loss")
    moved(one / "resumed")
    assert_same_weights(one / "resumed", two / "resumed")


def test_eval_command_splits_problems_between_processes(both):
    _, two, _ = both
    m = json.loads((two / "eval" / "metrics.json").read_text())
    ids = [json.loads(x)["id"] for x in (two / "eval" / "samples.jsonl").read_text().splitlines()]
    assert m["n"] == 7 and ids == [f"p{i}" for i in range(7)]  # each problem once, in order (units of 4 and 3)


def test_forking_evaluation_is_split_and_written_once(both):
    _, two, _ = both
    e = json.loads((two / "ssft" / "eval.json").read_text())
    recs = [json.loads(x) for x in (two / "ssft" / "eval_samples.jsonl").read_text().splitlines()]
    assert e["n"] == 2 and len(recs) == 2 and len({r["id"] for r in recs}) == 2
    assert all(len(r["forced"]) == 4 and all(len(t) == 1 for t in r["forced"]) for r in recs)


# ---- the real command under `accelerate launch`, killed and resumed (slow: a launch per run) -----------------


def launch(args: list[str], tmp: Path) -> subprocess.Popen:
    """`ponder ARGS` under `accelerate launch` (through tests/launch_runs.py, so the fp64 norm applies)."""
    runs = tmp / f"runs-{time.time_ns()}.json"
    runs.write_text(json.dumps([args]))
    return subprocess.Popen([*launch_cmd(free_port()), str(ROOT / "tests" / "launch_runs.py"), str(runs),
                             str(tmp / "log")], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_process_cli_killed_after_a_checkpoint_and_resumed(tmp_path):
    """`accelerate launch ... -m ponder sft` (2 processes) killed with SIGKILL (the launcher and both workers;
    killing the launcher alone leaves torchrun's workers running, and the resumed run is then refused by the
    output-directory lock) once a checkpoint is in place, resumed by a second 2-process launch with resume_from_checkpoint=last: the
    final weights of one uninterrupted process with the same global batch."""
    import signal

    import psutil
    data = conversations(tmp_path / "c.jsonl", n=64)
    args = ["sft", *TRAIN, f"dataset={data}", "max_steps=200", "save_strategy=steps", "save_steps=4",
            "lr_scheduler_type=constant", "learning_rate=0.001"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    with exact_norm():
        r = CliRunner().invoke(app, [*args, f"output_dir={straight}", "gradient_accumulation_steps=2"])
        assert r.exit_code == 0, r.output
        proc = launch([*args, f"output_dir={killed}"], tmp_path)
    t = time.time()
    while not (killed / "checkpoint-4").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - t < 600
        time.sleep(0.05)
    # torchrun starts each worker in its own session: kill the workers and the launcher (a crash of the machine)
    workers = psutil.Process(proc.pid).children(recursive=True)
    for p in [*workers, psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(workers, timeout=60)
    assert not (killed / "final").exists(), "the run finished before the kill"
    done = sorted(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    with exact_norm():
        resumed = launch([*args, f"output_dir={killed}", "resume_from_checkpoint=last"], tmp_path)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    print(f"killed after checkpoints {done}; resumed from checkpoint-{done[-1]}")
    assert json.loads((killed / "metrics.json").read_text())["steps"] == 200
    assert_same_weights(straight, killed)
