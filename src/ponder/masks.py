"""The one-pass layout for multi-turn reasoning (arXiv 2504.18246, docs/methods.md §2.3–2.5).

At inference a chat template drops earlier turns' reasoning, so turn k is generated from a context holding
earlier answers but not earlier reasoning. One-pass trains every turn of a conversation in a single forward:
each assistant answer appears twice — ``answer_out`` (after its reasoning, trained) and ``answer_in`` (the
history copy later turns see) — and a block-sparse mask plus explicit position ids give every trained token
exactly the context (keys and positions) it has in its own N-pass sample, so the per-token log-probs equal N
separate passes.

Token order. Attention does not care where a key sits, only whether it is visible and at which position id,
so we are free to order tokens for speed. We lay a conversation out as a *trunk* — the history exactly as later
turns see it, ``[h_1 r_1^in h_2 r_2^in ... h_N r_N^in]``, an ordinary causal sequence — followed by one *branch*
per turn, ``[t_k r_k^out]``, which sees the trunk up to the end of ``h_k`` plus itself. The paper interleaves
``[h_k t_k r_k^in r_k^out]``; the predicate below serves both orders (the dense and FlexAttention paths take
any order), but with the trunk first the visible keys of every block of queries form one contiguous range
plus the branch itself, which is what makes `sparse_attention_forward` cheap. Because a branch's first
token is not preceded by its context in the sequence, labels are explicit (predictor, target) pairs; they also
avoid the official code's misaligned first answer token (docs/methods.md §2.7).

Turns without reasoning whose answer renders the same in both views have no branch: their answer is trained in
the trunk, where it stands (the official code silently drops their loss). System and user messages and
assistant headers are ``human``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv

from ponder.chat import Rendered, RenderError, render_turns

PAD, HUMAN, THINK, ANSWER_IN, ANSWER_OUT = 0, 1, 2, 3, 4
ROLE_NAMES = {PAD: "pad", HUMAN: "human", THINK: "think", ANSWER_IN: "answer_in", ANSWER_OUT: "answer_out"}


@dataclass
class Layout:
    """One conversation laid out for a single pass. Per token: id, role, turn, position, loss weight; plus
    explicit (predictor, target) pairs over this conversation's indices, grouped by assistant message."""
    ids: list[int] = field(default_factory=list)
    roles: list[int] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)      # (predictor, target)
    pair_message: list[int] = field(default_factory=list)           # assistant message index of each pair

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: Sequence[int], role: int, turn: int, start_pos: int) -> int:
        at = len(self.ids)
        self.ids += list(ids)
        self.roles += [role] * len(ids)
        self.turns += [turn] * len(ids)
        self.positions += range(start_pos, start_pos + len(ids))
        self.weights += [0.0] * len(ids)
        return at


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


def onepass_layout(tokenizer, messages: Sequence[dict[str, Any]], weights: dict[int, float] | None = None,
                   turns: Sequence[int] | None = None, normalization: str = "tokens") -> Layout:
    """Lay out a conversation for one pass: the trunk (history as later turns see it), then one branch
    (reasoning + answer) per trained turn.

    weights: loss weight per assistant message index (default: the messages' ``weight``, else 1.0; 0 keeps a
        turn as context only).
    turns: assistant message indices to train (default all); earlier assistant messages that are not listed
        appear as history only (K-pass chunks), later messages are dropped.
    normalization: ``tokens`` (weight per token) or ``messages`` (weight / number of the message's tokens).
    """
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

    lay = Layout()
    cur, turn = 0, 0
    pending: list[int] = []       # history tokens waiting to be emitted as one human block
    branches = []                 # (turn, msg, think, answer_out, predictor index, start position)

    def flush_human():
        nonlocal cur, pending
        if pending:
            lay.add(pending, HUMAN, turn, cur)
            cur += len(pending)
            pending = []

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
        pending += header
        flush_human()
        w = weights.get(k, 1.0)
        at = lay.add(answer_in, ANSWER_IN, turn, cur)
        if not think and answer_in[:len(answer_out)] == answer_out:
            # no reasoning, same tokens in both views: no branch, trained in the trunk where it stands
            _train_pairs(lay, list(range(at, at + len(answer_out))), at - 1, w, k, normalization)
        elif w:
            branches.append((turn, k, think, answer_out, at - 1, cur, w))
        cur += len(answer_in)
        turn += 1
    for turn_k, k, think, answer_out, pred, pos, w in branches:
        t_at = lay.add(think, THINK, turn_k, pos)
        o_at = lay.add(answer_out, ANSWER_OUT, turn_k, pos + len(think))
        # the first reasoning token is predicted from the last header token (in the trunk); the first answer
        # token from the last reasoning token, as in the turn's own N-pass sample
        targets = list(range(t_at, t_at + len(think))) + list(range(o_at, o_at + len(answer_out)))
        _train_pairs(lay, targets, pred, w, k, normalization)
    return lay


def _train_pairs(lay: Layout, targets: list[int], first_pred: int, w: float, msg: int, normalization: str):
    if not w or not targets:
        return
    per = w / len(targets) if normalization == "messages" else w
    prev = first_pred
    for t in targets:
        lay.pairs.append((prev, t))
        lay.pair_message.append(msg)
        lay.weights[t] = per
        prev = t


def allowed(roles_q, turns_q, samples_q, idx_q, roles_k, turns_k, samples_k, idx_k):
    """The one-pass mask predicate (docs/methods.md §2.4), written for broadcasting tensors (dense masks) and for
    scalars inside a FlexAttention `mask_mod` alike. True where query q may attend to key k."""
    same_turn = turns_q == turns_k
    visible = (((roles_k == HUMAN) & (turns_k <= turns_q))
               | ((roles_k == ANSWER_IN) & (turns_k < turns_q))
               | ((roles_k == ANSWER_IN) & same_turn & (roles_q == ANSWER_IN))
               | ((roles_k == THINK) & same_turn & ((roles_q == THINK) | (roles_q == ANSWER_OUT)))
               | ((roles_k == ANSWER_OUT) & same_turn & (roles_q == ANSWER_OUT)))
    return visible & (idx_k <= idx_q) & (samples_q == samples_k) & (roles_q != PAD) & (roles_k != PAD)


@dataclass
class Batch:
    """Layouts packed into rows: tensors for the model plus explicit pairs (row, predictor, target)."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    roles: torch.Tensor
    turns: torch.Tensor
    samples: torch.Tensor
    weights: torch.Tensor
    pairs: torch.Tensor            # (3, P): row, predictor, target
    pair_example: torch.Tensor     # (P,): which input layout each pair belongs to
    pair_message: torch.Tensor     # (P,): assistant message index within that layout

    def dense_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Additive float mask (B, 1, T, T): 0 where allowed, finfo.min elsewhere. (A bool 4D mask is silently
        misapplied under eager attention, and -inf gives NaN on fully masked rows: docs/methods.md §5.)"""
        idx = torch.arange(self.input_ids.shape[1])
        ok = allowed(self.roles[:, :, None], self.turns[:, :, None], self.samples[:, :, None], idx[None, :, None],
                     self.roles[:, None, :], self.turns[:, None, :], self.samples[:, None, :], idx[None, None, :])
        mask = torch.zeros(ok.shape, dtype=dtype)
        mask.masked_fill_(~ok, torch.finfo(dtype).min)
        return mask[:, None]

    def block_mask(self, block_size: int = 128):
        """The same predicate as a FlexAttention BlockMask (nothing O(T^2) materialised)."""
        from torch.nn.attention.flex_attention import create_block_mask
        roles, turns, samples = self.roles, self.turns, self.samples

        def mask_mod(b, h, q, k):
            return allowed(roles[b, q], turns[b, q], samples[b, q], q, roles[b, k], turns[b, k], samples[b, k], k)
        B, T = self.input_ids.shape
        return create_block_mask(mask_mod, B, None, T, T, device=self.input_ids.device, BLOCK_SIZE=block_size)


def collate(layouts: Sequence[Layout], pad_id: int, row_length: int | None = None) -> Batch:
    """Pack layouts into rows (first-fit in the given order when `row_length` is set, else one per row),
    right-padded. Packed conversations get distinct sample ids, so they never attend to each other."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for i, lay in enumerate(layouts):
        r = None
        if row_length is not None:
            r = next((j for j, f in enumerate(fill) if f + len(lay) <= max(row_length, len(lay))), None)
        if r is None:
            rows.append([])
            fill.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        fill[r] += len(lay)
    B, T = len(rows), max(fill)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    roles = torch.zeros((B, T), dtype=torch.long)
    turns = torch.zeros((B, T), dtype=torch.long)
    samples = torch.full((B, T), -1, dtype=torch.long)
    weights = torch.zeros((B, T), dtype=torch.float64)
    pr, pp, pt, pe, pm = [], [], [], [], []
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            lay = layouts[i]
            n = len(lay)
            ids[r, at:at + n] = torch.tensor(lay.ids)
            pos[r, at:at + n] = torch.tensor(lay.positions)
            roles[r, at:at + n] = torch.tensor(lay.roles)
            turns[r, at:at + n] = torch.tensor(lay.turns)
            samples[r, at:at + n] = s
            weights[r, at:at + n] = torch.tensor(lay.weights, dtype=torch.float64)
            for (p, t), msg in zip(lay.pairs, lay.pair_message):
                pr.append(r)
                pp.append(at + p)
                pt.append(at + t)
                pe.append(i)
                pm.append(msg)
            at += n
    pairs = torch.tensor([pr, pp, pt], dtype=torch.long).reshape(3, -1)
    return Batch(ids, pos, roles, turns, samples, weights, pairs, torch.tensor(pe, dtype=torch.long),
                 torch.tensor(pm, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------
# Shared-prefix rows (SSFT matching costs: one prompt, many short branches)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PrefixRow:
    """One row of the cost forward: ids, position ids, per-token branch (0 = a shared prompt, 1.. = a branch,
    -1 = padding), and the cells it scores: (question, tag i, trace j, indices of the targets)."""
    ids: list[int]
    pos: list[int]
    branch: list[int]
    cells: list[tuple[int, int, int, list[int]]]


def shared_prefix_rows(items, prefix_len: int | None, layout: str, row_tokens: int) -> list[PrefixRow]:
    """Lay out every (question, tag i, trace j) prefix [prompt | tag_i | r_j[:L]] for one forward.

    ``shared``: per question, rows [prompt | tag_1 r_1[:L] | tag_1 r_2[:L] | ... ] holding the prompt once and as
    many branches as fit in `row_tokens` (at least one); each branch sees the prompt and itself (a custom
    mask) and its positions continue from the prompt. ``packed``: each prefix is an independent sequence with
    its own copy of the prompt, packed back to back into rows of at most `row_tokens` tokens with positions
    restarting (transformers then builds the block-diagonal mask itself from the restarting position ids).
    Either way the attention cost is ~ tokens x row length, so `row_tokens` bounds it."""
    rows: list[PrefixRow] = []
    for q, (prompt, tags, traces) in enumerate(items):
        pre = [list(t[:prefix_len]) if prefix_len else list(t) for t in traces]
        if any(not p for p in pre):
            raise ValueError("a trace has no trained tokens to score")
        for i, tag in enumerate(tags):
            for j, r in enumerate(pre):
                seq = list(tag) + r
                if layout == "shared":
                    fresh = not rows or rows[-1].cells[-1][0] != q or len(rows[-1].ids) + len(seq) > row_tokens
                    if fresh:
                        rows.append(PrefixRow(list(prompt), list(range(len(prompt))), [0] * len(prompt), []))
                    row = rows[-1]
                    b = max(row.branch) + 1
                else:
                    if not rows or len(rows[-1].ids) + len(prompt) + len(seq) > row_tokens:
                        rows.append(PrefixRow([], [], [], []))
                    row = rows[-1]
                    b = max(row.branch, default=0) + 1
                    row.ids += prompt
                    row.pos += list(range(len(prompt)))
                    row.branch += [b] * len(prompt)
                start = len(row.ids) + len(tag)
                row.ids += seq
                row.pos += list(range(len(prompt), len(prompt) + len(seq)))
                row.branch += [b] * len(seq)
                row.cells.append((q, i, j, list(range(start, start + len(r)))))
    return rows


def shared_prefix_mask(branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive float mask: causal, and a query sees keys of the shared prompt (branch 0) and of
    its own branch. Padding (-1) queries see only themselves (finfo.min, not -inf: no NaN; docs/methods.md §5)."""
    t = branch.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    q, k = branch[:, :, None], branch[:, None, :]
    allowed = causal & ((k == 0) | (k == q)) & (q >= 0) & (k >= 0)
    allowed |= torch.eye(t, dtype=torch.bool)
    out = torch.zeros(allowed.shape, dtype=dtype)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


# ----------------------------------------------------------------------------------------------------------
# Block-sparse attention without FlexAttention (CPU training path)
# ----------------------------------------------------------------------------------------------------------
#
# A dense mask makes every query attend over all T keys (masked ones included), so the one-pass layout would
# pay O(T^2) attention although each token sees about what it sees in its N-pass sample. FlexAttention skips
# empty blocks but has no backward on CPU in torch 2.13. With the trunk-first layout every query block has a
# contiguous key range: the trunk is an ordinary causal sequence (the fast is_causal kernel), and branch k's
# queries see trunk[:end of h_k] plus the branch itself (one small masked sdpa per branch). Same numbers as the
# dense mask; cost about the N-pass attention of the trained tokens; autograd does the backward.

SPARSE_IMPL = "ponder_sparse"


@dataclass
class SparsePlan:
    """Per row, in index order, attention jobs (query start, query end, key ranges, additive bias or None for
    a plain causal square); gaps (padding) get zeros."""
    rows: list[list[tuple[int, int, list[tuple[int, int]], torch.Tensor | None]]]
    length: int


def _causal_bias(n_q: int, n_before: int, dtype, device) -> torch.Tensor:
    """Queries see `n_before` earlier keys fully, then their own block causally."""
    bias = torch.zeros(n_q, n_before + n_q, dtype=dtype, device=device)
    bias[:, n_before:].masked_fill_(torch.ones(n_q, n_q, dtype=torch.bool, device=device).triu(1),
                                    torch.finfo(dtype).min)
    return bias


def sparse_plan(batch: Batch, dtype: torch.dtype, block: int = 256) -> SparsePlan:
    """Jobs for the trunk-first layout: the trunk in blocks of `block` queries against the keys before them
    (so the upper triangle is skipped — CPU sdpa does not skip it for is_causal), each branch against
    trunk[:end of its human turn] plus itself."""
    T, dev = batch.input_ids.shape[1], batch.input_ids.device
    bad = ValueError("sparse attention needs the trunk-first one-pass layout; use attention='dense'")
    rows = []
    for b in range(batch.input_ids.shape[0]):
        roles, turns, samples = batch.roles[b].tolist(), batch.turns[b].tolist(), batch.samples[b].tolist()
        jobs, i = [], 0
        while i < T:
            if roles[i] == PAD:
                i += 1
                continue
            s0, sid = i, samples[i]
            while i < T and samples[i] == sid and roles[i] in (HUMAN, ANSWER_IN):
                i += 1
            for qs in range(s0, i, block):
                qe = min(i, qs + block)
                jobs.append((qs, qe, [(s0, qe)], None if qs == s0 else _causal_bias(qe - qs, qs - s0, dtype, dev)))
            head_end = {}  # turn -> index after its last human token in the trunk
            for j in range(s0, i):
                if roles[j] == HUMAN:
                    head_end[turns[j]] = j + 1
            while i < T and samples[i] == sid and roles[i] in (THINK, ANSWER_OUT):
                b0, t = i, turns[i]
                while i < T and samples[i] == sid and turns[i] == t and roles[i] in (THINK, ANSWER_OUT):
                    i += 1
                if t not in head_end:
                    raise bad
                jobs.append((b0, i, [(s0, head_end[t]), (b0, i)], _causal_bias(i - b0, head_end[t] - s0, dtype, dev)))
            if i < T and samples[i] == sid and roles[i] != PAD:
                raise bad
        rows.append(jobs)
    return SparsePlan(rows, T)


def _span(chunks, first: dict[int, int], ranges):
    """The concatenation of the chunks covering `ranges` (each range starts and ends on a chunk boundary)."""
    parts = [c for s, e in ranges for c in chunks[first[s]:first[e]]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """A transformers attention function (registered as ``ponder_sparse``): query/key/value (B, H, T, D).

    Each row is split once at every job boundary (``split``/``unbind``, whose backward is one concatenation —
    slicing per job would allocate a full-size zero gradient per slice), and each job runs one 4-D sdpa call,
    which takes the fused CPU kernel rather than the unfused math path."""
    plan: SparsePlan = kwargs["ponder_plan"]
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    B, H, T, D = query.shape
    p = dropout if module.training else 0.0
    outs = []
    for q_b, k_b, v_b, jobs in zip(query.unbind(0), key.unbind(0), value.unbind(0), plan.rows):
        cuts = sorted({0, T} | {x for qs, qe, ranges, _ in jobs for x in (qs, qe, *(y for r in ranges for y in r))})
        sizes = [e - s for s, e in zip(cuts, cuts[1:])]
        first = {s: i for i, s in enumerate(cuts)}
        qc, kc, vc = q_b.split(sizes, dim=1), k_b.split(sizes, dim=1), v_b.split(sizes, dim=1)


        pieces, at = [], 0
        for qs, qe, ranges, bias in jobs:
            if qs > at:  # padding: zeros
                pieces.append(query.new_zeros(H, qs - at, value.shape[-1]))
            out = F.scaled_dot_product_attention(
                _span(qc, first, [(qs, qe)]).unsqueeze(0), _span(kc, first, ranges).unsqueeze(0),
                _span(vc, first, ranges).unsqueeze(0),
                attn_mask=None if bias is None else bias.to(query.dtype), is_causal=bias is None, dropout_p=p,
                scale=scaling)
            pieces.append(out[0])
            at = qe
        if at < T:
            pieces.append(query.new_zeros(H, T - at, value.shape[-1]))
        outs.append(torch.cat(pieces, dim=1))
    out = torch.stack(outs)                       # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def _register_sparse():
    if SPARSE_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(SPARSE_IMPL, sparse_attention_forward)


class sparse_attention:
    """Context manager: run `model`'s attention through `sparse_attention_forward` (pass ``ponder_plan=``)."""

    def __init__(self, model):
        _register_sparse()
        self.configs = [c for c in _configs(model)]

    def __enter__(self):
        self.saved = [c._attn_implementation for c in self.configs]
        for c in self.configs:
            c._attn_implementation = SPARSE_IMPL
        return self

    def __exit__(self, *exc):
        for c, impl in zip(self.configs, self.saved):
            c._attn_implementation = impl
        return False


def _configs(model):
    seen, out = set(), []
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation") and id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out
