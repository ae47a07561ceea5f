"""ponder: teach language models to reason (SSFT/GFPO, one-pass multi-turn SFT, RISE, LaTRO).

Submodules import lazily: `import ponder` is cheap, the ML stack loads on first use.
"""

__version__ = "0.1.0"
