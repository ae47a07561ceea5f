"""Records and sources. Every bad record is reported with its file, line and field.

Records (docs/architecture.md "Contracts"):
- `Problem`: id, question, answer (+ meta). Sources: ``testbed``, reasoning-gym (``rg:<task>``), JSONL files,
  HF datasets (GSM8K layout ``question`` / ``answer`` with ``#### N`` read as-is; ARC layout ``choices`` /
  ``answerKey``: the answer is the gold option's text, the option texts go to ``meta["options"]``; or an
  ``options`` list beside ``answer``). An answer may be free text (a sentence).
- `Conversation`: messages ``[{role, content, reasoning}]``; also OpenAI/Qwen3 ``reasoning_content`` and
  ShareGPT ``{from, value}`` (under ``messages`` or ``conversations``).
- `TraceSet` (SSFT): question, answer, traces ``[{reasoning, content, source}]``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ponder.engine import testbed
from ponder.engine.chat import RenderError, normalize_messages


class DataError(ValueError):
    """A record that cannot be used; the message names file, line and field."""


@dataclass
class Problem:
    id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TraceSet:
    question: str
    answer: str
    traces: list[dict[str, Any]]
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# JSONL
# ----------------------------------------------------------------------------------------------------------


class Loaded(list):
    """Records loaded from a source, with the input they skipped counted: ``skips`` maps a reason to a count
    (``skipped_blank_lines``: empty lines of a JSONL). Trainers put the counts into their data statistics, so the
    run summary and metrics.json report them."""

    def __init__(self, items=(), skips: Counter | None = None):
        super().__init__(items)
        self.skips = Counter(skips or {})


def input_skips(records) -> dict[str, int]:
    """The counted skips of `Loaded` records (none for records given in memory)."""
    return {k: v for k, v in getattr(records, "skips", {}).items() if v}


def read_jsonl(path: str | Path, skips: Counter | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", record)``; malformed lines (bad JSON, bytes that are not UTF-8) raise `DataError`
    naming file and line; blank lines are skipped and counted into `skips` (``skipped_blank_lines``)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a JSONL file")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    _check_utf8(path)  # the whole file, even when only its first n records are read
    with path.open("rb") as f:
        for no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                                ) from None
            if not line.strip():
                if skips is not None:
                    skips["skipped_blank_lines"] += 1
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{no}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{no}: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}:{no}", rec


def _check_utf8(path: Path) -> None:
    """A file with a byte that is not UTF-8 anywhere is refused (file:line), not only where it is read: an
    evaluation on its first n problems would otherwise succeed on a file in another encoding (Latin-1, ...)."""
    with path.open("rb") as f:
        for no, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                                ) from None


def write_jsonl(path: str | Path, records) -> None:
    """Write records atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _field(rec: dict, where: str, *names: str, kind=str) -> Any:
    for n in names:
        if n in rec:
            v = rec[n]
            if kind is str and isinstance(v, (int, float)) and not isinstance(v, bool):
                v = str(v)
            if not isinstance(v, kind):
                raise DataError(f"{where}: field '{n}' must be {kind.__name__}, got {type(v).__name__}")
            return v
    raise DataError(f"{where}: missing field '{names[0]}'" + (f" (or {', '.join(names[1:])})" if names[1:] else ""))


def gsm8k_answer(answer: str) -> tuple[str, str | None]:
    """GSM8K layout: "<solution> #### N" -> (N, solution); anything else -> (answer, None)."""
    if "####" in answer:
        solution, _, final = answer.rpartition("####")
        return final.strip().replace(",", ""), solution.strip()
    return answer.strip(), None


#: The answer checkers `ponder.verify.score` knows, besides ``rg:<task>`` for every reasoning-gym task.
VERIFIERS = ("math", "gsm8k", "boxed", "answer_is", "testbed", "arc", "text")


def check_verifier(meta: dict[str, Any], where: str) -> None:
    """Fail at load time, before any generation, on a ``meta.verifier`` (or ``meta.task``) nobody can score."""
    name = meta.get("verifier") or (meta.get("task") if str(meta.get("task", "")).startswith("rg:") else None)
    if name is None:
        return
    field_ = "meta.verifier" if meta.get("verifier") else "meta.task"
    if not isinstance(name, str):
        raise DataError(f"{where}: {field_} must be a string, got {type(name).__name__}")
    if name.startswith("rg:"):
        if name[3:] not in _rg_names():
            raise DataError(f"{where}: {field_}: reasoning-gym has no task {name[3:]!r} (see `ponder tasks`)")
    elif name not in VERIFIERS:
        raise DataError(f"{where}: {field_}: unknown verifier {name!r} (expected one of {', '.join(VERIFIERS)} "
                        "or rg:<task>)")


def _record_meta(rec: dict[str, Any], where: str) -> dict[str, Any]:
    meta = rec.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    return dict(meta)


def _choice(rec: dict[str, Any], where: str) -> tuple[str, list[str]]:
    """ARC layout (``choices: {text, label}``, ``answerKey``): (the gold option's text, the option texts)."""
    ch = rec["choices"]
    if not isinstance(ch, dict) or not isinstance(ch.get("text"), list) or not isinstance(ch.get("label"), list):
        raise DataError(f"{where}: field 'choices' must be an object with lists 'text' and 'label'")
    key = _field(rec, where, "answerKey")
    if key not in ch["label"]:
        raise DataError(f"{where}: field 'answerKey' {key!r} is not one of the labels {ch['label']}")
    return str(ch["text"][ch["label"].index(key)]), [str(t) for t in ch["text"]]


def problem_from_record(rec: dict[str, Any], where: str, index: int) -> Problem:
    """A problem from an external record. Its ``meta.entry`` is never trusted: reasoning-gym's scorers evaluate
    some entry fields, so for ``rg:`` verifiers the entry is regenerated from ``meta.rg`` (seed, size, index,
    config: what `load_problems` records) or the gold answer alone is used."""
    question = _field(rec, where, "question", "problem", "prompt")
    meta = _record_meta(rec, where)
    if "choices" in rec and "answerKey" in rec:  # multiple choice (ARC): the answer is the gold option's text
        answer, meta["options"] = _choice(rec, where)
        meta.setdefault("verifier", "arc")
        check_verifier(meta, where)
        meta.pop("entry", None)
        return Problem(str(rec.get("id", index)), question, answer, meta)
    if "options" in rec:
        opts = _field(rec, where, "options", kind=list)
        meta["options"] = [str(o) for o in opts]
    raw = _field(rec, where, "answer", "solution", "final_answer")
    answer, solution = gsm8k_answer(raw)
    if solution is not None:
        meta.setdefault("solution", solution)
        meta.setdefault("answer_field", raw)  # the raw GSM8K field: RISE's official reward reads it as-is
        meta.setdefault("verifier", "gsm8k")
    check_verifier(meta, where)
    meta.pop("entry", None)
    if meta.get("rg") is not None:
        meta["entry"] = _rg_regenerate(meta, question, answer, where)
    return Problem(str(rec.get("id", index)), question, answer, meta)


def _rg_regenerate(meta: dict[str, Any], question: str, answer: str, where: str) -> dict[str, Any]:
    """The reasoning-gym entry of a problem written by `load_problems`, rebuilt from (task, seed, size, index,
    config); it must give the record's question and answer."""
    spec, task = meta["rg"], str(meta.get("verifier") or meta.get("task") or "")
    try:
        seed, size, index = int(spec["seed"]), int(spec["size"]), int(spec["index"])
        config = dict(spec.get("config") or {})
    except (TypeError, KeyError, ValueError):
        raise DataError(f"{where}: meta.rg must be an object with seed, size, index (and config), got {spec!r}"
                        ) from None
    if not task.startswith("rg:") or not 0 <= index < size:
        raise DataError(f"{where}: meta.rg needs meta.verifier rg:<task> and 0 <= index < size")
    key = (task, seed, size, json.dumps(config, sort_keys=True))
    if key not in _RG_CACHE:
        import reasoning_gym as rg
        try:
            _RG_CACHE[key] = rg.create_dataset(task[3:], seed=seed, size=size, **config)
        except (TypeError, AssertionError, ValueError) as e:
            raise DataError(f"{where}: meta.rg: cannot regenerate {task} ({e})") from None
    entry = _RG_CACHE[key][index]
    if entry["question"] != question or str(entry["answer"]) != answer:
        raise DataError(f"{where}: meta.rg regenerates a different problem than this record's question/answer")
    return entry


_RG_CACHE: dict[tuple, Any] = {}


def conversation_from_record(rec: dict[str, Any], where: str, index: int) -> Conversation:
    msgs = rec.get("messages", rec.get("conversations"))
    if msgs is None:
        raise DataError(f"{where}: missing field 'messages' (or ShareGPT 'conversations')")
    try:
        msgs = normalize_messages(msgs, where=f"{where}: messages")
    except RenderError as e:
        raise DataError(str(e)) from None
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: messages: the conversation has no assistant turn, nothing to train on")
    return Conversation(msgs, str(rec.get("id", index)), _record_meta(rec, where))


def traceset_from_record(rec: dict[str, Any], where: str, index: int) -> TraceSet:
    question = _field(rec, where, "question", "problem", "prompt")
    answer = gsm8k_answer(_field(rec, where, "answer"))[0]
    traces = _field(rec, where, "traces", kind=list)
    if not traces:
        raise DataError(f"{where}: field 'traces' is empty")
    out = []
    for j, t in enumerate(traces):
        tw = f"{where}: traces[{j}]"
        if not isinstance(t, dict):
            raise DataError(f"{tw}: expected an object, got {type(t).__name__}")
        reasoning = _field(t, tw, "reasoning", "reasoning_content")
        content = _field(t, tw, "content")
        out.append({"reasoning": reasoning, "content": content, "source": str(t.get("source", j))})
    return TraceSet(question, answer, out, str(rec.get("id", index)), _record_meta(rec, where))


# ----------------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------------


def _hf_rows(spec: str, split: str) -> Iterator[tuple[str, dict]]:
    """``hf:<name>[:<config>]`` or a local `save_to_disk` / dataset directory."""
    import datasets
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as e:  # datasets raises many types for "not cached / offline"
            raise DataError(f"{spec}: cannot load the dataset ({type(e).__name__}: {e})") from None
    else:
        path = Path(spec)
        ds = datasets.load_from_disk(str(path)) if (path / "dataset_info.json").exists() or \
            (path / "state.json").exists() else datasets.load_dataset(str(path), split=split)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{spec}[{split}][{i}]", row


def _rows(spec: str, split: str, skips: Counter | None = None) -> Iterator[tuple[str, dict]]:
    if spec.endswith(".jsonl") or spec.endswith(".json"):
        yield from read_jsonl(spec, skips)
    elif spec.startswith("hf:") or Path(spec).is_dir():
        yield from _hf_rows(spec, split)
    elif "/" in spec or os.sep in spec or spec.startswith("."):
        raise DataError(f"{spec}: no such file or directory (a dataset directory or a .jsonl file was expected)")
    else:
        raise DataError(f"unknown data source {spec!r}: expected 'testbed', 'rg:<task>', a .jsonl file, "
                        "'hf:<dataset>[:<config>]' or a dataset directory")


def _nonempty(out: list, spec: str, n: int | None, what: str, skips: Counter | None = None) -> Loaded:
    """An empty source is an error (an evaluation on it would report accuracy 0 on 0 problems)."""
    if not out and n != 0:
        raise DataError(f"{spec}: no {what} in it (the source is empty)")
    return Loaded(out, skips)


def rg_tasks() -> list[str]:
    import reasoning_gym.factory
    return sorted(reasoning_gym.factory.DATASETS)


def load_problems(spec: str, n: int | None = None, seed: int = 0, split: str = "train",
                  **task_config) -> list[Problem]:
    """Problems from ``testbed`` (``testbed:words``: the answers in words), ``rg:<task>`` (or a bare reasoning-gym
    task name), JSONL or HF datasets.

    For reasoning-gym, `seed` and `n` define the items (the package generates them offline, deterministically)
    and `task_config` is passed to the task's config (e.g. ``min_terms=3``). split="test" uses seed+10**6 so
    train and test items differ.
    """
    if spec == "testbed":
        return [Problem(**p) for p in testbed.problems(n or 200, seed=seed, split=split)]
    if spec == testbed.WORDS_TASK:
        return [Problem(**p) for p in testbed.word_problems(n or 200, seed=seed, split=split)]
    if spec.startswith("rg:") or spec in _rg_names():
        import reasoning_gym as rg
        task, options = rg_spec(spec)
        task_config = {**options, **task_config}
        if task not in _rg_names():
            raise DataError(f"unknown task {spec!r}: reasoning-gym has no task {task!r} "
                            f"(see `ponder tasks`; e.g. {', '.join(_rg_names()[:6])}, ...)")
        rg_seed, size = seed + (10**6 if split == "test" else 0), n or 100
        try:
            ds = rg.create_dataset(task, seed=rg_seed, size=size, **task_config)
        except (TypeError, AssertionError) as e:
            raise DataError(f"{spec}: bad task option(s) {task_config}: {e}") from None
        # meta.rg lets a problem written to a file be regenerated when read back (its entry is not trusted)
        return [Problem(f"{task}-{split}-{i}", e["question"], str(e["answer"]),
                        {"task": f"rg:{task}", "verifier": f"rg:{task}", "entry": e,
                         "rg": {"seed": rg_seed, "size": size, "index": i, "config": dict(task_config)}})
                for i, e in enumerate(ds)]
    out, skips = [], Counter()
    for i, (where, rec) in enumerate(_rows(spec, split, skips)):
        out.append(problem_from_record(rec, where, i))
        if n is not None and len(out) >= n:
            break
    return _nonempty(out, spec, n, "problems", skips)


def rg_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``rg:<task>[:key=value,key=value]`` -> (task, options): reasoning-gym task options written in the dataset
    name, so that every config, experiment and ``--task`` can choose a task's difficulty (e.g.
    ``rg:chain_sum:max_terms=2,max_digits=1``). Values are YAML scalars (numbers, true/false, strings), parsed,
    never evaluated."""
    task, _, rest = spec.removeprefix("rg:").partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise DataError(f"{spec}: task options must be key=value separated by commas, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if not isinstance(value, (int, float, str, bool)):
            raise DataError(f"{spec}: option {key.strip()} must be a number, true/false or a word, got {raw!r}")
        options[key.strip()] = value
    return task, options


def _rg_names() -> list[str]:
    global _RG_NAMES
    if _RG_NAMES is None:
        _RG_NAMES = rg_tasks()
    return _RG_NAMES


_RG_NAMES: list[str] | None = None


def load_conversations(spec: str, n: int | None = None, split: str = "train", seed: int = 0
                       ) -> list[Conversation]:
    """Conversations from JSONL / HF datasets, or generated: ``testbed:multi`` (follow-up conversations of
    2-8 turns with reasoning), ``testbed:retry`` (RISE-style retry episodes), ``testbed:single``, ``testbed:gold``,
    ``testbed:words``."""
    if spec.startswith("testbed:"):
        return [Conversation(m, f"{spec}-{i}") for i, m in
                enumerate(testbed.conversations(spec.split(":", 1)[1], n or 1000, seed=seed, split=split))]
    out, skips = [], Counter()
    for i, (where, rec) in enumerate(_rows(spec, split, skips)):
        out.append(conversation_from_record(rec, where, i))
        if n is not None and len(out) >= n:
            break
    return _nonempty(out, spec, n, "conversations", skips)


def load_tracesets(spec: str, n: int | None = None, split: str = "train", seed: int = 0) -> list[TraceSet]:
    """TraceSets from JSONL / HF datasets, or ``testbed:traces`` (one trace per testbed strategy;
    ``testbed:traces:direct,split`` for a subset of the strategies)."""
    if spec == "testbed:traces" or spec.startswith("testbed:traces:"):
        names = spec.split(":", 2)[2].split(",") if spec.count(":") == 2 else None
        return [TraceSet(**r, id=f"{spec}-{i}") for i, r in
                enumerate(testbed.trace_sets(n or 1000, seed=seed, split=split, strategies=names))]
    out, skips = [], Counter()
    for i, (where, rec) in enumerate(_rows(spec, split, skips)):
        out.append(traceset_from_record(rec, where, i))
        if n is not None and len(out) >= n:
            break
    return _nonempty(out, spec, n, "trace sets", skips)


def as_problem(item: Any, where: str = "problem", index: int = 0) -> Problem:
    """The boundary conversion: a `Problem`, or a dict with question/answer (+ id, meta) -> `Problem`. Every
    component works on `Problem`s after this; a bad item names `where`."""
    if isinstance(item, Problem):
        return item
    if isinstance(item, dict):
        if "question" not in item or "answer" not in item:
            missing = "question" if "question" not in item else "answer"
            raise DataError(f"{where}: missing field '{missing}'")
        meta = _record_meta(item, where)
        check_verifier(meta, where)
        return Problem(str(item.get("id", index)), str(item["question"]), str(item["answer"]), meta)
    raise DataError(f"{where}: expected a problem (question, answer), got {type(item).__name__}")


def resolve_problems(spec: Any, n: int | None = None, split: str = "train", where: str = "dataset",
                     seed: int = 0) -> list[Problem]:
    """Problems from a data spec string (`load_problems`) or a sequence of problems / dicts (first `n`)."""
    if spec is None:
        raise DataError(f"no {where}: pass it to the trainer or set `dataset` in the config")
    if isinstance(spec, str):
        return load_problems(spec, n=n, split=split, seed=seed)
    items = list(spec)[:n] if n else list(spec)
    return [as_problem(p, f"{where}[{i}]", i) for i, p in enumerate(items)]


def as_conversation(item: Any, where: str) -> Conversation:
    """Accept a Conversation, a list of messages or a record with `messages` (used by trainers)."""
    if isinstance(item, Conversation):
        return item
    if isinstance(item, (list, tuple)):
        return conversation_from_record({"messages": list(item)}, where, 0)
    if isinstance(item, dict):
        return conversation_from_record(item, where, 0)
    raise DataError(f"{where}: expected a conversation (a list of messages or an object with 'messages'), "
                    f"got {type(item).__name__}")
