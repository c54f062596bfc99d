"""Perplexity of a causal LM on held-out token blocks (batched, streaming, with a progress bar)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from linreg.errors import DataError

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: Any, *, batch_size: int = 8, progress: bool = True,
               desc: str = "perplexity") -> dict[str, float]:
    """``exp`` of the mean next-token negative log-likelihood over every predicted position of ``blocks``
    ([N, T] token ids; within each block positions 1..T-1 are predicted from their prefix, no padding).

    Returns ``{"perplexity", "nll", "tokens"}``; the NLL sum is accumulated in float64 on the model's device.
    """
    arr = np.asarray(blocks)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] < 2:
        raise DataError(f"perplexity: expected token blocks [N, T] with N >= 1 and T >= 2, got shape {arr.shape}")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    starts = range(0, len(arr), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", dynamic_ncols=True, leave=False)
    try:
        for s in starts:
            ids = torch.from_numpy(np.ascontiguousarray(arr[s:s + batch_size], dtype=np.int64)).to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                    ids[:, 1:].reshape(-1), reduction="sum")
            total += nll.double()
            count += ids[:, 1:].numel()
    finally:
        model.train(was)
    mean = float(total) / count
    return {"perplexity": math.exp(min(mean, 700.0)), "nll": mean, "tokens": count}
