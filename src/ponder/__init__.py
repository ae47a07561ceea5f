"""ponder: teach language models to reason (SSFT/GFPO, one-pass multi-turn SFT, RISE, LaTRO).

Submodules import lazily: `import ponder` is cheap, the ML stack loads on first use. The components live in
``ponder.engine`` (rendering, data, trees, sampling, models) and ``ponder.methods`` (each method's math and
environment); their short names still work — ``from ponder import chat, rollout, tree``, ``import
ponder.rollout`` — and are the same module objects.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_LAZY = {"onepass_logprobs": "ponder.methods.onepass", "npass_logprobs": "ponder.methods.onepass"}
_GROUPS = ("engine", "methods")


class _ShortNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``ponder.<name>`` -> ``ponder.<group>.<name>`` for a component that lives in a group folder (asked only
    after the ordinary finders found no ``ponder/<name>.py``)."""

    def find_spec(self, name, path=None, target=None):
        parent, _, leaf = name.rpartition(".")
        if parent != "ponder" or leaf in _GROUPS:
            return None
        for group in _GROUPS:
            try:
                found = importlib.util.find_spec(f"ponder.{group}.{leaf}")
            except ModuleNotFoundError:
                found = None
            if found is not None:
                return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        leaf = spec.name.rpartition(".")[2]
        for group in _GROUPS:
            if importlib.util.find_spec(f"ponder.{group}.{leaf}") is not None:
                return importlib.import_module(f"ponder.{group}.{leaf}")
        raise ModuleNotFoundError(spec.name)

    def exec_module(self, module):
        pass  # already executed under its own name


if not any(isinstance(f, _ShortNames) for f in sys.meta_path):
    sys.meta_path.append(_ShortNames())


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:
        return importlib.import_module(f"ponder.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'ponder' has no attribute {name!r}") from None
