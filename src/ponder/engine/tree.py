"""The prefix-tree engine: sequences that share prefixes, computed in ONE forward pass with per-token log-probs
and gradients identical to separate passes (docs/architecture.md "The tree engine").

Every method that saves work by not re-forwarding shared tokens is an instance of one idea: a set of sequences
sharing prefixes, where some tokens are visible only to their own branch. A `Tree` holds token segments; each
segment has a parent, a turn, a visibility rule and optionally loss weights:

- visible (default): every descendant sees it;
- hidden: seen only by its own later tokens and by descendants of the same turn, never by later turns — the
  rule of chat templates that strip earlier turns' reasoning (one-pass, arXiv 2504.18246 §3,
  docs/methods.md §2.3). A later turn's tokens are computed without it, so `flatten` duplicates what lies
  between (an answer appears after its reasoning for its own turn, and without it for the next turns).

A segment's *context* is its root-to-segment path minus the hidden segments of earlier turns; its "separate
sequence" is that context, concatenated. `flatten` builds the trie of the contexts of every scored segment (a
node = one distinct context prefix, so shared prefixes are forwarded once), lays it out as runs (each
first-child chain is one ordinary causal run, which keeps the CPU block-sparse plan short), and gives
positions (depth in the node's own context: the position each token has in its separate sequence) and
explicit (predictor, target) pairs. `pack` puts several trees per row. A query sees a key iff the key's node
is an ancestor-or-self of the query's node and the key is not after the query; with the nodes numbered in
preorder that is ``node[k] <= node[q] < node_end[k]`` — one rule for the dense additive mask, the
FlexAttention `BlockMask` and the block-sparse sdpa plan (`logits` picks dense or sparse by a measured cost).

Instances: a GRPO/RLOO group is a prompt with G scored children; LaTRO (arXiv 2411.04282 §4) is x -> z_k -> y_k
(and x -> z_k for the reference pass); SSFT matching costs (arXiv 2510.05132 §3) are prompt -> tag_i ->
trace_j[:L]; a one-pass conversation or a multi-turn episode with hidden reasoning is a chain of turns whose
reasoning segments are hidden (or, as `ponder.masks` does, the two views written out as branches).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv

from ponder.config import check_choice
from ponder.engine import runtime
from ponder.engine.logprobs import logits_at, logprobs_of

CUSTOM_MASK_BACKENDS = ("eager", "sdpa", "flex_attention")
ATTENTION_MODES = ("auto", "dense", "sparse", "flex")


# ----------------------------------------------------------------------------------------------------------
# the tree
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Segment:
    ids: list[int]
    parent: int                     # -1: a root
    weights: list[float] | None     # per-token loss weight; None: context only (no pairs)
    group: int                      # label of the separate sequence its scored tokens are reduced into
    hidden: bool
    turn: int
    tag: object = None              # the caller's annotation (e.g. a one-pass role), carried through


class Tree:
    """A prefix tree of token segments (see the module docstring). Several roots are allowed (independent
    sequences in one tree)."""

    def __init__(self):
        self.segments: list[Segment] = []

    def __len__(self) -> int:
        return len(self.segments)

    def add(self, ids: Sequence[int], parent: int | None = None, weight: float | Sequence[float] | None = None,
            group: int = 0, hidden: bool = False, turn: int | None = None, tag: object = None) -> int:
        """Append a segment; returns its index (the handle children use as `parent`).

        weight: a loss weight for every token (or one per token); None = context only. Scored tokens get a
            (predictor, target) pair each. group: an int label for reductions (e.g. per-sequence sums).
        hidden: visible only to its own later tokens and to descendants of the same `turn` (default: the
            parent's turn; turns never decrease along a path)."""
        n = len(self.segments)
        if parent is not None and not (isinstance(parent, int) and 0 <= parent < n):
            raise ValueError(f"parent {parent!r} is not a segment of this tree (0..{n - 1})")
        p = -1 if parent is None else parent
        parent_turn = self.segments[p].turn if p >= 0 else 0
        turn = parent_turn if turn is None else int(turn)
        if turn < parent_turn:
            raise ValueError(f"segment {n}: turn {turn} < its parent's turn {parent_turn} (turns never decrease "
                             "along a path)")
        ids = [int(t) for t in ids]
        if weight is None:
            w = None
        elif isinstance(weight, (int, float)):
            w = [float(weight)] * len(ids)
        else:
            w = [float(x) for x in weight]
            if len(w) != len(ids):
                raise ValueError(f"segment {n}: {len(w)} weights for {len(ids)} tokens")
        self.segments.append(Segment(ids, p, w, int(group), bool(hidden), turn, tag))
        return n

    def path(self, s: int) -> list[int]:
        """Segment indices from the root to `s`."""
        out = []
        while s >= 0:
            out.append(s)
            s = self.segments[s].parent
        return out[::-1]

    def context(self, s: int) -> list[int]:
        """The segments `s` sees, root first, ending with `s` itself: its path minus empty segments and minus
        hidden segments of other (earlier) turns. Their concatenation is `s`'s separate sequence."""
        turn = self.segments[s].turn
        return [a for a in self.path(s) if self.segments[a].ids
                and (not self.segments[a].hidden or self.segments[a].turn == turn)]


# ----------------------------------------------------------------------------------------------------------
# one tree -> one flat layout
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Flat:
    """One tree laid out: per token id, position and node; per node its parent (-1: a root) and the segment it
    copies; explicit pairs (predictor, target) over this layout's indices with weight, group label and the
    (segment, offset) of the target."""
    ids: list[int]
    positions: list[int]
    node: list[int]
    parent: list[int]
    pairs: list[tuple[int, int]]
    pair_weight: list[float]
    pair_group: list[int]
    node_segment: list[int] = field(default_factory=list)
    pair_token: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def flatten(tree: Tree) -> Flat:
    """The trie of the segments' contexts, laid out as runs: a node's first child (in the order segments were
    added) continues its parent's causal run, later children start runs of their own after it (add the
    longest continuation first: fewest runs, shortest sparse plan). Every segment is forwarded once per
    distinct context it occurs in (its own, and the copies later turns see without earlier hidden segments)."""
    segs = tree.segments
    child: dict[tuple[int, int], int] = {}     # (parent node, segment) -> node
    seg_of: list[int] = []
    par: list[int] = []
    own: dict[int, int] = {}                   # node -> segment whose scored tokens it carries
    for s, seg in enumerate(segs):
        if not seg.ids:
            continue
        p = -1
        for a in tree.context(s):
            n = child.get((p, a))
            if n is None:
                n = child[(p, a)] = len(seg_of)
                seg_of.append(a)
                par.append(p)
            p = n
        if seg.weights is not None:
            own[p] = s
    kids: list[list[int]] = [[] for _ in seg_of]
    roots = []
    for n, p in enumerate(par):
        (kids[p] if p >= 0 else roots).append(n)
    order, stack = [], roots[::-1]
    while stack:  # a run (first-child chain), then the subtrees hanging off it in order
        run = [stack.pop()]
        while kids[run[-1]]:
            run.append(kids[run[-1]][0])
        order += run
        stack += [c for m in reversed(run) for c in reversed(kids[m][1:])]
    new = {n: i for i, n in enumerate(order)}
    flat = Flat([], [], [], [new[par[n]] if par[n] >= 0 else -1 for n in order], [], [], [],
                [seg_of[n] for n in order], [])
    start, end_pos = [0] * len(order), [0] * len(order)
    for i, n in enumerate(order):
        ids = segs[seg_of[n]].ids
        p = flat.parent[i]
        pos0 = end_pos[p] if p >= 0 else 0
        start[i], end_pos[i] = len(flat.ids), pos0 + len(ids)
        flat.ids += ids
        flat.positions += range(pos0, pos0 + len(ids))
        flat.node += [i] * len(ids)
        s = own.get(n)
        if s is None:
            continue
        if p < 0:
            raise ValueError(f"segment {s} is scored but starts a sequence: nothing predicts its first token "
                             "(split it, or give the prompt its own segment)")
        seg = segs[s]
        prev = start[p] + len(segs[seg_of[order[p]]].ids) - 1
        for j, w in enumerate(seg.weights):
            flat.pairs.append((prev, start[i] + j))
            flat.pair_weight.append(w)
            flat.pair_group.append(seg.group)
            flat.pair_token.append((s, j))
            prev = start[i] + j
    return flat


# ----------------------------------------------------------------------------------------------------------
# the separate-sequence reference
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Separate:
    """One separate sequence: ids, and its scored tokens as indices (their predictor is the index before),
    weights, group labels and (segment, offset)."""
    ids: list[int]
    targets: list[int]
    weights: list[float]
    groups: list[int]
    tokens: list[tuple[int, int]]


def separate(tree: Tree) -> list[Separate]:
    """Each scored segment's context materialised as its own sequence, merged where one is a prefix of another
    (LaTRO's [x z] and [x z y] are one sequence); every scored token is scored exactly once. This is what the
    tree replaces (the N-pass samples of one-pass, the G sequences of a group) and its correctness reference."""
    segs = tree.segments
    ctx = {s: tuple(tree.context(s)) for s, g in enumerate(segs) if g.weights is not None and g.ids}
    full = [c for c in dict.fromkeys(ctx.values()) if not any(o != c and o[:len(c)] == c for o in ctx.values())]
    out = [Separate([t for a in c for t in segs[a].ids], [], [], [], []) for c in full]
    for s, c in ctx.items():
        k = next(i for i, f in enumerate(full) if f[:len(c)] == c)
        at = sum(len(segs[a].ids) for a in c[:-1])
        if at == 0:
            raise ValueError(f"segment {s} is scored but starts a sequence: nothing predicts its first token")
        sep = out[k]
        for j, w in enumerate(segs[s].weights):
            sep.targets.append(at + j)
            sep.weights.append(w)
            sep.groups.append(segs[s].group)
            sep.tokens.append((s, j))
    return out


def separate_batch(seqs: Sequence[Separate], pad_id: int):
    """Right-padded (input_ids, attention_mask, pairs (3, P)) of separate sequences, pairs in order."""
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    rows, preds, tgts = [], [], []
    for r, s in enumerate(seqs):
        ids[r, :len(s.ids)] = torch.tensor(s.ids)
        att[r, :len(s.ids)] = 1
        rows += [r] * len(s.targets)
        preds += [t - 1 for t in s.targets]
        tgts += s.targets
    return ids, att, torch.tensor([rows, preds, tgts], dtype=torch.long).reshape(3, -1)


# ----------------------------------------------------------------------------------------------------------
# packing and the attention rule
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Packed:
    """Flat layouts packed into right-padded rows. ``node``/``node_end``: the token's node number (preorder,
    unique within the row) and the end of its subtree's interval; -1 on padding. Pairs (3, P) = (row,
    predictor, target), in the order of the input layouts, with weight, source layout and group label."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    node: torch.Tensor
    node_end: torch.Tensor
    pairs: torch.Tensor
    pair_weight: torch.Tensor
    pair_tree: torch.Tensor
    pair_group: torch.Tensor

    def inputs(self) -> dict[str, torch.Tensor]:
        """The tensors as a dict (for a data collator); `Packed(**d)` rebuilds it."""
        return {f.name: getattr(self, f.name) for f in fields(Packed)}

    def to(self, device) -> Packed:
        return type(self)(**{k: v.to(device) for k, v in self.inputs().items()})

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens forwarded."""
        return int((self.node >= 0).sum())

    def groups(self) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """(dense group index per pair, [(layout, label)] per index): for `ponder.logprobs.reduce`."""
        keys = list(dict.fromkeys(zip(self.pair_tree.tolist(), self.pair_group.tolist())))
        at = {k: i for i, k in enumerate(keys)}
        idx = [at[k] for k in zip(self.pair_tree.tolist(), self.pair_group.tolist())]
        return torch.tensor(idx, dtype=torch.long, device=self.pairs.device), keys

    def dense_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Additive float mask (B, 1, T, T): 0 where allowed, finfo.min elsewhere (never -inf: a fully masked
        padding row would give NaN; never bool: eager attention adds it as 0/1; docs/methods.md §5)."""
        node, end = self.node, self.node_end
        idx = torch.arange(node.shape[1], device=node.device)
        q, k = node[:, :, None], node[:, None, :]   # (B, query, key)
        ok = (k <= q) & (q < end[:, None, :]) & (idx[None, :] <= idx[:, None])
        mask = torch.zeros(ok.shape, dtype=dtype, device=node.device)
        mask.masked_fill_(~ok, torch.finfo(dtype).min)
        return mask[:, None]

    def block_mask(self, block_size: int = 128):
        """The same rule as a FlexAttention BlockMask (nothing O(T^2) materialised)."""
        from torch.nn.attention.flex_attention import create_block_mask
        node, end = self.node, self.node_end

        def mask_mod(b, h, q, k):
            return (node[b, k] <= node[b, q]) & (node[b, q] < end[b, k]) & (k <= q)
        B, T = self.input_ids.shape
        return create_block_mask(mask_mod, B, None, T, T, device=self.input_ids.device, BLOCK_SIZE=block_size)


def _preorder(parent: Sequence[int]) -> tuple[list[int], list[int]]:
    """Preorder number and subtree end of every node of a forest given by parent indices."""
    kids: list[list[int]] = [[] for _ in parent]
    roots = []
    for n, p in enumerate(parent):
        if not -1 <= p < len(parent) or p == n:
            raise ValueError(f"node {n}: parent {p} is not a node of this layout")
        (kids[p] if p >= 0 else roots).append(n)
    pre, end = [-1] * len(parent), [-1] * len(parent)
    count, stack = 0, [(n, False) for n in roots[::-1]]
    while stack:
        n, done = stack.pop()
        if done:
            end[n] = count
            continue
        pre[n] = count
        count += 1
        stack.append((n, True))
        stack += [(c, False) for c in kids[n][::-1]]
    if count != len(parent):
        raise ValueError("the layout's parent links form a cycle")
    return pre, end


def pack(flats: Sequence[Flat], pad_id: int, row_length: int | None = None, cls: type[Packed] = Packed) -> Packed:
    """Pack layouts into rows (first-fit in the given order when `row_length` is set, else one per row),
    right-padded. Layouts in one row never see each other (their node intervals are disjoint)."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for i, f in enumerate(flats):
        if not len(f):
            continue
        r = None
        if row_length is not None:
            r = next((j for j, n in enumerate(fill) if n + len(f) <= max(row_length, len(f))), None)
        if r is None:
            rows.append([])
            fill.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        fill[r] += len(f)
    if not rows:
        raise ValueError("nothing to forward: no layout has a scored token")
    B, T = len(rows), max(fill)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    node = torch.full((B, T), -1, dtype=torch.long)
    end = torch.full((B, T), -1, dtype=torch.long)
    where: dict[int, tuple[int, int]] = {}
    for r, members in enumerate(rows):
        at, nodes = 0, 0
        for i in members:
            f = flats[i]
            pre, stop = _preorder(f.parent)
            n = len(f)
            ids[r, at:at + n] = torch.tensor(f.ids)
            pos[r, at:at + n] = torch.tensor(f.positions)
            node[r, at:at + n] = torch.tensor([pre[x] + nodes for x in f.node])
            end[r, at:at + n] = torch.tensor([stop[x] + nodes for x in f.node])
            where[i] = (r, at)
            at += n
            nodes += len(f.parent)
    pr, pp, pt, pw, ptree, pg = [], [], [], [], [], []
    for i, f in enumerate(flats):
        if not f.pairs:
            continue
        r, at = where[i]
        pr += [r] * len(f.pairs)
        pp += [at + p for p, _ in f.pairs]
        pt += [at + t for _, t in f.pairs]
        pw += f.pair_weight
        ptree += [i] * len(f.pairs)
        pg += f.pair_group
    return cls(ids, pos, node, end, torch.tensor([pr, pp, pt], dtype=torch.long).reshape(3, -1),
               torch.tensor(pw, dtype=torch.float64), torch.tensor(ptree, dtype=torch.long),
               torch.tensor(pg, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------
# block-sparse attention without FlexAttention (the CPU training path)
# ----------------------------------------------------------------------------------------------------------
#
# A dense mask makes every query attend over all T keys, masked ones included. FlexAttention skips empty blocks
# but has no backward on CPU (torch 2.13). Here every *run* — a chain of nodes laid out back to back, each the
# child of the one before (`flatten` makes every first-child chain one run) — is an ordinary causal sequence
# whose queries also see their first node's ancestors, a few contiguous key ranges. Each block of a run's
# queries is one fused sdpa call against exactly the keys it may see; autograd does the backward.

SPARSE_IMPL = "ponder_sparse"


@dataclass
class SparsePlan:
    """Per row, in index order, attention jobs (query start, query end, key ranges, additive bias or None for
    a plain causal square); gaps (padding) get zeros. `elements`: Σ queries x keys; `jobs`: number of calls."""
    rows: list[list[tuple[int, int, list[tuple[int, int]], torch.Tensor | None]]]
    length: int
    elements: int
    jobs: int


def _causal_bias(n_q: int, n_before: int, dtype, device) -> torch.Tensor:
    """Queries see `n_before` earlier keys fully, then their own block causally."""
    bias = torch.zeros(n_q, n_before + n_q, dtype=dtype, device=device)
    bias[:, n_before:].masked_fill_(torch.ones(n_q, n_q, dtype=torch.bool, device=device).triu(1),
                                    torch.finfo(dtype).min)
    return bias


def _merge(ranges):
    out: list[tuple[int, int]] = []
    for s, e in ranges:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        elif e > s:
            out.append((s, e))
    return out


def sparse_plan(packed: Packed, dtype: torch.dtype, block: int = 256, bias: bool = True) -> SparsePlan:
    """Jobs for every row: each run's queries in blocks of `block` against the ancestors of the run's first
    node plus the run up to the block (the upper triangle is skipped: CPU sdpa does not skip it for
    is_causal). Needs each node's tokens contiguous and after its ancestors' (true of `pack`'s layouts).
    bias=False plans without building the bias tensors (for cost estimates)."""
    T, dev = packed.input_ids.shape[1], packed.input_ids.device
    rows, elements, njobs = [], 0, 0
    for b in range(packed.input_ids.shape[0]):
        node, end = packed.node[b].tolist(), packed.node_end[b].tolist()
        span: dict[int, list[int]] = {}
        for i, n in enumerate(node):
            if n < 0:
                continue
            if n in span:
                if span[n][1] != i:
                    raise ValueError(f"row {b}: node {n}'s tokens are not contiguous; use attention='dense'")
                span[n][1] = i + 1
            else:
                span[n] = [i, i + 1]
        parent, stack = {}, []
        for n in sorted(span):
            while stack and not n < end[span[stack[-1]][0]]:
                stack.pop()
            parent[n] = stack[-1] if stack else -1
            stack.append(n)
        ctx: dict[int, list[tuple[int, int]]] = {}   # node -> key ranges of its ancestors
        for n in sorted(span):
            p = parent[n]
            ctx[n] = [] if p < 0 else _merge(ctx[p] + [tuple(span[p])])
        jobs, i = [], 0
        while i < T:
            n = node[i]
            if n < 0:
                i += 1
                continue
            s = i
            i = span[n][1]
            while i < T and node[i] >= 0 and parent[node[i]] == node[i - 1]:
                i = span[node[i]][1]
            c = ctx[n]
            if c and c[-1][1] > s:
                raise ValueError(f"row {b}: a node is laid out before its ancestor; use attention='dense'")
            before = sum(e - a for a, e in c)
            for qs in range(s, i, block):
                qe = min(i, qs + block)
                keys = _merge(c + [(s, qe)])
                nb = before + qs - s
                elements += (qe - qs) * (nb + qe - qs)
                jobs.append((qs, qe, keys, None if nb == 0 else
                             _causal_bias(qe - qs, nb, dtype, dev) if bias else True))
        njobs += len(jobs)
        rows.append(jobs)
    return SparsePlan(rows, T, elements, njobs)


def _span(chunks, first: dict[int, int], ranges):
    """The concatenation of the chunks covering `ranges` (each range starts and ends on a chunk boundary)."""
    parts = [c for s, e in ranges for c in chunks[first[s]:first[e]]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """A transformers attention function (registered as ``ponder_sparse``): query/key/value (B, H, T, D).

    Each row is split once at every job boundary (``split``, whose backward is one concatenation — slicing
    per job would allocate a full-size zero gradient per slice), and each job runs one 4-D sdpa call, which
    takes the fused CPU kernel rather than the unfused math path."""
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


class sparse_attention:
    """Context manager: run `model`'s attention through `sparse_attention_forward` (pass ``ponder_plan=``)."""

    def __init__(self, model):
        if SPARSE_IMPL not in AttentionInterface._global_mapping:
            AttentionInterface.register(SPARSE_IMPL, sparse_attention_forward)
        seen, self.configs = set(), []
        for m in model.modules():
            c = getattr(m, "config", None)
            if c is not None and hasattr(c, "_attn_implementation") and id(c) not in seen:
                seen.add(id(c))
                self.configs.append(c)

    def __enter__(self):
        self.saved = [c._attn_implementation for c in self.configs]
        for c in self.configs:
            c._attn_implementation = SPARSE_IMPL
        return self

    def __exit__(self, *exc):
        for c, impl in zip(self.configs, self.saved):
            c._attn_implementation = impl
        return False


# ----------------------------------------------------------------------------------------------------------
# the forward
# ----------------------------------------------------------------------------------------------------------

# The cost rule, measured with bench/tree.py (testbed, fp32, CPU sdpa): forward+backward of one score element
# (query x key) costs about the same in a dense masked call and in a sparse job (~84 ns per layer at 6 heads
# x 32 dims); a sparse job adds a fixed ~100 us (the call, the key concatenation, the bias), i.e. about
# JOB_OVERHEAD / (heads x head_dim) elements: element costs grow with heads x head_dim, the overhead does not.
# Those are one machine's numbers: `attention_costs` measures both constants per machine at first use.
JOB_OVERHEAD = 1200 * 192


def check_attention_backend(model) -> str:
    model = getattr(model, "module", model)  # DistributedDataParallel keeps the model as .module
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in CUSTOM_MASK_BACKENDS:
        raise ValueError(f"attention backend {impl!r} cannot take the one-pass block-sparse mask; load the model "
                         "with attn_implementation='sdpa' or 'eager' (CPU, dense mask) or 'flex_attention' (GPU)")
    return impl


def _float_dtype(model) -> torch.dtype:
    dtype = next(model.parameters()).dtype
    return dtype if dtype.is_floating_point else torch.float32


def _text_config(model):
    cfg = getattr(getattr(model, "module", model), "config", None)
    return getattr(cfg, "text_config", None) or cfg


def attention_dims(model) -> tuple[int, int]:
    """(query heads, head dim) of `model`'s attention."""
    cfg = _text_config(model)
    heads = getattr(cfg, "num_attention_heads", None) or 1
    return heads, getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 64) // heads


def attention_shape(model, packed: Packed, plan: SparsePlan | None) -> dict[str, int]:
    """The numbers `choose_attention` reads: rows, tokens per row, query width (heads x head dim), linear-layer
    multiply-adds per token and layer, (query, key) pairs per layer of the dense mask and of the sparse plan (0:
    no plan for this layout), the plan's sdpa calls, and torch's intra-op threads."""
    cfg = _text_config(model)
    h = getattr(cfg, "hidden_size", 64)
    heads, d = attention_dims(model)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    inter = getattr(cfg, "intermediate_size", 4 * h)
    B, T = packed.input_ids.shape
    return {"rows": B, "tokens": T, "width": heads * d, "linear_macs": h * (2 * heads * d + 2 * kv * d) + 3 * h * inter,
            "dense_pairs": B * T * T, "sparse_pairs": 0 if plan is None else plan.elements,
            "jobs": 0 if plan is None else plan.jobs, "threads": torch.get_num_threads()}


SPARSE_TOKENS_WIDTH = 150_000  # fitted: see choose_attention


@dataclass(frozen=True)
class AttentionCosts:
    """The machine's two constants in `choose_attention`: `job_overhead`, the fixed cost of one sparse sdpa call
    in multiply-add units (`job_overhead` / width (query, key) pairs), and `sparse_tokens_width`, the K in the
    sparse path's cost per pair relative to the dense kernel's with several threads, σ = 1 + tokens x width / K.
    The defaults were fitted on one machine; `attention_costs` gives this machine's (docs/methods.md §6.3)."""
    job_overhead: float = JOB_OVERHEAD
    sparse_tokens_width: float = SPARSE_TOKENS_WIDTH


DEFAULT_COSTS = AttentionCosts()
COSTS_MODES = ("measured", "default")  # PONDER_ATTENTION_COSTS


def choose_attention(rows: int, tokens: int, width: int, linear_macs: int, dense_pairs: int, sparse_pairs: int,
                     threads: int, jobs: int = 0, costs: AttentionCosts = DEFAULT_COSTS) -> str:
    """``dense`` or ``sparse`` on CPU (docs/methods.md §6.3); a pure function of shape numbers and the machine's
    `costs`.

    Cost per layer in multiply-adds: both paths pay the linear layers (rows x tokens x linear_macs); dense pays
    2 x width per (query, key) pair of the full square, sparse 2 x width x σ per pair of its plan plus a fixed
    cost per sdpa call (`costs.job_overhead`). σ is the sparse path's cost per pair relative to the dense
    kernel's: 1 with one thread, and with more it grows with the work per row, σ = 1 + tokens x width /
    `costs.sparse_tokens_width` (the one large dense kernel parallelises, the many small sparse calls do not).
    The defaults were fitted on the testbed and SmolLM2 at depths 2-16 (tests/test_onepass.py holds the
    measurements): right at every depth >= 8; at depths 2-4 the paths are within 15% and it misses 4 of 18."""
    if sparse_pairs <= 0:  # no block-sparse plan for this layout
        return "dense"
    sigma = 1.0 if threads <= 1 else 1.0 + tokens * width / costs.sparse_tokens_width
    base = rows * tokens * linear_macs
    dense = base + 2 * width * dense_pairs
    sparse = base + 2 * width * sigma * sparse_pairs + 2 * jobs * costs.job_overhead
    return "sparse" if sparse < dense else "dense"


# The micro-benchmark behind `attention_costs`: fp32 forward+backward of one dense masked sdpa call at a few
# row lengths, and of block-sparse plans of 64-query calls (a one-pass plan's calls are mostly ~60 queries
# against 80-800 keys) against few and against many keys, each the fastest of a few repeats (the least disturbed by other work).
MEASURE_DENSE_TOKENS = (256, 512, 1024)
MEASURE_SPARSE_CALLS = ((64, 1024, 64), (64, 1024, 512))  # (queries per call, row length, keys per call)


def _best_seconds(cases: Sequence[tuple], repeats: int) -> list[float]:
    """The fastest forward+backward time of each (fn, inputs) case, over `repeats` rounds that run every case
    once (after a warm-up round): a burst of other work slows one round of every case, not every repeat of one."""
    best = [float("inf")] * len(cases)
    for r in range(repeats + 1):
        for i, (fn, inputs) in enumerate(cases):
            for x in inputs:
                x.grad = None
            t = time.perf_counter()
            fn(*inputs).sum().backward()
            if r:
                best[i] = min(best[i], time.perf_counter() - t)
    return best


def _calls_plan(block: int, length: int, keys: int, dtype) -> SparsePlan:
    """A row of `length` tokens in calls of `block` queries, each against the `keys` keys that end with its own
    block (causal within the block; `keys` >= `block`)."""
    jobs = []
    for s in range(0, length, block):
        before = min(s, keys - block)
        jobs.append((s, s + block, [(s - before, s + block)],
                     None if before == 0 else _causal_bias(block, before, dtype, "cpu")))
    return SparsePlan([jobs], length, sum(block * (r[0][1] - r[0][0]) for _, _, r, _ in jobs), len(jobs))


def measure_attention_costs(heads: int, head_dim: int, threads: int | None = None, repeats: int = 3,
                            dense_tokens: Sequence[int] = MEASURE_DENSE_TOKENS,
                            sparse_calls: Sequence[tuple[int, int, int]] = MEASURE_SPARSE_CALLS) -> AttentionCosts:
    """This machine's `AttentionCosts` for a model of `heads` x `head_dim`, timed with `threads` intra-op threads
    (default: torch's now) in fp32 forward+backward: about 1 s on 2 cores at 9 x 64. It draws from its own
    random generator, so the caller's random state is untouched.

    The sparse plans (the same calls against few and against many keys) give a cost per sdpa call `o` and per
    (query, key) pair `c` (least squares of time = o x calls + c x pairs); `job_overhead` = width x o / c, the
    call's cost in pairs as `choose_attention` counts it. The dense calls give a cost per pair `d(T)` at each row
    length T; σ(T) = c / d(T), and `sparse_tokens_width` K is the least-squares fit of σ(T) - 1 = T x width / K
    (at most 1e9: σ = 1 when the small calls are no dearer per pair)."""
    width = heads * head_dim
    gen = torch.Generator().manual_seed(0)
    saved = torch.get_num_threads()
    module = type("Attention", (), {"num_key_value_groups": 1, "training": True})()

    def qkv(T):
        return [torch.randn(1, heads, T, head_dim, generator=gen).requires_grad_() for _ in range(3)]

    try:
        torch.set_num_threads(threads or saved)
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            cases, plans = [], []
            for block, length, keys in sparse_calls:
                plans.append(_calls_plan(block, length, keys, torch.float32))
                cases.append((lambda q, k, v, plan=plans[-1]:
                              sparse_attention_forward(module, q, k, v, None, ponder_plan=plan)[0], qkv(length)))
            for T in dense_tokens:
                mask = torch.zeros(T, T).masked_fill_(torch.ones(T, T, dtype=torch.bool).triu(1),
                                                      torch.finfo(torch.float32).min)[None, None]
                cases.append((lambda q, k, v, mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                              qkv(T)))
            times = _best_seconds(cases, repeats)
    finally:
        torch.set_num_threads(saved)
    rows = [(plan.jobs, plan.elements, t) for plan, t in zip(plans, times)]  # (calls, pairs, seconds)
    dense = [(T, t / (T * T)) for T, t in zip(dense_tokens, times[len(plans):])]  # (T, seconds per pair)
    # time = o x calls + c x pairs: the 2 x 2 normal equations
    jj = sum(j * j for j, _, _ in rows)
    jp = sum(j * p for j, p, _ in rows)
    pp = sum(p * p for _, p, _ in rows)
    jt = sum(j * t for j, _, t in rows)
    pt = sum(p * t for _, p, t in rows)
    det = jj * pp - jp * jp
    c = (jj * pt - jp * jt) / det if det > 0 else 0.0
    if not c > 0:  # noise: every second spent on pairs
        c = sum(t for *_, t in rows) / sum(p for _, p, _ in rows)
    o = max((jt - c * jp) / jj, 0.0)
    xs = [T * width for T, _ in dense]
    slope = sum(x * (c / d - 1.0) for x, (_, d) in zip(xs, dense)) / sum(x * x for x in xs)
    return AttentionCosts(job_overhead=max(width * o / c, 1.0),
                          sparse_tokens_width=min(1.0 / slope, 1e9) if slope > 1e-9 else 1e9)


def attention_costs(heads: int, head_dim: int, threads: int | None = None, mode: str | None = None) -> AttentionCosts:
    """The `AttentionCosts` that ``attention: auto`` uses: this machine's, measured once (per CPU model,
    instruction set, torch version, thread count and heads x head_dim) by `measure_attention_costs` and cached
    (`runtime.measured`: on disk and in the process), or `DEFAULT_COSTS` when `mode` (default: the environment's
    ``PONDER_ATTENTION_COSTS``, else ``measured``) is ``default`` — and, without measuring, in a process that
    finds the cores it would time busy with other processes' work."""
    mode = mode or os.environ.get("PONDER_ATTENTION_COSTS", "").strip() or "measured"
    check_choice("PONDER_ATTENTION_COSTS", mode, COSTS_MODES)
    if mode == "default":
        return DEFAULT_COSTS
    threads = threads or torch.get_num_threads()
    names = tuple(f.name for f in fields(AttentionCosts))
    values = runtime.measured("attention-costs", {"threads": threads, "heads": heads, "head_dim": head_dim},
                              lambda: asdict(measure_attention_costs(heads, head_dim, threads)), names,
                              threads=threads, fallback=asdict(DEFAULT_COSTS))
    return AttentionCosts(**values)


def choose(model, packed: Packed, attention: str = "auto", plan: SparsePlan | None = None) -> str:
    """The attention path: ``flex`` under flex_attention, else ``sparse`` or ``dense`` by `choose_attention`
    with this machine's `attention_costs` (on CPU; the built-in ones elsewhere), or the one asked for."""
    check_choice("attention", attention, ATTENTION_MODES)
    impl = check_attention_backend(model)
    if attention == "flex" and impl != "flex_attention":
        raise ValueError("attention='flex' needs a model loaded with attn_implementation='flex_attention'")
    if attention != "auto":
        return attention
    if impl == "flex_attention":
        return "flex"
    if plan is None:
        try:
            plan = sparse_plan(packed, torch.float32, bias=False)
        except ValueError:  # a layout the sparse plan cannot serve: dense
            plan = None
    shape = attention_shape(model, packed, plan)
    if shape["sparse_pairs"] <= 0:  # dense whatever the costs: nothing to measure
        return "dense"
    if packed.input_ids.device.type != "cpu":  # the measured costs are the CPU's
        return choose_attention(**shape)
    heads, head_dim = attention_dims(model)
    return choose_attention(**shape, costs=attention_costs(heads, head_dim, shape["threads"]))


def logits(model, packed: Packed, attention: str = "auto", block: int = 256) -> torch.Tensor:
    """Logits at the packed batch's predictors, (P, vocab), in float32 or wider; only the predictor columns
    go through the LM head (`logits_to_keep`).

    attention: ``auto`` (flex under flex_attention, else the cheaper of sparse and dense), ``dense``
    (additive float mask, T^2 per row), ``sparse`` (blocks of queries against the keys they may see: exact,
    cost ~ visible keys), ``flex`` (BlockMask; GPU — no CPU backward in torch 2.13)."""
    plan = None
    if attention == "sparse" or (attention == "auto" and check_attention_backend(model) != "flex_attention"):
        try:
            plan = sparse_plan(packed, _float_dtype(model), block)
        except ValueError:
            if attention == "sparse":
                raise
            attention = "dense"  # a layout the plan cannot serve (a node split, or after its descendants)
    mode = choose(model, packed, attention, plan)
    rows, preds = packed.pairs[0], packed.pairs[1]
    cols, slot = torch.unique(preds, return_inverse=True)
    kw = {"logits_to_keep": cols}
    if mode == "sparse":
        with sparse_attention(model):
            return logits_at(model, packed.input_ids, (rows, slot), None, packed.position_ids, ponder_plan=plan, **kw)
    mask = packed.block_mask() if mode == "flex" else packed.dense_mask(_float_dtype(model))
    return logits_at(model, packed.input_ids, (rows, slot), mask, packed.position_ids, **kw)


def logprobs(model, packed: Packed, attention: str = "auto") -> torch.Tensor:
    """log p(target | predictor) for every pair, (P,)."""
    return logprobs_of(logits(model, packed, attention), packed.input_ids[packed.pairs[0], packed.pairs[2]])
