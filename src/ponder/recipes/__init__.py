"""Recipes: the top layer. Each runs a loop and is the only code that writes `runs/`, reports, plots, or
pre-trains the testbed: one module per method (`run_*`, its report and plots, its `demo`), the testbed build,
`demo`, `report` and the CLI on top of them. Recipes import trainers and components, never the reverse."""
