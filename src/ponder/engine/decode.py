"""A lean decode loop for Llama-family models: the ``lean`` backend of `ponder.rollout.sample` (docs/methods.md §6.1).

HF `generate` grows its KV cache by concatenation (a copy of the whole cache per layer and step) and runs
logits processors, stopping criteria and mask builders every step. This loop runs the model's own sub-modules
(embedding, RMSNorms, projections, MLPs, rotary embedding — so LoRA-wrapped projections work unchanged) with:
- a static KV cache per layer, allocated once at (rows, kv heads, prompt width + max_new_tokens, head dim);
  fp32 for a bf16/fp16 model (bf16 rollouts, docs/methods.md §6.5);
- one batched forward per step, logits only at the last position;
- prompts shared by several rows (n samples per prompt) prefilled once, their cache rows copied; the prefix
  all prompts of a batch share (system prompt, chat template opening) prefilled once for all rows;
- decode steps run the projections from weights packed once per batch into oneDNN's layout (`step_linear`);
- finished rows compacted out of the batch and the cache once half of the open rows are done;
- `generate`'s sampling (`filtered_logits`: temperature, then top-k, then top-p; one multinomial draw per row).

What "the same as generate" means here: the prefill runs the operations `generate` runs; a decode step
computes attention of the single new query by two matmuls and a softmax instead of the fused sdpa kernel
(faster for one query; differences ~1e-7) and its projections by oneDNN's packed kernel (~1e-6), and the
shared prefix is computed in a batch of one; so greedy ids equal `generate`'s unless two logits tie to that
precision — tested exactly on the tiny and testbed models and SmolLM2 (bench/generation.py). Sampling draws
from exactly the distribution `generate` samples from (tested against the model's softmax by a chi-square
test), deterministic for a seed and batch size, but it consumes random numbers differently, so sampled ids
are not `generate`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer

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


@functools.cache
def _packing_works(dtype: torch.dtype) -> bool:
    """Whether this torch build packs and runs a `dtype` Linear through oneDNN (checked once on a tiny one)."""
    try:
        lin = torch.nn.Linear(8, 4).to(dtype)
        x = torch.ones(2, 8, dtype=dtype)
        got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), 2),
                                                 lin.bias, "none", [], "")
        return bool(torch.allclose(got.float(), lin(x).float(), rtol=1e-2, atol=1e-2))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _packable(linear) -> bool:
    return (type(linear) is torch.nn.Linear and linear.weight.device.type == "cpu"
            and linear.weight.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
            and _packing_works(linear.weight.dtype))


def step_linear(module, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` (a projection) as a decode step calls it. On CPU, in fp32 or bf16, a plain Linear's weight is
    reordered once into oneDNN's blocked layout (what torch.compile's CPU freezing does): at decode shapes
    (`rows` x 576 x 1536 on SmolLM2) the product is 1.3-1.5x faster in fp32 and 1.1-1.2x in bf16 than
    `F.linear` (bench/efficiency.py). The result equals `F.linear` to rounding (fp32: ~1e-6; bf16: bit-equal on
    the Zen 4 box). Where this torch build's oneDNN cannot pack a dtype (bf16 without AVX512 kernels), the
    module runs as it is. A PEFT LoRA projection keeps its adapters as PEFT computes them
    (``base(x) + B(A(x)) * scaling``) over a packed base; anything else (DoRA and other variants, merged or
    disabled adapters, fp64) is called as it is."""
    if _packable(module):
        w, b = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), rows), module.bias
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    base = getattr(module, "base_layer", None)
    adapters = [a for a in getattr(module, "active_adapters", ()) if a in getattr(module, "lora_A", {})]
    if (isinstance(module, LoraLayer) and _packable(base) and not module.merged and not module.disable_adapters
            and not any(a in getattr(module, "lora_variant", {}) for a in adapters)):
        packed = step_linear(base, rows)

        def lora(x):  # peft.tuners.lora.Linear.forward in eval mode (dropout is the identity)
            out = packed(x)
            for a in adapters:
                out = out + module.lora_B[a](module.lora_A[a](x.to(module.lora_A[a].weight.dtype))) * module.scaling[a]
            return out.to(x.dtype)
        return lora
    return module


class Decoder:
    """The forward of a Llama-shaped causal LM over a static KV cache (one instance per batch)."""

    def __init__(self, model, rows: int, length: int, pack: bool = False):
        self.lm, dec = _core(model)
        self.embed, self.layers, self.norm, self.rotary = dec.embed_tokens, dec.layers, dec.norm, dec.rotary_emb
        cfg = self.lm.config
        p = next(model.parameters())
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        # A decode step attends by two matmuls and a softmax (faster than the fused kernel for one query). A
        # bf16/fp16 model keeps its cache in fp32: keys and values are stored exactly (they were computed in
        # bf16), and the scores and softmax are fp32 as inside the fused kernel; bf16 matmul scores would round
        # them to 8 bits (docs/methods.md §6.5). fp64 keeps the fused kernel.
        self.matmul_attention = p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        self.cache_dtype = torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        # pack: decode steps run the projections packed (`step_linear`); the prefill runs the modules as they are
        packed = (lambda m: step_linear(m, rows)) if pack else (lambda m: m)  # noqa: E731
        self.steps = [{n: packed(getattr(layer.self_attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
                      | {n: packed(getattr(layer.mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")}
                      for layer in self.layers]
        self.head = packed(self.lm.lm_head)
        shape = (rows, self.kv_heads, length, self.head_dim)
        self.k = [torch.empty(shape, dtype=self.cache_dtype, device=p.device) for _ in self.layers]
        self.v = [torch.empty(shape, dtype=self.cache_dtype, device=p.device) for _ in self.layers]

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) cache rows: row i of the new cache is row rows[i] of the old one."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, T) go into cache slots [start, start+T). mask (B, 1, T, start+T): bool (True = may attend)
        for T > 1; for T == 1 additive (0 / -inf, `cache_dtype`) when `matmul_attention`, else bool. A 1-row
        call on a cache of more rows (the prompts' shared prefix) writes its keys and values into every row.
        Returns the logits at the last position, (B, vocab)."""
        B, T = ids.shape
        h = self.embed(ids)
        cos, sin = self.rotary(h, position_ids=positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        end, groups, hd = start + T, self.heads // self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            att, mlp = layer.self_attn, layer.mlp
            lin = self.steps[i] if T == 1 else {n: getattr(att, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
            x = layer.input_layernorm(h)
            q = lin["q_proj"](x).view(B, T, -1, hd)
            k = lin["k_proj"](x).view(B, T, -1, hd)
            v = lin["v_proj"](x).view(B, T, -1, hd).transpose(1, 2)
            if hasattr(att, "q_norm"):  # Qwen3: per-head RMSNorm before the rotation
                q, k = att.q_norm(q), att.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            self.k[i][:, :, start:end] = k
            self.v[i][:, :, start:end] = v
            keys, values = self.k[i][:B, :, :end], self.v[i][:B, :, :end]
            if T == 1:  # one query per row: the query heads sharing a kv head act as its queries (no repeat)
                qg = q.reshape(B, self.kv_heads, groups, hd)
                if self.matmul_attention:
                    if mask.dtype == torch.bool:  # a 1-token prefill (a 1-token prompt, prefix or rest)
                        mask = torch.zeros(mask.shape, dtype=keys.dtype, device=mask.device).masked_fill_(~mask, -torch.inf)
                    scores = torch.matmul(qg.to(keys.dtype), keys.transpose(-1, -2)).mul_(att.scaling).add_(mask)
                    o = torch.matmul(scores.softmax(-1), values).to(q.dtype)
                else:
                    o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=att.scaling)
            else:
                keys, values = keys.to(q.dtype), values.to(q.dtype)  # exact: the cache holds them losslessly
                if groups > 1:
                    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=att.scaling)
            o = o.reshape(B, self.heads, T, hd).transpose(1, 2).reshape(B, T, -1)
            h = h + lin["o_proj"](o)
            x = layer.post_attention_layernorm(h)
            if T == 1:  # LlamaMLP.forward over the packed projections
                h = h + lin["down_proj"](mlp.act_fn(lin["gate_proj"](x)) * lin["up_proj"](x))
            else:
                h = h + mlp(x)
        return (self.head if T == 1 else self.lm.lm_head)(self.norm(h[:, -1:]))[:, 0]


# A shared prefix is prefilled once when that saves at least this many prefill tokens: the extra 1-row forward
# costs about as much as this many tokens of a batched prefill (SmolLM2-135M on 2 CPU threads: ~20 ms of
# per-layer overhead against ~1 ms per token).
SHARED_PREFIX_MIN_SAVED = 32


# Decode steps run packed projections when a batch decodes at least this many tokens (rows x max_new_tokens):
# packing costs about one pass over the weights (~0.23 s for SmolLM2-135M in fp32, 2 CPU threads) and saves
# ~0.5 ms per row and step there (bench/efficiency.py), so it pays from ~500 tokens; twice that for margin.
PACK_MIN_TOKENS = 1024


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all `prompts` share and are prefilled once (0: none): the longest common prefix,
    at most the shortest prompt less one token (each prompt's last position gives its first logits), kept only
    when it saves at least `SHARED_PREFIX_MIN_SAVED` tokens of prefill. A system prompt and the chat template's
    opening are shared by every rollout prompt, as in vLLM's prefix caching."""
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n if n * (len(prompts) - 1) >= SHARED_PREFIX_MIN_SAVED else 0


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
    shared = shared_prefix(firsts)
    # cache slots: [0, shared) the prefix every prompt starts with, then each prompt's rest, left-padded
    ids = torch.full((U, width), pad, dtype=torch.long)
    valid = torch.zeros((U, width + max_new_tokens), dtype=torch.bool)
    for r, p in enumerate(firsts):
        ids[r, :shared] = torch.tensor(p[:shared], dtype=torch.long)
        ids[r, width - len(p) + shared:] = torch.tensor(p[shared:], dtype=torch.long)
        valid[r, :shared] = True
        valid[r, width - len(p) + shared:width] = True
    ids, valid = ids.to(device), valid.to(device)
    # positions as `generate` computes them for left padding (pads at position 1; they are never attended to)
    pos = (valid[:, :width].long().cumsum(-1) - 1).masked_fill(~valid[:, :width], 1)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # padding queries see themselves, so no row of the prefill mask is empty (an empty row gives NaN values
    # that would reach real queries through the cache)
    mask = (causal & valid[:, None, :width]) | torch.eye(width, dtype=torch.bool, device=device)
    dec = Decoder(model, U, width + max_new_tokens, pack=B * max_new_tokens >= PACK_MIN_TOKENS)
    if shared:  # the shared prefix once, written into every row's cache; then the rest of each prompt
        dec.forward(ids[:1, :shared], pos[:1, :shared], 0, mask[:1, None, :shared, :shared])
    logits = dec.forward(ids[:, shared:], pos[:, shared:], shared, mask[:, None, shared:])
    nxt_pos = pos[:, -1] + 1
    if U < B:  # n samples of one prompt: its prefill is shared
        dec.select(row_of)
        logits, valid, nxt_pos = logits[row_of], valid[row_of], nxt_pos[row_of]
    bias = None
    if dec.matmul_attention:
        bias = torch.zeros(valid.shape, dtype=dec.cache_dtype, device=device).masked_fill_(~valid, -float("inf"))
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
