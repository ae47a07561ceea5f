"""ponder: teach language models to reason (SSFT/GFPO, one-pass multi-turn SFT, RISE, LaTRO).

Submodules import lazily: `import ponder` is cheap, the ML stack loads on first use.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"onepass_logprobs": "ponder.onepass", "npass_logprobs": "ponder.onepass"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:
        return importlib.import_module(f"ponder.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'ponder' has no attribute {name!r}") from None
