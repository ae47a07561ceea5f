"""Copy the table of the last `ponder demo` run (runs/demo/summary.md, which names the machine) into README.md
between its demo-table markers: `make readme-demo` runs the demo and then this, so the README's demo table is
always one run's output and never edited by hand. Usage: python scripts/readme-demo.py [RUN_DIR] [README]."""

import sys
from pathlib import Path

START, END = "<!-- demo-table: written by `make readme-demo` -->", "<!-- /demo-table -->"


def main(run_dir: str = "runs/demo", readme: str = "README.md") -> int:
    summary, path = Path(run_dir) / "summary.md", Path(readme)
    if not summary.is_file():
        print(f"error: {summary}: no such file (run `ponder demo` first)", file=sys.stderr)
        return 2
    text = path.read_text(encoding="utf-8")
    if text.count(START) != 1 or text.count(END) != 1:
        print(f"error: {path}: expected one '{START}' and one '{END}' line", file=sys.stderr)
        return 2
    head, rest = text.split(START)
    tail = rest.split(END)[1]
    path.write_text(f"{head}{START}\n{summary.read_text(encoding='utf-8').strip()}\n{END}{tail}", encoding="utf-8")
    print(f"{path}: demo table from {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
