"""The `ponder` command. Sub-commands import the ML stack lazily (importing it costs ~12 s)."""

from __future__ import annotations

from pathlib import Path

import typer
import typer.core

from ponder.engine import runtime

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Teach language models to reason: SSFT/GFPO, one-pass multi-turn SFT, RISE, LaTRO.")
testbed_app = typer.Typer(no_args_is_help=True, help="The tiny CPU reasoning model ponder pre-trains itself.")
app.add_typer(testbed_app, name="testbed")

CONFIG_HELP = "YAML config file (fields of the method's Config; any TrainingArguments field works)"
OVERRIDES_HELP = "key=value overrides, e.g. max_steps=20 lora.r=8"


def _end_progress_bars() -> None:
    """Close the progress bars an exception left open (transformers' tqdm), so a message starts on its own line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _fail(e: Exception) -> None:
    _end_progress_bars()
    msg = " ".join(str(e).split())  # one line, whatever a library wrote
    typer.secho(f"error: {msg}", err=True, fg="red")
    raise typer.Exit(2)


#: Library warnings a user cannot act on (they name library internals), filtered by message, each alone:
#: transformers 5 warns about `is_gradient_checkpointing` on every LoRA run (PEFT reads the old name).
LIBRARY_WARNINGS = ((FutureWarning, r"`is_gradient_checkpointing` is deprecated"),)


def quiet_library_warnings() -> None:
    """Filter `LIBRARY_WARNINGS` (idempotent: `warnings.filterwarnings` replaces an identical filter)."""
    import warnings
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _guarded(fn):
    """Run a command body: a user mistake (ValueError: bad config, data or settings; OSError: files, disk) is a
    one-line error with exit code 2, Ctrl-C a short message with exit code 130 — never a traceback. Locks on
    output directories are released either way."""
    from ponder.recipes.common import release_locks
    quiet_library_warnings()
    try:
        return fn()
    except (ValueError, OSError) as e:
        _fail(e)
    except KeyboardInterrupt:
        _end_progress_bars()
        typer.secho("interrupted: nothing half-written is left (checkpoints and the final model are written "
                    "atomically); resume with resume_from_checkpoint=last", err=True, fg="yellow")
        raise typer.Exit(130) from None
    finally:
        release_locks()


@app.command("eval")
def eval_cmd(model: str = typer.Option("testbed", help="model spec: testbed | smollm2-135m | tiny-random | path | hub id"),
             task: str = typer.Option("testbed", help="testbed | rg:<task> (or a reasoning-gym name) | file.jsonl | hf:<name>"),
             n: int = typer.Option(200, help="number of problems"),
             samples: int = typer.Option(8, help="samples per problem for pass@k / maj@k (0: greedy only)"),
             temperature: float = typer.Option(1.0, help="sampling temperature"),
             max_new_tokens: int = typer.Option(256),
             batch_size: int = typer.Option(64, help="sequences per generation batch"),
             split: str = typer.Option("test"),
             seed: int = typer.Option(0),
             prompt: str = typer.Option("{question}", help="user message template"),
             task_config: list[str] = typer.Option(None, help="reasoning-gym task option key=value (repeatable)"),
             out: Path = typer.Option(None, help="output directory (default runs/eval-<model>-<task>)"),
             forking: int = typer.Option(None, help="evaluate N forking tokens <think1..N>: Pass@1 with <think1> "
                                                    "and a sampled tag, pass@k, Cons@k, per-tag accuracy/length"),
             per_tag: int = typer.Option(2, help="--forking: samples per tag (k = N * per_tag)"),
             tags: str = typer.Option(None, help="--forking: comma-separated tags instead of <think1..N> "
                                                 "(e.g. '<think>' for an SFT-mixed model)"),
             group_size: int = typer.Option(None, help="--forking: Cons@G groups of G samples (default: the "
                                                       "number of tags)"),
             trust_remote_code: bool = typer.Option(False, help="run Python code the model folder ships (custom "
                                                                "modelling); off unless you set it")):
    """Greedy accuracy, pass@k and maj@k of a model on a task; prints a table and writes metrics.json.
    With --forking N: the forking-token diversity evaluation (report.md with per-tag plots)."""
    if forking is not None or tags:
        from ponder.methods.ssft import forking_tags
        from ponder.recipes.ssft import evaluate_forking_run

        def forking_eval():
            tag_list = [t.strip() for t in tags.split(",")] if tags else forking_tags(forking)
            dest = out or Path("runs") / f"eval-forking-{Path(model).name}-{task.replace(':', '_').replace('/', '_')}"
            evaluate_forking_run(model, tag_list, dest, task, n, per_tag, temperature, max_new_tokens,
                                 f"forking eval of {model}", seed=seed, group_size=group_size)
        return _guarded(forking_eval)
    _guarded(lambda: _eval(model, task, n, samples, temperature, max_new_tokens, batch_size, split, seed, prompt,
                           task_config, out, trust_remote_code))


def _eval(model, task, n, samples, temperature, max_new_tokens, batch_size, split, seed, prompt, task_config, out,
          trust_remote_code):
    from ponder import ui
    from ponder.config import parse_override
    from ponder.engine import data, dist, models, prompts
    from ponder.methods import metrics
    from ponder.recipes.common import lock_output_dir, write_json
    prompts.check_template(prompt, ("question",), "--prompt")
    if n < 1 or samples < 0 or max_new_tokens < 1 or batch_size < 1 or temperature < 0:
        raise ValueError("--n, --max-new-tokens and --batch-size must be >= 1, --samples and --temperature >= 0")
    opts = {k[0]: v for k, v in (parse_override(x) for x in task_config or [])}
    problems = data.load_problems(task, n=n, split=split, seed=seed, **opts)
    m, tok = models.load(model, trust_remote_code=trust_remote_code)
    out = out or Path("runs") / f"eval-{Path(model).name}-{task.replace(':', '_').replace('/', '_')}"
    lock_output_dir(out)
    r = metrics.evaluate(m, tok, problems, samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, seed=seed, prompt=prompt)
    records = r.pop("records")
    summary = {"model": model, "task": task, "task_config": task_config or [], "split": split,
               "temperature": temperature, **r}
    write_json(out / "metrics.json", summary)  # atomic: Ctrl-C never leaves half a file
    if dist.is_main():  # several processes: each sampled its share of the problems; rank 0 writes
        data.write_jsonl(out / "samples.jsonl", records)
    ui.print_table(f"{model} on {task} ({r['n']} problems)", ["metric", "value"],
                   [(k, v) for k, v in r.items() if k not in ("n", "skipped_too_long")])
    if r.get("skipped_too_long"):
        ui.warn(f"skipped {r['skipped_too_long']} of {r['n'] + r['skipped_too_long']} problems whose prompt plus "
                f"--max-new-tokens {max_new_tokens} does not fit the model's context ({models.context_length(m)} "
                "tokens); the metrics are over the rest")
    ui.info(f"wrote {out / 'metrics.json'}")


@app.command("tasks")
def tasks_cmd():
    """List the task names `--task` accepts."""
    from ponder.engine import data
    print("testbed")
    for t in data.rg_tasks():
        print(f"rg:{t}")


@testbed_app.command("build")
def testbed_build(max_steps: int = typer.Option(None, help="most training steps (default: the recipe's)"),
                  seed: int = typer.Option(0, help="initialisation and data seed"),
                  out: Path = typer.Option(Path("runs/testbed"), help="where the built model goes"),
                  ship: bool = typer.Option(False, help="also copy it into the package as the shipped testbed")):
    """Pre-train the testbed model from scratch (minutes on 2 cores). Point PONDER_TESTBED at the result to
    use it, or --ship it as the package's testbed weights."""
    import time

    from ponder import ui
    from ponder.recipes import testbed as recipe
    t = time.time()
    info = recipe.build(out, seed=seed, **({"max_steps": max_steps} if max_steps else {}))
    ui.info(f"testbed built at {out}: {info['steps']} steps, {time.time() - t:.0f} s")
    if ship:
        shipped = recipe.ship(out)
        ui.info(f"shipped to {recipe.testbed.WEIGHTS} (sha256 {shipped['sha256'][:12]}…)")


@testbed_app.command("info")
def testbed_info():
    """Where the testbed's weights are and how they were built."""
    from ponder.engine import testbed
    path = testbed.weights_dir()
    print(path)
    print((path / "testbed.json").read_text())


#: The config class each training command reads (module, class): what `ponder <method> --help` lists.
CONFIGS = {"sft": ("ponder.trainers.sft", "SFTConfig"), "onepass": ("ponder.trainers.onepass", "OnePassConfig"),
           "rise": ("ponder.recipes.rise", "RISERunConfig"), "retry": ("ponder.trainers.retry", "RetryConfig"),
           "latro": ("ponder.trainers.latro", "LaTROConfig"), "ssft": ("ponder.trainers.ssft", "SSFTConfig"),
           "gfpo": ("ponder.trainers.gfpo", "GFPOConfig")}


def config_help(name: str) -> str:
    """The config's fields, grouped by the class that declares them: name, type, default and one-line help."""
    from importlib import import_module

    from ponder.config import describe_fields
    module, cls_name = CONFIGS[name]
    cls = getattr(import_module(module), cls_name)
    lines = [f"Config fields ({cls_name}): set them in the --config YAML file or as key=value overrides.", ""]
    for title, rows in describe_fields(cls):
        lines += [title, ""]
        width = max(len(f"{n}: {t} = {d}") for n, t, d, _ in rows)
        width = min(width, 60)
        for n, t, d, h in rows:
            head = f"  {n}: {t} = {d}"
            lines.append(f"{head:<{width + 2}}  {h}".rstrip() if len(head) <= width + 2 else f"{head}\n{'':<{width + 4}}{h}")
        lines.append("")
    return "\n".join(lines)


class _ConfigHelpCommand(typer.core.TyperCommand):
    """A training command whose --help also lists its config's fields (imported only when help is asked for:
    the config classes pull in transformers)."""

    def format_help(self, ctx, formatter):
        super().format_help(ctx, formatter)  # typer's usage and options (rich prints them itself)
        typer.echo(config_help(ctx.info_name))


TRAINING_COMMANDS = {  # sub-command -> (recipe module in ponder.recipes, help); the function is run_<recipe>
    "sft": ("sft", "Supervised fine-tuning on conversations (assistant-only loss, per-message weights, LoRA)."),
    "onepass": ("onepass", "One-pass multi-turn reasoning SFT (mode: onepass | npass | kpass), earlier "
                               "reasoning hidden."),
    "rise": ("rise", "RISE: multi-turn self-improvement — collect retry episodes, reward-weighted SFT, iterate; "
                         "evaluates m1@t1, m5@t1, m1@t5, p1@t5 and writes report.md with a plot of accuracy by turn."),
    "retry": ("retry", "Multi-turn retry RL: G episodes of up to T attempts per problem, earlier reasoning hidden, "
                       "per-turn RLOO/GRPO advantages, each episode trained as one tree; reports m1@t1 vs the base."),
    "latro": ("latro", "LaTRO: self-rewarding latent reasoning optimisation (K rationales, reward "
                           "log p(answer | rationale), RLOO)."),
    "ssft": ("ssft", "Set SFT with global forking tokens (Hungarian matching of traces to <think1..N>); "
                         "assignment=mixed | random | fixed for the baselines."),
    "gfpo": ("ssft", "Global forking policy optimization: RL on the forking-token choice only (after SSFT)."),
}


def _training_command(name: str, recipe: str, doc: str) -> None:
    """`ponder NAME --config x.yaml key=value ...` -> ponder.recipes.RECIPE.run_NAME(config, overrides)."""
    def command(config: Path = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
                overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP)):
        from importlib import import_module
        _guarded(lambda: getattr(import_module(f"ponder.recipes.{recipe}"), f"run_{name}")(config, overrides or []))
    command.__doc__ = doc
    app.command(name, cls=_ConfigHelpCommand,
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(command)


for _name, (_recipe, _doc) in TRAINING_COMMANDS.items():
    _training_command(_name, _recipe, _doc)


@app.command("bench")
def bench_cmd(only: list[str] = typer.Option(None, help="bench names (default: every bench/*.py)"),
              out: Path = typer.Option(Path("bench/results.md"))):
    """Run the benchmarks in bench/ (from a checkout of the repository) and collect their `RATIO name=value`
    lines into bench/results.md (the runner is bench/run.py)."""
    import runpy
    runner = Path("bench/run.py")
    if not runner.exists():
        _fail(FileNotFoundError(f"{runner} not found: run `ponder bench` from the root of a ponder checkout"))
    runpy.run_path(str(runner), run_name="ponder.bench").get("run_benchmarks")(only or [], out)


@app.command("vllm-serve")
def vllm_serve_cmd(model: str = typer.Option("testbed", help="model the server starts from: testbed | smollm2-135m | a "
                                                              "save_pretrained folder (weights are pushed anyway)"),
                   host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 for other machines)"),
                   port: int = typer.Option(8000, help="port"),
                   dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16 (as the trainer's model)"),
                   kv_cache_gb: float = typer.Option(1.0, help="KV cache size in GiB"),
                   eager: bool = typer.Option(True, help="skip torch.compile (starts in seconds; a little slower)")):
    """Run vLLM's OpenAI server for the `vllm-server` rollout backend (TRL's `vllm-serve`): trainers push their
    weights to it through a shared folder (PONDER_VLLM_SHARED_DIR) and sample over HTTP (PONDER_VLLM_SERVER)."""
    def body():
        import os

        from ponder import vllm_engine, vllm_server
        path = vllm_server.model_dir(model)
        reason = vllm_engine.unavailable_reason()
        if reason:
            raise ValueError(reason.replace("rollout backend 'vllm'", "ponder vllm-serve"))
        argv, env = vllm_server.serve_command(str(path), host, port, dtype, kv_cache_gb, eager)
        os.execve(argv[0], argv, env)  # the server is vLLM's own process: signals go straight to it
    _guarded(body)


@app.command("demo")
def demo_cmd(only: list[str] = typer.Option(None, help="methods to run: onepass, rise, latro, ssft (default all)"),
             quick: bool = typer.Option(False, help="tiny budgets (seconds): checks the pipeline, not the methods"),
             n: int = typer.Option(200, help="held-out problems every method is evaluated on"),
             out: Path = typer.Option(Path("runs/demo"), help="where metrics.json, report.md and plots go")):
    """The four methods end to end on the CPU testbed, from the same starting model; writes runs/demo/report.md."""
    from ponder.recipes.demo import run
    result = run(out=out, only=only or None, quick=quick, n=n)
    if result["failed"]:
        raise typer.Exit(1)


@app.command("experiment")
def experiment_cmd(spec: Path = typer.Argument(..., help="an experiment spec, e.g. configs/experiments/rise.yaml"),
                   seeds: str = typer.Option(None, help="comma-separated seeds (default: the spec's)"),
                   only: list[str] = typer.Option(None, help="arms to run (default all); others are only summarised"),
                   force: bool = typer.Option(False, help="re-run finished (arm, seed) runs"),
                   summarise: bool = typer.Option(False, help="only rewrite the results from finished runs")):
    """Run an experiment's arms over several seeds; write docs/results/<name>.md with mean ± s.e., the paired
    difference of each claim with its 95% interval and a verdict, and a plot."""
    from ponder.recipes import experiment
    try:
        seed_list = [int(x) for x in seeds.split(",")] if seeds else None
        if summarise:
            s = experiment.load_spec(spec)
            experiment.write_results(s, Path("runs/experiments") / s["name"], seed_list or s["seeds"],
                                     Path("docs/results"), spec)
        else:
            experiment.run_experiment(spec, seed_list, only or None, force)
    except ValueError as e:
        _fail(e)


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="a run directory (runs/<name>) or the demo's")):
    """Render a run's metrics (metrics.json, trainer log history, saved sections) into RUN_DIR/report.md."""
    from ponder import ui
    from ponder.recipes import report
    _guarded(lambda: ui.info(f"report: {report.render(run_dir)}"))


def main() -> None:
    import os
    try:  # before torch is imported: the OpenMP wait policy is read once (docs/methods.md §6.4)
        runtime.configure()
    except ValueError as e:  # a bad PONDER_THREADS / OMP_NUM_THREADS: one line, not a traceback
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # our own progress bars and tables instead
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    quiet_library_warnings()
    app()


if __name__ == "__main__":
    main()
