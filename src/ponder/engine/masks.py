"""The one-pass layout for multi-turn reasoning (arXiv 2504.18246, docs/methods.md §2.3–2.5).

At inference a chat template drops earlier turns' reasoning, so turn k is generated from a context holding
earlier answers but not earlier reasoning. One-pass trains every turn of a conversation in a single forward:
each assistant answer appears twice — ``answer_out`` (after its reasoning, trained) and ``answer_in`` (the
history copy later turns see) — and a block-sparse mask plus explicit position ids give every trained token
exactly the context (keys and positions) it has in its own N-pass sample, so the per-token log-probs equal N
separate passes.

The conversation is a prefix tree (`ponder.tree`): the *trunk* ``h_1 -> r_1^in -> h_2 -> r_2^in ...`` — the
history exactly as later turns see it — and under each ``h_k`` a *branch* ``t_k -> r_k^out``. The engine gives
positions, explicit (predictor, target) pairs and the mask (a query sees its ancestors), lays the trunk out
first as one causal run followed by the branches, and packs conversations into rows. The paper interleaves
``[h_k t_k r_k^in r_k^out]``; attention does not care where a key sits, only whether it is visible and at
which position, so any order serves (`to_flat` reads the tree off the roles and turns). Because a branch's
first token is not preceded by its context in the sequence, labels are explicit pairs; they also avoid the
official code's misaligned first answer token (docs/methods.md §2.7).

Turns without reasoning whose answer renders the same in both views have no branch: their answer is trained in
the trunk, where it stands (the official code silently drops their loss). System and user messages and
assistant headers are ``human``.

Also here: the trees of SSFT's matching costs (`shared_prefix_rows`, docs/methods.md §1.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ponder.engine.chat import Rendered, RenderError, render_turns
from ponder.engine.tree import Flat, Packed, Tree, flatten, pack

PAD, HUMAN, THINK, ANSWER_IN, ANSWER_OUT = 0, 1, 2, 3, 4
ROLE_NAMES = {PAD: "pad", HUMAN: "human", THINK: "think", ANSWER_IN: "answer_in", ANSWER_OUT: "answer_out"}


@dataclass
class Layout:
    """One conversation laid out for a single pass, in the one-pass vocabulary: per token id, role, turn,
    position and loss weight; explicit (predictor, target) pairs over this conversation's indices, with the
    assistant message index of each. Its tree (`to_flat`) is a function of the roles and turns alone, so any
    order of the tokens that keeps every block contiguous and after its ancestors is a valid layout."""
    ids: list[int] = field(default_factory=list)
    roles: list[int] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)      # (predictor, target)
    pair_message: list[int] = field(default_factory=list)           # assistant message index of each pair

    def __len__(self) -> int:
        return len(self.ids)


def _split_final(final: Rendered):
    """header ids, think ids (tag + reasoning), answer ids (answer + eot); the trailer is dropped."""
    header, think, answer = [], [], []
    for s in final:
        if s.kind == "prompt" and not think and not answer:
            header += s.ids
        elif s.kind in ("tag", "reasoning"):
            think += s.ids
        elif s.kind in ("answer", "eot"):
            answer += s.ids
    return header, think, answer


def onepass_tree(tokenizer, messages: Sequence[dict[str, Any]], weights: dict[int, float] | None = None,
                 turns: Sequence[int] | None = None, normalization: str = "tokens") -> Tree:
    """A conversation as a `ponder.tree.Tree`: the trunk ``h_1 -> r_1^in -> h_2 -> ...`` (the history as later
    turns see it) with, under each ``h_k``, the branch ``t_k -> r_k^out`` (reasoning + answer, trained).
    Segment tags are the one-pass roles; groups are assistant message indices. Arguments: `onepass_layout`."""
    tv = render_turns(tokenizer, messages)
    msgs = tv.messages
    asst = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    train = list(asst if turns is None else turns)
    if not train:
        raise RenderError("the conversation has no assistant turn to train")
    weights = {k: msgs[k].get("weight", 1.0) for k in asst} if weights is None else weights
    last = max(train)
    hist_by_msg: dict[int, list] = {}
    for s in tv.history:
        hist_by_msg.setdefault(s.message, []).append(s)

    tree = Tree()
    trunk: int | None = None   # the last trunk segment
    turn = 0
    pending: list[int] = []    # history tokens waiting to be emitted as one human block
    for k, m in enumerate(msgs):
        if k > last:
            break
        hist = [t for seg in hist_by_msg.get(k, []) for t in seg.ids]
        if m["role"] != "assistant" or k not in train:
            pending += hist   # context: user/system messages, and history-only (K-pass) answers
            continue
        header, think, answer_out = _split_final(tv.final[k])
        if hist[:len(header)] != header:
            raise RenderError(f"message {k}: the assistant header renders differently with and without "
                              "reasoning; the one-pass layout needs them equal")
        answer_in = hist[len(header):]
        h = tree.add(pending + header, trunk, turn=turn, tag=HUMAN)
        pending = []
        w = weights.get(k, 1.0)
        if not think and answer_in[:len(answer_out)] == answer_out:
            # no reasoning, same tokens in both views: no branch, trained in the trunk where it stands
            n = len(answer_out)
            a = tree.add(answer_in[:n], h, weight=_per(w, n, normalization), group=k, tag=ANSWER_IN)
            trunk = tree.add(answer_in[n:], a, tag=ANSWER_IN)
        else:
            trunk = tree.add(answer_in, h, tag=ANSWER_IN)  # first: the trunk is laid out as one causal run
            if w:
                # the first reasoning token is predicted from the last header token, the first answer token
                # from the last reasoning token, as in the turn's own N-pass sample
                per = _per(w, len(think) + len(answer_out), normalization)
                t = tree.add(think, h, weight=per, group=k, tag=THINK)
                tree.add(answer_out, t, weight=per, group=k, tag=ANSWER_OUT)
        turn += 1
    return tree


def _per(w: float, n: int, normalization: str) -> float | None:
    if not w or not n:
        return None
    return w / n if normalization == "messages" else w


def onepass_layout(tokenizer, messages: Sequence[dict[str, Any]], weights: dict[int, float] | None = None,
                   turns: Sequence[int] | None = None, normalization: str = "tokens") -> Layout:
    """Lay out a conversation for one pass: the trunk (history as later turns see it), then one branch
    (reasoning + answer) per trained turn (`onepass_tree`, flattened by `ponder.tree.flatten`).

    weights: loss weight per assistant message index (default: the messages' ``weight``, else 1.0; 0 keeps a
        turn as context only).
    turns: assistant message indices to train (default all); earlier assistant messages that are not listed
        appear as history only (K-pass chunks), later messages are dropped.
    normalization: ``tokens`` (weight per token) or ``messages`` (weight / number of the message's tokens).
    """
    tree = onepass_tree(tokenizer, messages, weights, turns, normalization)
    flat = flatten(tree)
    segs = [tree.segments[flat.node_segment[n]] for n in flat.node]
    w = [0.0] * len(flat)
    for (_, t), x in zip(flat.pairs, flat.pair_weight):
        w[t] = x
    return Layout(flat.ids, [s.tag for s in segs], [s.turn for s in segs], flat.positions, w, list(flat.pairs),
                  list(flat.pair_group))


def allowed(roles_q, turns_q, samples_q, idx_q, roles_k, turns_k, samples_k, idx_k):
    """The paper's mask table in one-pass roles (docs/methods.md §2.4): True where query q may attend to key k
    (tensors broadcast). The statement of the rule the tree engine must reproduce on one-pass layouts
    (tests/test_tree.py checks that it does); the engine itself masks by tree ancestry."""
    same_turn = turns_q == turns_k
    visible = (((roles_k == HUMAN) & (turns_k <= turns_q))
               | ((roles_k == ANSWER_IN) & (turns_k < turns_q))
               | ((roles_k == ANSWER_IN) & same_turn & (roles_q == ANSWER_IN))
               | ((roles_k == THINK) & same_turn & ((roles_q == THINK) | (roles_q == ANSWER_OUT)))
               | ((roles_k == ANSWER_OUT) & same_turn & (roles_q == ANSWER_OUT)))
    return visible & (idx_k <= idx_q) & (samples_q == samples_k) & (roles_q != PAD) & (roles_k != PAD)


class Batch(Packed):
    """A packed one-pass batch (`ponder.tree.Packed`), with the one-pass names for the pairs' sources."""

    @property
    def pair_example(self) -> torch.Tensor:
        return self.pair_tree

    @property
    def pair_message(self) -> torch.Tensor:
        return self.pair_group


def to_flat(lay: Layout) -> Flat:
    """The tree of a layout, from its roles and turns: the trunk blocks (human, answer_in) chained in (turn,
    human before answer_in) order; turn k's reasoning under the last trunk block before r_k^in, its answer_out
    under the reasoning (or in its place)."""
    keys = list(dict.fromkeys(zip(lay.turns, lay.roles)))
    if any(r not in (HUMAN, ANSWER_IN, THINK, ANSWER_OUT) for _, r in keys):
        raise ValueError(f"a layout role is not one of {sorted(ROLE_NAMES.values())}")
    trunk = sorted(k for k in keys if k[1] in (HUMAN, ANSWER_IN))
    index = {k: i for i, k in enumerate(trunk + sorted(k for k in keys if k[1] in (THINK, ANSWER_OUT)))}
    parent = [-1] * len(index)
    for a, b in zip(trunk, trunk[1:]):
        parent[index[b]] = index[a]
    for t, r in index:
        if r in (THINK, ANSWER_OUT):
            above = [k for k in trunk if k < (t, ANSWER_IN)]
            up = (t, THINK) if r == ANSWER_OUT and (t, THINK) in index else above[-1] if above else None
            parent[index[(t, r)]] = -1 if up is None else index[up]
    return Flat(list(lay.ids), list(lay.positions), [index[k] for k in zip(lay.turns, lay.roles)], parent,
                list(lay.pairs), [lay.weights[t] for _, t in lay.pairs], list(lay.pair_message))


def collate(layouts: Sequence[Layout], pad_id: int, row_length: int | None = None) -> Batch:
    """Pack layouts into rows (first-fit in the given order when `row_length` is set, else one per row),
    right-padded; packed conversations never attend to each other (`ponder.tree.pack`)."""
    return pack([to_flat(lay) for lay in layouts], pad_id, row_length, cls=Batch)


# ----------------------------------------------------------------------------------------------------------
# Shared-prefix rows (SSFT matching costs: one prompt, many short branches)
# ----------------------------------------------------------------------------------------------------------


def shared_prefix_rows(items, prefix_len: int | None, layout: str, row_tokens: int) -> list[Tree]:
    """Trees for every (question, tag i, trace j) prefix [prompt | tag_i | r_j[:L]] (SSFT matching costs,
    docs/methods.md §1.3), each small enough for a row of `row_tokens` (but at least one prefix).

    ``shared``: per question, trees prompt -> tag_i -> r_j[:L] holding as many prefixes as fit (the prompt once
    per tree, each tag once). ``packed``: every prefix its own chain, the prompt repeated. The scored segment
    of a prefix has as group label its index in (question, tag, trace) order."""
    trees: list[Tree] = []
    cell = 0
    for prompt, tags, traces in items:
        pre = [list(t[:prefix_len]) if prefix_len else list(t) for t in traces]
        if any(not p for p in pre):
            raise ValueError("a trace has no trained tokens to score")
        tree, size, tag_at = None, 0, {}
        for i, tag in enumerate(tags):
            for r in pre:
                need = len(r) + (len(tag) if i not in tag_at else 0)
                if tree is None or layout != "shared" or size + need > row_tokens:
                    tree, tag_at = Tree(), {}
                    trees.append(tree)
                    tree.add(prompt)
                    size = len(prompt)
                if i not in tag_at:
                    tag_at[i] = tree.add(tag, 0)
                    size += len(tag)
                tree.add(r, tag_at[i], weight=1.0, group=cell)
                size += len(r)
                cell += 1
    return trees
