"""Example regularizer plugin for ``linreg`` (see docs/metrics.md, "Writing a regularizer plugin").

Use it from a recipe with ``regularizer: {name: "custom_regularizer:RelativeMSE", weight: 0.1}``
when ``examples/`` is on ``PYTHONPATH`` (or move the file into your own package and use
``"my_pkg.my_module:RelativeMSE"``).
"""

from __future__ import annotations

import torch

from linreg.regularizers import Regularizer


class RelativeMSE(Regularizer):
    """``weight * mean_{pairs, tokens} ||h_{l+1} - h_l||^2 / ||h_l||^2``.

    The squared relative contribution of each block (the per-token quantity behind the
    ``contribution_norm`` metric), so it is invariant to the growth of the residual-stream norm
    with depth, unlike the plain ``mse`` regularizer.
    """

    def __init__(self, weight, layers=None, eps: float = 1e-12, **kwargs):
        super().__init__(weight, layers, **kwargs)
        self.eps = float(eps)

    def __call__(self, hidden_states, attention_mask=None, model=None):
        terms = []
        for h0, h1 in self.pairs(hidden_states):
            per_token = (h1 - h0).pow(2).sum(-1) / h0.pow(2).sum(-1).clamp_min(self.eps)
            terms.append(self.masked_mean(per_token, attention_mask))
        return self.weight * torch.stack(terms).mean()
