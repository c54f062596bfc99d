"""linreg: layer linearity of transformers, measured, regularized and exploited.

Reproduction code for "Your Transformer is Secretly Linear" (Razzhigaev et al., 2024).
Heavy modules (torch, transformers, deepspeed) are imported by the submodules that need them,
so ``import linreg`` and ``linreg --help`` stay fast.
"""

__version__ = "0.1.0"
