"""What every recipe shares: writing JSON atomically, the matplotlib backend, and the standard
config -> trainer -> train -> `runs/<name>/` loop of the training sub-commands."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ponder import ui
from ponder.config import load_config, to_yaml


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON atomically (a temporary file renamed into place)."""
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


def resume_arg(cfg):
    """`resume_from_checkpoint: last` (or true) -> the Trainer's True (the newest checkpoint in output_dir)."""
    r = cfg.resume_from_checkpoint
    return True if r in ("last", "true", "True") else r


def start_run(cfg) -> Path:
    """Create the run's output directory and record the config it runs with (``config.yaml``)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    return out


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
    trainer.save_model(str(out / "final"))
    stats = {k: dict(v) for k, v in trainer.data_stats.items()}
    metrics = {"train_loss": result.training_loss, "steps": result.global_step, "seconds": time.time() - t,
               "data": stats, "log_history": trainer.state.log_history}
    write_json(out / "metrics.json", metrics)
    rows = [("steps", result.global_step), ("train loss", result.training_loss),
            ("seconds", metrics["seconds"])] + [(f"data: {k}", v) for k, v in sorted(stats["train"].items())]
    ui.print_table(f"{title}: {cfg.model} on {cfg.dataset}", ["metric", "value"], rows)
    ui.info(f"model: {out / 'final'}   metrics: {out / 'metrics.json'}")
    return metrics, trainer
