"""Run several `ponder` commands one after another in ONE launched process group, so the ~15 s of imports are
paid once: ``accelerate launch --multi_gpu --num_processes 2 tests/launch_runs.py RUNS.json LOG_DIR``.

RUNS.json is a list of argument lists for the `ponder` command (e.g. ``["sft", "-c", "x.yaml", "max_steps=2"]``).
Every process records each file it opens for writing (a Python audit hook) into LOG_DIR/writes-<rank>.txt, so a
test can check that only rank 0 writes a run's files, and each command's exit code into LOG_DIR/exit-<rank>.json.
"""

import json
import os
import sys
from pathlib import Path

RANK = int(os.environ.get("RANK", "0"))


def main(runs_file: str, log_dir: str) -> int:
    log = Path(log_dir)
    log.mkdir(parents=True, exist_ok=True)
    writes = open(log / f"writes-{RANK}.txt", "w")  # noqa: SIM115 (open for the whole run; the hook appends)

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and args[1] and \
                any(c in str(args[1]) for c in "wax+"):
            writes.write(f"{os.fsdecode(args[0])}\n")
            writes.flush()
    sys.addaudithook(audit)

    import typer

    if os.environ.get("PONDER_TEST_EXACT_NORM") == "1":  # fp64 RMSNorm as in the reference process (tests/exact.py)
        sys.path.insert(0, str(Path(__file__).parent))
        from exact import rmsnorm_fp64
        from transformers.models.llama import modeling_llama
        modeling_llama.LlamaRMSNorm.forward = rmsnorm_fp64

    from ponder.cli import app
    codes = []
    for argv in json.loads(Path(runs_file).read_text()):
        try:
            app(argv, standalone_mode=False)
            codes.append(0)
        except typer.Exit as e:
            codes.append(e.exit_code)
        except SystemExit as e:
            codes.append(e.code if isinstance(e.code, int) else 1)
    (log / f"exit-{RANK}.json").write_text(json.dumps(codes))
    return 0 if not any(codes) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
