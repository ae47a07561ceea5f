"""What every recipe shares: writing JSON atomically, the matplotlib backend, one run per output directory
(a lock file naming its pid), the final model written atomically and only when finite, and the standard
config -> trainer -> train -> `runs/<name>/` loop of the training sub-commands."""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ponder import ui
from ponder.config import ConfigError, load_config, to_yaml
from ponder.engine import dist, models
from ponder.engine.data import read_jsonl, write_jsonl
from ponder.methods import stats
from ponder.methods.episodes import Env, eval_metrics, evaluate, headline
from ponder.trainers.base import TrainingStopped, atomic_dir

#: The lock file a run keeps in its output directory while it runs.
LOCK = ".ponder.lock"
_held: dict[Path, int] = {}  # lock path -> how many times this process took it (re-entrant)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON atomically (a temporary file renamed into place); under several processes only rank 0
    writes."""
    if not dist.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (files only; no display on servers or CI)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


DEMO_MARGIN = 0.02  # a demo's "not below" claims: non-inferiority within 2 points, as the experiment specs state


def effect_note(claim: str, a, b, results_md: str, direction: str = ">", margin: float = DEMO_MARGIN) -> str:
    """One line for a demo: the paired difference of `a` and `b` over the run's problems (in points), its 95%
    interval over problems, and a verdict (`stats.verdict`; a '>=' claim is non-inferiority within `margin`,
    a fraction); the multi-seed table that settles the claim is `results_md`."""
    d = stats.paired_items(a, b)
    v = stats.verdict(d, direction, margin if direction == ">=" else None)
    if direction == ">=":
        word = {"yes": f"not below by more than {100 * margin:.0f} points at 95%",
                "no (below by more than δ)": f"below by more than {100 * margin:.0f} points"}.get(
            v, f"not shown: the interval reaches below −{100 * margin:.0f} points")
    else:
        word = {"yes": "appeared", "no effect at 95%": "within noise", "opposite": "the opposite appeared"}.get(v, v)
    return (f"{claim}: {100 * d['mean']:+.1f} points (95% over the {d['n']} problems "
            f"[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]) — {word} in this run. Several seeds: {results_md}.")


def resume_arg(cfg):
    """`resume_from_checkpoint: last` (or true) -> the Trainer's True (the newest checkpoint in output_dir)."""
    r = cfg.resume_from_checkpoint
    return True if r in ("last", "true", "True") else r


def _alive(pid: int) -> bool:
    """Is `pid` a live Python process (a reused pid of some other program does not hold a run)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        return b"python" in Path(f"/proc/{pid}/cmdline").read_bytes() or b"ponder" in \
            Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # no /proc (macOS): trust the pid
        return True


def lock_output_dir(out: Path) -> Path:
    """Make this process the owner of `out` (``out/.ponder.lock`` holds its pid and host). A second run into the
    same directory fails with the owner's pid; a lock left by a process that is gone is taken over (said so).
    Re-entrant within a process; released by `release_locks` (the CLI, after each command) or at exit. Under
    `accelerate launch` only rank 0 takes it: the processes of one run share their output directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out}: is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    path = (out / LOCK).resolve()
    if int(os.environ.get("RANK", "0")) != 0:
        return path
    if path in _held:
        _held[path] += 1
        return path
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            if not isinstance(pid, int):
                if time.time() - path.stat().st_mtime < 5:  # another run is writing it right now
                    raise ConfigError(f"output_dir {out}: another ponder run is starting in it") from None
            elif host != me["host"]:
                raise ConfigError(f"output_dir {out}: in use by a ponder run on host {host} (pid {pid}); wait for "
                                  f"it or choose another output_dir (delete {path} if that run is gone)") from None
            elif pid != me["pid"] and _alive(pid):
                raise ConfigError(f"output_dir {out}: in use by another ponder run (pid {pid}, since "
                                  f"{owner.get('started', '?')}); wait for it to finish or choose another "
                                  "output_dir") from None
            ui.warn(f"taking over the stale lock {path} of pid {pid} (that run is no longer running)")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held[path] = 1
        return path
    raise ConfigError(f"output_dir {out}: could not take the lock {path}")


def release_locks(path: Path | None = None) -> None:
    """Release this process's lock on one output directory (all of them without `path`)."""
    for p in [Path(path) / LOCK] if path is not None else list(_held):
        p = p.resolve()
        if p in _held:
            _held[p] -= 1
            if _held[p] <= 0 or path is None:
                del _held[p]
                p.unlink(missing_ok=True)


atexit.register(release_locks)


def start_run(cfg, write_config: bool = True) -> Path:
    """Take the run's output directory (`lock_output_dir`) and record the config it runs with (``config.yaml``)."""
    out = Path(cfg.output_dir)
    lock_output_dir(out)
    if write_config and dist.is_main():
        (out / "config.yaml").write_text(to_yaml(cfg))
    return out


def save_final(trainer, final: Path) -> None:
    """Save the trained model as `final` atomically (a staging folder renamed into place), and never a model
    holding NaN/inf. A failed write (a full disk) leaves no half-written `final` and says what is intact. Every
    process takes part (FSDP/DeepSpeed gather the weights); rank 0 writes and renames."""
    final = Path(final)
    bad = models.nonfinite_parameters(trainer.model)
    if bad:
        raise TrainingStopped(f"the trained weights hold NaN/inf ({len(bad)} tensors, e.g. {bad[0]}): the run "
                              f"diverged; nothing was saved as {final}")
    with atomic_dir(final, final.with_name(f".{final.name}.staging"), trainer.args.should_save, dist.barrier,
                    f"the final model to {final}", lambda: f"the checkpoints in {final.parent} are intact") as staging:
        trainer.save_model(str(staging))
    dist.barrier()


def run_training(config_cls, trainer_cls, config_path, overrides: list[str], title: str):
    """`ponder <method> -c CONFIG key=value ...` for the plain training commands: see `train`."""
    return train(load_config(config_cls, config_path, overrides), trainer_cls, title)


def train(cfg, trainer_cls, title: str):
    """Config -> trainer -> train -> runs/<name>/{config.yaml, final/, metrics.json} and a summary table.
    Returns (metrics, trainer)."""
    out = start_run(cfg)
    trainer = trainer_cls(args=cfg)
    t = time.time()
    result = trainer.train(resume_from_checkpoint=resume_arg(cfg))
    save_final(trainer, out / "final")
    stats = {k: dict(v) for k, v in trainer.data_stats.items()}
    metrics = {"train_loss": result.training_loss, "steps": result.global_step, "seconds": time.time() - t,
               "data": stats, "log_history": trainer.state.log_history}
    write_json(out / "metrics.json", metrics)
    rows = [("steps", result.global_step), ("train loss", result.training_loss),
            ("seconds", metrics["seconds"])] + [(f"data: {k}", v) for k, v in sorted(stats["train"].items())]
    ui.print_table(f"{title}: {cfg.model} on {cfg.dataset}", ["metric", "value"], rows)
    ui.info(f"model: {out / 'final'}   metrics: {out / 'metrics.json'}")
    return metrics, trainer


def finish_run(out: Path, results: dict[str, Any], t0: float, write_report: Callable[[], Any]) -> dict[str, Any]:
    """A recipe's end: the run's seconds, metrics.json, the report (rank 0) and where they are."""
    results["seconds"] = time.time() - t0
    write_json(out / "metrics.json", results)
    if dist.is_main():
        write_report()
    ui.info(f"report: {out / 'report.md'}   metrics: {out / 'metrics.json'}")
    return results


def episode_eval(model, tok, problems, cfg, name: str, out: Path, resume: bool, progress: bool = True
                 ) -> dict[str, Any]:
    """RISE's sequential + parallel evaluation of one model (`episodes.evaluate` in the config's environment,
    with its ``eval_*`` settings), as the RISE and retry recipes run it: the records written to
    out/eval/<name>.jsonl (rank 0), or read back from there when a resumed run finished it before; the headline
    metrics printed. Returns the metrics."""
    path = out / "eval" / f"{name}.jsonl"
    if resume and path.exists():
        r = eval_metrics([rec for _, rec in read_jsonl(path)], cfg.eval_parallel)
        ui.info(f"[bold]{name}[/]: evaluated before this resume ({path})")
    else:
        ui.info(f"[bold]evaluating {name}[/] on {len(problems)} {cfg.eval_split} problems "
                f"({cfg.eval_turns} sequential turns, {cfg.eval_parallel} parallel samples)")
        env = Env(cfg.reward, cfg.demo, history_reasoning=cfg.history_reasoning)
        r = evaluate(model, tok, problems, env=env, turns=cfg.eval_turns, parallel=cfg.eval_parallel,
                     context_window=cfg.context_window, temperature=cfg.eval_temperature,
                     max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=cfg.rollout_batch_size,
                     progress=progress, unit_size=cfg.unit_size, backend=getattr(cfg, "rollout_backend", "auto"))
        records = r.pop("records")
        if dist.is_main():
            write_jsonl(path, records)
    source = getattr(cfg, "eval_dataset", None) or cfg.dataset
    ui.print_table(f"{name}: {cfg.model} on {source}", ["metric", "value"],
                   headline(r, cfg.eval_turns, cfg.eval_parallel) + [
                       (f"accuracy at turn {k + 1}", a) for k, a in enumerate(r["accuracy_by_turn"])])
    return r
