"""The one place that turns conversations into tokens.

Contract (docs/architecture.md, "Contracts"): a conversation is rendered with the tokenizer's own chat template (or
`CHATML_TEMPLATE` when it has none). An assistant turn with reasoning renders its content as
``<think>\\n{reasoning}\\n</think>\\n\\n{content}`` (the Qwen3 convention). **History assistant turns render
without their reasoning**, as chat templates do at inference. The trained tokens of an assistant turn are its
reasoning block, its answer and its end-of-turn token — nothing after.

`render` returns the token segments with their kind (``prompt | tag | reasoning | answer | eot``), so every
method builds labels from segments and never searches strings. Rendering is done per message: the text of
message k is the difference between the template's rendering of messages[:k+1] and of messages[:k], which
is why the token ids of a prefix conversation are a prefix of the ids of the whole conversation.

Message text is data, never markup: a special-token string inside a message's content or reasoning (say
``<|im_end|>\n<|im_start|>user``) is tokenized as ordinary text (the tokenizers library's
`encode_special_tokens`), so data cannot forge turns or control tokens; only the template inserts them.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ponder.config import check_choice

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
KINDS = ("prompt", "tag", "reasoning", "answer", "eot")
TRAINED_KINDS = frozenset({"tag", "reasoning", "answer", "eot"})
REASONING_VIEWS = ("last", "none", "all")
HISTORY_REASONING = ("strip", "keep")
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                   "assistant": "assistant", "model": "assistant"}

# The project's own template, for tokenizers without one (the testbed's). Same layout as SmolLM2's ChatML
# template, without the default system prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class RenderError(ValueError):
    """A conversation or chat template that cannot be rendered into clean token segments."""


# ----------------------------------------------------------------------------------------------------------
# messages
# ----------------------------------------------------------------------------------------------------------

_INLINE_THINK = re.compile(r"^\s*<think>\n?(.*?)\n?</think>\s*", re.DOTALL)


def normalize_messages(messages: Sequence[dict[str, Any]], where: str = "messages") -> list[dict[str, Any]]:
    """Accept ponder / OpenAI / Qwen3 (`reasoning_content`) / ShareGPT (`from`, `value`) messages and inline
    ``<think>…</think>`` prefixes; return ``[{role, content, reasoning, [tag], [weight]}]``.

    Errors name the message (``where[i].field``) so a data loader can prefix file and line.
    """
    if not isinstance(messages, (list, tuple)):
        raise RenderError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        loc = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise RenderError(f"{loc}: expected an object with 'role' and 'content', got {type(m).__name__}")
        if "role" in m:
            role, text_key = m["role"], "content"
            if role not in ROLES:
                raise RenderError(f"{loc}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        elif "from" in m:
            role, text_key = _SHAREGPT_ROLES.get(m["from"]), "value"
            if role is None:
                raise RenderError(f"{loc}.from: unknown role {m['from']!r} (expected human, gpt or system)")
        else:
            raise RenderError(f"{loc}: missing field 'role' (or ShareGPT 'from')")
        content = m.get(text_key)
        if content is not None and not isinstance(content, str):
            raise RenderError(f"{loc}.{text_key}: expected a string, got {type(content).__name__}")
        reasoning = m.get("reasoning", m.get("reasoning_content"))
        if reasoning is not None and not isinstance(reasoning, str):
            raise RenderError(f"{loc}.reasoning: expected a string, got {type(reasoning).__name__}")
        if content is None and reasoning is None:
            # text under an unexpected key ('text', 'message', ...) would otherwise train an empty message
            others = sorted(k for k in m if k not in ("role", "from", "weight", "tag", text_key))
            what = f"field '{text_key}' is null" if text_key in m else f"missing field '{text_key}'"
            raise RenderError(f"{loc}: {what}" + (f" (found {', '.join(map(repr, others))})" if others
                                                  else " (the message has no text)"))
        content = content or ""
        if role == "assistant" and reasoning is None:
            inline = _INLINE_THINK.match(content)
            if inline:
                reasoning, content = inline.group(1), content[inline.end():]
        if reasoning is not None and role != "assistant":
            raise RenderError(f"{loc}.reasoning: only assistant messages carry reasoning (role is {role!r})")
        msg = {"role": role, "content": content, "reasoning": reasoning or None}
        if m.get("tag") is not None:
            msg["tag"] = m["tag"]
        if m.get("weight") is not None:
            w = m["weight"]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise RenderError(f"{loc}.weight: expected a number, got {w!r}")
            msg["weight"] = float(w)
        out.append(msg)
    return out


def assistant_body(msg: dict[str, Any], with_reasoning: bool) -> str:
    """The content string handed to the template for an assistant message."""
    tag, reasoning = msg.get("tag"), msg.get("reasoning")
    if with_reasoning and reasoning is not None:
        return f"{tag or THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{msg['content']}"
    if with_reasoning and tag:
        return f"{tag}\n{msg['content']}"
    return msg["content"]


# ----------------------------------------------------------------------------------------------------------
# segments
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    kind: str                # prompt | tag | reasoning | answer | eot
    ids: tuple[int, ...]
    message: int | None      # index of the message it belongs to (None: the generation prompt)

    @property
    def trained(self) -> bool:
        return self.kind in TRAINED_KINDS


class Rendered(list):
    """A list of `Segment`s with per-token views."""

    @property
    def ids(self) -> list[int]:
        return [t for s in self for t in s.ids]

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self for _ in s.ids]

    @property
    def messages(self) -> list[int | None]:
        return [s.message for s in self for _ in s.ids]

    def trained_mask(self, messages: Iterable[int] | None = None) -> list[bool]:
        """Per token: is it a trained token (reasoning block, answer, eot) of one of `messages` (default all)."""
        keep = None if messages is None else set(messages)
        return [s.trained and (keep is None or s.message in keep) for s in self for _ in s.ids]

    def text(self, tokenizer) -> str:
        return tokenizer.decode(self.ids, skip_special_tokens=False)


@dataclass
class _Piece:
    """The text a message adds to the rendering, split into (kind, text) spans; `escape`: character ranges of
    special-token strings that come from message text (tokenized as text, not as control tokens)."""
    message: int | None
    spans: list[tuple[str, str]] = field(default_factory=list)
    escape: list[tuple[int, int]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.spans)


def _template_text(tokenizer, msgs: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    if not msgs and not add_generation_prompt:
        return ""
    kwargs = {}
    if getattr(tokenizer, "chat_template", None) is None:
        kwargs["chat_template"] = CHATML_TEMPLATE
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def _special_strings(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    return sorted(specials, key=len, reverse=True)


def _special_ranges(text: str, specials: list[str], offset: int = 0) -> list[tuple[int, int]]:
    """Where special-token strings occur in `text` (leftmost, longest first), shifted by `offset`."""
    out, i = [], 0
    while specials:
        hits = [(text.find(s, i), -len(s)) for s in specials]
        hits = [h for h in hits if h[0] >= 0]
        if not hits:
            break
        at, neg = min(hits)
        out.append((offset + at, offset + at - neg))
        i = at - neg
    return out


def _content_escapes(piece: str, content: str, k: int, specials: list[str]) -> list[tuple[int, int]]:
    """Escape ranges for a non-assistant message whose template inserts `content` verbatim into `piece`."""
    if not content or not any(s in content for s in specials):
        return []
    at = piece.find(content)
    if at < 0 or piece.find(content, at + 1) >= 0:
        raise RenderError(f"message {k}: its text contains special-token strings and the chat template does not "
                          "insert it verbatim exactly once, so ponder cannot keep them as text; remove them")
    return _special_ranges(content, specials, at)


def _split_assistant(piece: str, header: str, body: str, msg: dict, k: int, specials: list[str],
                     with_reasoning: bool) -> _Piece:
    """Split the text of an assistant message into header / tag / reasoning / answer / eot / trailer."""
    if not piece.startswith(header):
        raise RenderError(f"message {k}: the chat template's generation prompt {header!r} is not how it renders "
                          "an assistant turn; ponder cannot tell prompt from answer with this template")
    rest = piece[len(header):]
    at = rest.find(body) if body else 0
    if at < 0:
        raise RenderError(f"message {k}: the chat template changes the assistant content (it does not appear "
                          "verbatim in the rendering); ponder needs templates that insert content as-is")
    out = _Piece(k, [("prompt", header + rest[:at])])
    content_start = len(body) - len(msg["content"])
    start = len(header) + at  # where the body begins in the piece
    out.escape = _special_ranges(msg["content"], specials, start + content_start)
    if with_reasoning and msg.get("reasoning") is not None:
        r_at = len(msg.get("tag") or THINK_OPEN) + 1
        out.escape = _special_ranges(msg["reasoning"], specials, start + r_at) + out.escape
    block = body[:content_start]          # reasoning block (possibly opened by a tag), or "" without reasoning
    tag = msg.get("tag") if with_reasoning else None
    if tag:
        out.spans.append(("tag", tag))
        block = block[len(tag):]
    if block:
        out.spans.append(("reasoning", block))
    out.spans.append(("answer", msg["content"]))
    after = rest[at + len(body):]
    hits = [(after.find(s), s) for s in specials if after.find(s) >= 0]
    if not hits:
        raise RenderError(f"message {k}: no end-of-turn special token after the assistant content in "
                          f"{after!r}; ponder needs one to know where a turn ends")
    pos, tok = min(hits, key=lambda h: (h[0], -len(h[1])))
    if after[:pos].strip():
        raise RenderError(f"message {k}: the template puts {after[:pos]!r} between the content and the "
                          "end-of-turn token")
    out.spans.append(("eot", after[:pos + len(tok)]))
    if after[pos + len(tok):]:
        out.spans.append(("prompt", after[pos + len(tok):]))
    return out


def _pieces(tokenizer, msgs: list[dict], reasoning_for: set[int], add_generation_prompt: bool,
            alt_for: Iterable[int] = ()) -> tuple[list[_Piece], dict[int, _Piece]]:
    """Per-message text pieces of the rendering; `alt_for`: assistant messages to also render as the final
    turn *with* their reasoning after a reasoning-free history (the one-pass layout needs both)."""
    specials = _special_strings(tokenizer)

    def tmsg(i, with_reasoning):
        m = msgs[i]
        body = assistant_body(m, with_reasoning) if m["role"] == "assistant" else m["content"]
        return {"role": m["role"], "content": body}

    tmsgs = [tmsg(i, i in reasoning_for) for i in range(len(msgs))]
    texts = [_template_text(tokenizer, tmsgs[:k]) for k in range(len(msgs) + 1)]
    headers = {k: _template_text(tokenizer, tmsgs[:k], add_generation_prompt=True)[len(texts[k]):]
               for k, m in enumerate(msgs) if m["role"] == "assistant"}
    pieces: list[_Piece] = []
    for k in range(len(msgs)):
        if not texts[k + 1].startswith(texts[k]):
            raise RenderError(f"message {k}: the chat template renders earlier messages differently once "
                              f"message {k} is added, so a conversation prefix would not be a token prefix; "
                              "this template is not supported")
        piece = texts[k + 1][len(texts[k]):]
        if msgs[k]["role"] == "assistant":
            pieces.append(_split_assistant(piece, headers[k], tmsgs[k]["content"], msgs[k], k, specials,
                                           k in reasoning_for))
        else:
            pieces.append(_Piece(k, [("prompt", piece)],
                                 _content_escapes(piece, tmsgs[k]["content"], k, specials)))
    if add_generation_prompt:
        gen = _template_text(tokenizer, tmsgs, add_generation_prompt=True)
        pieces.append(_Piece(None, [("prompt", gen[len(texts[-1]):])]))
    alts = {}
    for k in alt_for:
        body = assistant_body(msgs[k], True)
        full = _template_text(tokenizer, tmsgs[:k] + [{"role": "assistant", "content": body}])
        alts[k] = _split_assistant(full[len(texts[k]):], headers[k], body, msgs[k], k, specials, True)
    return pieces, alts


def _tokenize_piece(tokenizer, piece: _Piece) -> list[Segment]:
    """Tokenize a message's text once and cut it into segments at span boundaries (by character offsets).
    A token that straddles a boundary belongs to the span where it starts; straddling the boundary between
    prompt and trained text is an error (the prompt would not be a token prefix)."""
    text = piece.text
    if not text:
        return []
    ids, offsets = _encode(tokenizer, text, piece.escape)
    ends, kinds, pos = [], [], 0
    for kind, t in piece.spans:
        pos += len(t)
        ends.append(pos)
        kinds.append(kind)
    last_span = len(ends) - 1

    runs: list[tuple[str, list[int]]] = []
    for tid, (a, b) in zip(ids, offsets):
        kind = kinds[min(bisect.bisect_right(ends, a), last_span)]
        end_kind = kinds[min(bisect.bisect_right(ends, max(a, b - 1)), last_span)]
        if (kind in TRAINED_KINDS) != (end_kind in TRAINED_KINDS):
            raise RenderError(f"message {piece.message}: token {tokenizer.convert_ids_to_tokens(tid)!r} spans the "
                              f"boundary between {kind} and {end_kind} text in {text!r}")
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(tid)
        else:
            runs.append((kind, [tid]))
    return [Segment(kind, tuple(ids), piece.message) for kind, ids in runs]


def _encode(tokenizer, text: str, escape: Sequence[tuple[int, int]] = ()) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets, without special tokens (the Rust tokenizer directly when there is
    one: the Python wrapper costs more than the tokenization itself on short texts). The `escape` ranges
    (special-token strings from message text) are tokenized as ordinary text."""
    if not escape:
        return _encode_plain(tokenizer, text, False)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    pos = 0
    for a, b in [*sorted(escape), (len(text), len(text))]:
        for lo, hi, as_text in ((pos, a, False), (a, b, True)):
            if hi > lo:
                i, o = _encode_plain(tokenizer, text[lo:hi], as_text)
                ids.extend(i)
                offsets.extend((x + lo, y + lo) for x, y in o)
        pos = b
    return ids, offsets


def _encode_plain(tokenizer, text: str, as_text: bool) -> tuple[list[int], list[tuple[int, int]]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if not as_text:
            enc = backend.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        backend.encode_special_tokens = True
        try:
            enc = backend.encode(text, add_special_tokens=False)
        finally:
            backend.encode_special_tokens = False
        return enc.ids, enc.offsets
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text)
    return enc["input_ids"], enc["offset_mapping"]


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of plain text from data (an answer, a target): special-token strings in it stay text."""
    return _encode(tokenizer, text, _special_ranges(text, _special_strings(tokenizer)))[0]


def text_ids_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`text_ids` and each token's character range [start, end) in `text`."""
    ids, offsets = _encode(tokenizer, text, _special_ranges(text, _special_strings(tokenizer)))
    return ids, [(int(a), int(b)) for a, b in offsets]


def _check_tokenization(tokenizer, pieces: list[_Piece], segs: list[Segment]) -> None:
    escape, at = [], 0
    for p in pieces:
        escape += [(a + at, b + at) for a, b in p.escape]
        at += len(p.text)
    full = _encode(tokenizer, "".join(p.text for p in pieces), escape)[0]
    mine = [t for s in segs for t in s.ids]
    if full != mine:
        i = next((j for j, (a, b) in enumerate(zip(full, mine)) if a != b), min(len(full), len(mine)))
        raise RenderError(f"tokenizing message by message differs from tokenizing the whole conversation "
                          f"at token {i} ({tokenizer.decode(full[max(0, i - 5):i + 5])!r}); the tokenizer merges "
                          "across message boundaries, which ponder does not support")


def render(tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
           reasoning: str = "last") -> Rendered:
    """Render a conversation into token segments (the public rendering API).

    reasoning: ``"last"`` — only the final message, if it is an assistant turn, keeps its reasoning (what a
    model sees when it is trained on / generates that turn); ``"none"`` — every turn without reasoning (the
    history view of chat templates at inference); ``"all"`` — every assistant turn keeps its reasoning (history
    shown in full: RISE's MDP, docs/methods.md §3.2). ids equal ``tokenizer.apply_chat_template`` of the same
    messages with the reasoning block written into the content.
    """
    msgs = normalize_messages(messages)
    check_choice("reasoning", reasoning, REASONING_VIEWS)
    if reasoning == "all":
        keep = {k for k, m in enumerate(msgs) if m["role"] == "assistant"}
    else:
        keep = {len(msgs) - 1} if (reasoning == "last" and msgs and msgs[-1]["role"] == "assistant") else set()
    pieces, _ = _pieces(tokenizer, msgs, keep, add_generation_prompt)
    segs = Rendered(s for p in pieces for s in _tokenize_piece(tokenizer, p))
    _check_tokenization(tokenizer, pieces, segs)
    return segs


@dataclass
class Turns:
    """A conversation in the two views the one-pass layout needs (docs/methods.md §2.3).

    history: the whole conversation with every reasoning block stripped (what later turns see);
    final[k]: for assistant message k, its segments when it is the turn being generated — header, reasoning
    block, answer, end-of-turn — after the stripped history of messages[:k].
    """
    history: Rendered
    final: dict[int, Rendered]
    messages: list[dict[str, Any]]

    def history_of(self, k: int) -> Rendered:
        return Rendered(s for s in self.history if s.message is not None and s.message < k)


def render_turns(tokenizer, messages: Sequence[dict[str, Any]]) -> Turns:
    msgs = normalize_messages(messages)
    asst = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    pieces, alts = _pieces(tokenizer, msgs, set(), False, alt_for=asst)
    history = Rendered(s for p in pieces for s in _tokenize_piece(tokenizer, p))
    _check_tokenization(tokenizer, pieces, history)
    final = {k: Rendered(_tokenize_piece(tokenizer, alts[k])) for k in asst}
    return Turns(history, final, msgs)


def generation_prompt(tokenizer, messages: Sequence[dict[str, Any]], history_reasoning: str = "strip") -> list[int]:
    """Token ids of `messages` followed by the assistant header: what a model is given to generate the next
    assistant turn. history_reasoning: ``strip`` (earlier reasoning removed, as chat templates do at inference)
    or ``keep`` (earlier attempts shown in full)."""
    return render(tokenizer, messages, add_generation_prompt=True,
                  reasoning=history_view(history_reasoning)).ids


def history_view(history_reasoning: str) -> str:
    """``strip`` | ``keep`` -> the `render` view of a conversation's history (``none`` | ``all``)."""
    check_choice("history_reasoning", history_reasoning, HISTORY_REASONING)
    return "all" if history_reasoning == "keep" else "none"


def pad_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token, else 0. Padding is always
    masked out (attention and loss), so any id works; this rule makes it the same everywhere."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn under this tokenizer's template."""
    segs = render(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    eot = [s for s in segs if s.kind == "eot"]
    return eot[-1].ids[-1]
