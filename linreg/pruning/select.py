"""Per-block statistics in one streaming pass, and the scores that rank blocks for pruning.

:func:`block_statistics` runs a model over batches with forward hooks on its decoder blocks and, as each block
finishes, folds the pair (block input, block output) into running statistics, so at most two hidden states are
alive at a time whatever the depth (``linreg.hidden.BlockCapture`` keeps all L + 1). Per block it keeps

* a :class:`~linreg.metrics.LinearityAccumulator` (``full=True``): every metric of ``linreg.metrics`` and the
  least-squares affine map (``fit_affine``) used for linear replacement;
* the sums over tokens of ``cos(x, y)`` and of the angular distance ``arccos(cos(x, y)) / pi`` (always; cheap).

Pairing convention as in ``linreg.hidden``: pair i is block i's input -> block i's output, before any final norm.

Scores (``SCORES``), each turned into an order "most removable first":

``linearity``
    the block's linearity score (``linreg.metrics``; ``metric="linearity_wo_residual"`` for the score of its
    residual contribution instead); the most linear block first.
``cosine``
    ShortGPT's Block Influence ``BI = 1 - E[cos(x, y)]`` (Men et al., 2024); lowest influence first.
``angular``
    the angular distance ``E[arccos(cos(x, y))] / pi`` of Gromov et al. (2024) for a single block (n = 1); the
    smallest first. Averaged over every token, not only the last token of each sequence as in that paper.
``last``
    the deepest blocks, excluding the final block (it is known to be critical; name it with ``given`` to remove
    it): removing K takes blocks L-1-K ... L-2.
``given``
    the blocks the user names, in that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from linreg.errors import ConfigError, DataError
from linreg.hidden import find_blocks
from linreg.metrics import LayerLinearity, LinearityAccumulator

__all__ = ["SCORES", "BlockStats", "block_statistics", "block_scores", "rank_blocks", "score_name"]

SCORES = ("linearity", "cosine", "angular", "last", "given")
_TINY = 1e-30


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    hs = getattr(out, "hidden_states", None)
    if isinstance(hs, torch.Tensor):
        return hs
    raise DataError(f"cannot find the hidden-state tensor in a decoder block's output of type {type(out).__name__}")


@dataclass
class BlockStats:
    """Statistics of the blocks at ``positions`` (current indices of the model's block list)."""

    positions: list[int]
    n_tokens: int = 0
    accs: dict[int, LinearityAccumulator] = field(default_factory=dict)
    cos_sum: dict[int, float] = field(default_factory=dict)
    ang_sum: dict[int, float] = field(default_factory=dict)

    def cosine(self, i: int) -> float:
        if i in self.accs:
            return float(self.accs[i].result().cosine)
        return self.cos_sum[i] / self.n_tokens if self.n_tokens else float("nan")

    def angular(self, i: int) -> float:
        return self.ang_sum[i] / self.n_tokens if self.n_tokens else float("nan")

    def result(self, i: int) -> LayerLinearity:
        if i not in self.accs:
            raise ConfigError(f"no linearity statistics for block {i} (collected with full=False)")
        return self.accs[i].result()

    def fit(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Least-squares ``(W, b)`` of block i (float64): ``y ~ x @ W + b``."""
        if i not in self.accs:
            raise ConfigError(f"no statistics to fit block {i} (collected with full=False)")
        return self.accs[i].fit_affine()


class _PairStream:
    """Forward hooks that hand each (input, output) pair of the selected blocks to ``sink`` as soon as the block
    has run, and drop states nobody needs."""

    def __init__(self, model: torch.nn.Module, positions: list[int], sink):
        self.blocks = find_blocks(model)
        self.positions = set(positions)
        self.sink = sink
        self.prev: torch.Tensor | None = None
        self.handles: list[Any] = []

    def _pre(self, module, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        if h is None:
            raise DataError(f"cannot find the hidden-state input of {type(module).__name__}")
        self.prev = _first_tensor(h).detach()

    def _hook(self, i: int):
        def hook(module, args, output):
            y = _first_tensor(output).detach()
            if i in self.positions:
                self.sink(i, self.prev, y)
            self.prev = y

        return hook

    def __enter__(self):
        self.handles.append(self.blocks[0].register_forward_pre_hook(self._pre, with_kwargs=True))
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.prev = None


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _forward_kwargs(model: torch.nn.Module) -> dict:
    import inspect

    extra: dict[str, Any] = {"use_cache": False}
    try:
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            extra["logits_to_keep"] = 1  # logits are not needed: keep the LM head cheap
    except (TypeError, ValueError):  # pragma: no cover
        pass
    return extra


@torch.no_grad()
def block_statistics(model: torch.nn.Module, batches: Iterable[dict[str, Any]], *, positions: Iterable[int] | None = None,
                     full: bool = True, accumulate_dtype: torch.dtype = torch.float64, progress: bool = False,
                     desc: str = "statistics", total: int | None = None) -> BlockStats:
    """One pass of ``model`` over ``batches`` (dicts with ``input_ids`` [B, T] and optional ``attention_mask``;
    padding tokens are excluded). ``full=False`` skips the d x d accumulators (cosine and angular only)."""
    blocks = find_blocks(model)
    n = len(blocks)
    pos = list(range(n)) if positions is None else sorted({int(p) for p in positions})
    bad = [p for p in pos if not 0 <= p < n]
    if bad:
        raise ConfigError(f"block positions {bad} out of range for a model with {n} blocks")
    stats = BlockStats(positions=pos, cos_sum={p: 0.0 for p in pos}, ang_sum={p: 0.0 for p in pos})
    device = _model_device(model)
    extra = _forward_kwargs(model)
    state: dict[str, Any] = {"mask": None}
    sums = {p: torch.zeros(2, dtype=torch.float64, device=device) for p in pos}

    def sink(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        mask = state["mask"]
        if full:
            acc = stats.accs.get(i)
            if acc is None:
                acc = stats.accs[i] = LinearityAccumulator(x.shape[-1], device=x.device, dtype=accumulate_dtype)
            acc.update(x, y, mask=mask)
        xs, ys = (x[mask], y[mask]) if mask is not None else (x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
        # angle = 2 atan2(|x^ - y^|, |x^ + y^|) for unit vectors x^, y^: accurate near 0 even in float32, where
        # arccos(cos) is not (cos = 1 - 1e-7 is already an angle of 5e-4); at least float32 arithmetic
        wd = torch.promote_types(xs.dtype, torch.float32)
        xu = xs.to(wd)
        yu = ys.to(wd)
        xu = xu / xu.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        yu = yu / yu.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        ang = 2.0 * torch.atan2((xu - yu).norm(dim=-1), (xu + yu).norm(dim=-1))
        s = sums[i]
        s[1] += ang.sum(dtype=torch.float64) / math.pi
        if not full:  # with the accumulator, the mean cosine comes from its float64 statistics
            s[0] += (xu.double() * yu.double()).sum(-1).clamp(-1.0, 1.0).sum()

    iterator: Iterable = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=desc, unit="batch", total=total, dynamic_ncols=True)
    was = model.training
    model.eval()
    try:
        with _PairStream(model, pos, sink):
            for batch in iterator:
                if "input_ids" not in batch:
                    raise DataError(f"batch without input_ids (keys: {sorted(batch)})")
                ids = torch.as_tensor(batch["input_ids"]).to(device).long()
                if ids.ndim == 1:
                    ids = ids.unsqueeze(0)
                mask = batch.get("attention_mask")
                if mask is not None:
                    mask = torch.as_tensor(mask).to(device)
                    if mask.ndim == 1:
                        mask = mask.unsqueeze(0)
                    state["mask"] = mask.bool()
                    stats.n_tokens += int(mask.bool().sum())
                else:
                    state["mask"] = None
                    stats.n_tokens += ids.numel()
                model(input_ids=ids, attention_mask=mask, **extra)
    finally:
        model.train(was)
    for p in pos:
        stats.cos_sum[p] = float(sums[p][0])
        stats.ang_sum[p] = float(sums[p][1])
    if stats.n_tokens == 0:
        raise DataError("block_statistics: no tokens (empty batches)")
    return stats


def score_name(method: str, metric: str = "linearity") -> str:
    return {"linearity": metric, "cosine": "block_influence", "angular": "angular_distance"}.get(method, method)


def block_scores(stats: BlockStats, method: str, metric: str = "linearity") -> dict[int, float]:
    """Raw score of each block: linearity (higher = more removable), block influence 1 - E[cos] and angular
    distance (lower = more removable)."""
    if method == "linearity":
        if metric not in ("linearity", "linearity_wo_residual"):
            raise ConfigError(f"linearity metric must be linearity or linearity_wo_residual, got {metric!r}")
        return {p: float(getattr(stats.result(p), metric)) for p in stats.positions}
    if method == "cosine":
        return {p: 1.0 - stats.cosine(p) for p in stats.positions}
    if method == "angular":
        return {p: stats.angular(p) for p in stats.positions}
    raise ConfigError(f"{method!r} has no score; scored methods: linearity, cosine, angular")


def rank_blocks(scores: dict[int, float], method: str) -> list[int]:
    """Positions ordered most removable first (ties: the deeper block first, as it disturbs fewer states)."""
    if method == "linearity":
        key = lambda p: (-_finite(scores[p], -math.inf), -p)  # noqa: E731
    elif method in ("cosine", "angular"):
        key = lambda p: (_finite(scores[p], math.inf), -p)  # noqa: E731
    else:
        raise ConfigError(f"cannot rank by {method!r}")
    return sorted(scores, key=key)


def _finite(v: float, default: float) -> float:
    return v if v is not None and math.isfinite(v) else default
