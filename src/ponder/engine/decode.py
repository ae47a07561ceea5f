"""A lean decode loop for Llama-family models: the ``lean`` backend of `ponder.rollout.sample` (docs/methods.md §6.1).

HF `generate` grows its KV cache by concatenation (a copy of the whole cache per layer and step) and runs
logits processors, stopping criteria and mask builders every step. This loop runs the model's own sub-modules
(embedding, RMSNorms, projections, MLPs, rotary embedding — so LoRA-wrapped projections work unchanged) with:
- a static KV cache per layer, allocated once at (rows, kv heads, prompt width + max_new_tokens, head dim);
- one batched forward per step, logits only at the last position;
- prompts shared by several rows (n samples per prompt) prefilled once, their cache rows copied;
- finished rows compacted out of the batch and the cache once half of the open rows are done;
- `generate`'s sampling (`filtered_logits`: temperature, then top-k, then top-p; one multinomial draw per row).

What "the same as generate" means here: the prefill runs the operations `generate` runs; a decode step
computes attention of the single new query by two matmuls and a softmax instead of the fused sdpa kernel
(faster for one query; differences ~1e-7), so greedy ids equal `generate`'s unless two logits tie to that
precision — tested exactly on the tiny and testbed models and SmolLM2 (bench/generation.py). Sampling draws
from exactly the distribution `generate` samples from (tested against the model's softmax by a chi-square
test), deterministic for a seed and batch size, but it consumes random numbers differently, so sampled ids
are not `generate`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from peft import PeftModel

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _core(model):
    """(causal LM, its decoder) with PEFT wrappers looked through."""
    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    return lm, getattr(lm, "model", None)


def unsupported_reason(model) -> str | None:
    """Why the lean loop cannot run `model` (None when it can): Llama-shaped decoders only."""
    lm, dec = _core(model)
    cfg = getattr(lm, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        return f"model type {kind!r} (the lean loop runs {', '.join(SUPPORTED_TYPES)})"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", kind == "mistral"):
        return "sliding-window attention"
    need = ("embed_tokens", "layers", "norm", "rotary_emb")
    if dec is None or any(not hasattr(dec, n) for n in need) or not hasattr(lm, "lm_head"):
        return "not a Llama-shaped module tree (model.embed_tokens/layers/norm/rotary_emb, lm_head)"
    return None


def filtered_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The fp32 logits `generate` samples from, with its warpers in its order: divide by the temperature, keep
    the top-k (0: all), keep the smallest set of most likely tokens whose probability reaches top_p (at least
    one). Removed tokens are -inf."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, sorted_idx, remove), -float("inf"))
    return scores


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Decoder:
    """The forward of a Llama-shaped causal LM over a static KV cache (one instance per batch)."""

    def __init__(self, model, rows: int, length: int):
        self.lm, dec = _core(model)
        self.embed, self.layers, self.norm, self.rotary = dec.embed_tokens, dec.layers, dec.norm, dec.rotary_emb
        cfg = self.lm.config
        p = next(model.parameters())
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.matmul_attention = p.dtype == torch.float32  # low-precision decode keeps the fused kernel
        shape = (rows, self.kv_heads, length, self.head_dim)
        self.k = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.v = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in self.layers]

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) cache rows: row i of the new cache is row rows[i] of the old one."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, T) go into cache slots [start, start+T). mask (B, 1, T, start+T): bool (True = may attend)
        for T > 1; for T == 1 additive (0 / -inf) when `matmul_attention`, else bool. Returns the logits at
        the last position, (B, vocab)."""
        B, T = ids.shape
        h = self.embed(ids)
        cos, sin = self.rotary(h, position_ids=positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        end, groups, hd = start + T, self.heads // self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            att = layer.self_attn
            x = layer.input_layernorm(h)
            q = att.q_proj(x).view(B, T, -1, hd)
            k = att.k_proj(x).view(B, T, -1, hd)
            v = att.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
            if hasattr(att, "q_norm"):  # Qwen3: per-head RMSNorm before the rotation
                q, k = att.q_norm(q), att.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            self.k[i][:, :, start:end] = k
            self.v[i][:, :, start:end] = v
            keys, values = self.k[i][:, :, :end], self.v[i][:, :, :end]
            if T == 1:  # one query per row: the query heads sharing a kv head act as its queries (no repeat)
                qg = q.reshape(B, self.kv_heads, groups, hd)
                if self.matmul_attention:
                    scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(att.scaling).add_(mask)
                    o = torch.matmul(scores.softmax(-1), values)
                else:
                    o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=att.scaling)
            else:
                if groups > 1:
                    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=att.scaling)
            o = o.reshape(B, self.heads, T, hd).transpose(1, 2).reshape(B, T, -1)
            h = h + att.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm.lm_head(self.norm(h[:, -1:]))[:, 0]


def decode(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad: int, eos: set[int],
           next_token: Callable[[torch.Tensor], torch.Tensor],
           stopped: Callable[[list[list[int]]], list[bool]] | None = None) -> list[list[int]]:
    """Left-padded batched decoding. Returns, per prompt, the generated ids up to and including the token that
    finished it (an `eos` id, or the token after which a stop string appeared: `stopped(generated ids of the
    open rows)` -> one bool per row), else `max_new_tokens` ids. next_token: (B, vocab) logits -> (B,) ids."""
    B = len(prompts)
    if B == 0 or max_new_tokens <= 0:
        return [[] for _ in range(B)]
    device = next(model.parameters()).device
    unique: dict[tuple[int, ...], int] = {}
    row_of = torch.tensor([unique.setdefault(tuple(p), len(unique)) for p in prompts], device=device)
    firsts = list(unique)
    width = max(len(p) for p in firsts)
    U = len(firsts)
    ids = torch.full((U, width), pad, dtype=torch.long)
    valid = torch.zeros((U, width + max_new_tokens), dtype=torch.bool)
    for r, p in enumerate(firsts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[r, width - len(p):width] = True
    ids, valid = ids.to(device), valid.to(device)
    # positions as `generate` computes them for left padding (pads at position 1; they are never attended to)
    pos = (valid[:, :width].long().cumsum(-1) - 1).masked_fill(~valid[:, :width], 1)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # padding queries see themselves, so no row of the prefill mask is empty (an empty row gives NaN values
    # that would reach real queries through the cache)
    mask = (causal & valid[:, None, :width]) | torch.eye(width, dtype=torch.bool, device=device)
    dec = Decoder(model, U, width + max_new_tokens)
    logits = dec.forward(ids, pos, 0, mask[:, None])
    nxt_pos = pos[:, -1] + 1
    if U < B:  # n samples of one prompt: its prefill is shared
        dec.select(row_of)
        logits, valid, nxt_pos = logits[row_of], valid[row_of], nxt_pos[row_of]
    bias = None
    if dec.matmul_attention:
        bias = torch.zeros(valid.shape, dtype=logits.dtype, device=device).masked_fill_(~valid, -float("inf"))
    out: list[list[int]] = [[] for _ in range(B)]
    live = list(range(B))                      # prompt index of each batch row
    open_ = [True] * B                         # per batch row: still generating
    for step in range(max_new_tokens):
        tok = next_token(logits)
        toks = tok.tolist()
        rows = [r for r in range(len(live)) if open_[r]]
        for r in rows:
            out[live[r]].append(toks[r])
            if toks[r] in eos:
                open_[r] = False
        if stopped is not None:
            rows = [r for r in rows if open_[r]]
            for r, hit in zip(rows, stopped([out[live[r]] for r in rows])):
                open_[r] = not hit
        n_open = sum(open_)
        if step == max_new_tokens - 1 or n_open == 0:
            break
        at = width + step
        valid[:, at] = True
        if bias is not None:
            bias[:, at] = 0.0
        if 2 * n_open <= len(live):  # compact: halving bounds the cache copies to log2(B)
            keep = [r for r in range(len(live)) if open_[r]]
            idx = torch.tensor(keep, device=device)
            dec.select(idx)
            valid, tok, nxt_pos = valid[idx], tok[idx], nxt_pos[idx]
            bias = None if bias is None else bias[idx]
            live, open_ = [live[r] for r in keep], [True] * len(keep)
        m = valid[:, None, None, :at + 1] if bias is None else bias[:, None, None, :at + 1]
        logits = dec.forward(tok[:, None], nxt_pos[:, None], at, m)
        nxt_pos = nxt_pos + 1
    return out
