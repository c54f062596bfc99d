"""Per-block statistics in one streaming pass, and the scores that rank blocks for pruning.

:func:`block_statistics` runs a model over batches with forward hooks on its decoder blocks and, as each block
finishes, folds the pair (block input, block output) into running statistics, so at most two hidden states are
alive at a time whatever the depth (``linreg.hidden.BlockCapture`` keeps all L + 1). Per block it keeps

* a :class:`~linreg.metrics.LinearityAccumulator` (``full=True``): every metric of ``linreg.metrics`` and the
  least-squares affine map (``fit_affine``) used for linear replacement;
* the sums over tokens of ``cos(x, y)`` and of the angular distance ``arccos(cos(x, y)) / pi`` (always; cheap);
* with ``span=N``: the sums of the angular distance between the input of block l and the output of block l+n-1,
  for every start l and every run length n <= N (Gromov et al.'s d(l, n)); the hooks keep the last N + 1 hidden
  states of the forward pass for it.

Pairing convention as in ``linreg.hidden``: pair i is block i's input -> block i's output, before any final norm.

Scores (``SCORES``), each turned into an order "most removable first":

``linearity``
    the block's linearity score (``linreg.metrics``; ``metric="linearity_wo_residual"`` for the score of its
    residual contribution instead); the most linear block first.
``cosine``
    ShortGPT's Block Influence ``BI = 1 - E[cos(x, y)]`` (Men et al., 2024); lowest influence first.
``angular``
    Gromov et al. (2024), "The Unreasonable Ineffectiveness of the Deeper Layers": to cut n blocks, the
    contiguous run l*, ..., l*+n-1 with the smallest ``d(l, n) = E[arccos(cos(x_l, x_{l+n}))] / pi``, where
    ``x_l`` is the input of block l and ``x_{l+n}`` the output of block l+n-1 (:func:`best_run`). Not a ranking
    of single blocks: the best runs for different n need not be nested. Averaged over every (non-padding) token,
    not only the last token of each sequence as in that paper.
``angular1``
    the same distance for single blocks (n = 1), ranked like ``cosine``: the K individually smallest, which
    need not be contiguous (cheap to keep; not the paper's rule for K > 1).
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

__all__ = ["SCORES", "RANKED", "BlockStats", "block_statistics", "block_scores", "rank_blocks", "score_name",
           "run_distances", "best_run"]

SCORES = ("linearity", "cosine", "angular", "angular1", "last", "given")
RANKED = ("linearity", "cosine", "angular1")  # scored per block; the K best are cut (nested in K)
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
    span: int = 0
    # span_sum[n][l]: sum over tokens of arccos(cos(input of block l, output of block l+n-1)) / pi, 1 <= n <= span
    span_sum: dict[int, dict[int, float]] = field(default_factory=dict)

    def cosine(self, i: int) -> float:
        if i in self.accs:
            return float(self.accs[i].result().cosine)
        return self.cos_sum[i] / self.n_tokens if self.n_tokens else float("nan")

    def angular(self, i: int) -> float:
        return self.ang_sum[i] / self.n_tokens if self.n_tokens else float("nan")

    def angular_run(self, start: int, n: int) -> float:
        """Gromov et al.'s ``d(start, n)``: mean angular distance / pi between the input of block ``start`` and
        the output of block ``start + n - 1`` (needs ``span >= n``)."""
        if not 1 <= n <= self.span:
            raise ConfigError(f"no angular distances over {n} blocks (collected with span={self.span})")
        if start not in self.span_sum[n]:
            raise ConfigError(f"no run of {n} blocks starts at block {start}")
        return self.span_sum[n][start] / self.n_tokens if self.n_tokens else float("nan")

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

    def __init__(self, model: torch.nn.Module, positions: list[int], sink, state_sink=None):
        self.blocks = find_blocks(model)
        self.positions = set(positions)
        self.sink = sink
        self.state_sink = state_sink  # optional: state_sink(s, h) for every state (s = 0: input of block 0)
        self.prev: torch.Tensor | None = None
        self.handles: list[Any] = []

    def _pre(self, module, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        if h is None:
            raise DataError(f"cannot find the hidden-state input of {type(module).__name__}")
        self.prev = _first_tensor(h).detach()
        if self.state_sink is not None:
            self.state_sink(0, self.prev)

    def _hook(self, i: int):
        def hook(module, args, output):
            y = _first_tensor(output).detach()
            if i in self.positions:
                self.sink(i, self.prev, y)
            if self.state_sink is not None:
                self.state_sink(i + 1, y)
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


def _unit_tokens(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The selected tokens of ``h`` [B, T, d] as unit vectors [N, d], in at least float32."""
    hs = h[mask] if mask is not None else h.reshape(-1, h.shape[-1])
    hu = hs.to(torch.promote_types(hs.dtype, torch.float32))
    return hu / hu.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _angle_sum(xu: torch.Tensor, yu: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ``arccos(cos(x, y)) / pi`` (float64 scalar) for unit vectors ``xu``, ``yu`` [N, d].

    angle = 2 atan2(|x^ - y^|, |x^ + y^|): accurate near 0 even in float32, where arccos(cos) is not
    (cos = 1 - 1e-7 is already an angle of 5e-4)."""
    ang = 2.0 * torch.atan2((xu - yu).norm(dim=-1), (xu + yu).norm(dim=-1))
    return ang.sum(dtype=torch.float64) / math.pi


@torch.no_grad()
def block_statistics(model: torch.nn.Module, batches: Iterable[dict[str, Any]], *, positions: Iterable[int] | None = None,
                     full: bool = True, accumulate_dtype: torch.dtype = torch.float64, progress: bool = False,
                     desc: str = "statistics", total: int | None = None, span: int = 0) -> BlockStats:
    """One pass of ``model`` over ``batches`` (dicts with ``input_ids`` [B, T] and optional ``attention_mask``;
    padding tokens are excluded). ``full=False`` skips the d x d accumulators (cosine and angular only).
    ``span=N`` also sums the angular distances ``d(l, n)`` of every run of n <= N consecutive blocks (for
    ``--select angular``), whatever ``positions`` says; it keeps N + 1 hidden states alive during a forward pass."""
    blocks = find_blocks(model)
    n = len(blocks)
    pos = list(range(n)) if positions is None else sorted({int(p) for p in positions})
    bad = [p for p in pos if not 0 <= p < n]
    if bad:
        raise ConfigError(f"block positions {bad} out of range for a model with {n} blocks")
    span = int(span)
    if not 0 <= span <= n:
        raise ConfigError(f"span {span}: runs of 0 to {n} blocks only (the model has {n} blocks)")
    stats = BlockStats(positions=pos, cos_sum={p: 0.0 for p in pos}, ang_sum={p: 0.0 for p in pos}, span=span)
    device = _model_device(model)
    extra = _forward_kwargs(model)
    state: dict[str, Any] = {"mask": None}
    sums = {p: torch.zeros(2, dtype=torch.float64, device=device) for p in pos}
    # run_sums[n - 1, l]: d(l, n) summed over tokens; the window holds the unit-vector states s-span .. s-1
    run_sums = torch.zeros(max(span, 1), n, dtype=torch.float64, device=device)
    window: dict[int, torch.Tensor] = {}

    def state_sink(s: int, h: torch.Tensor) -> None:
        if s == 0:
            window.clear()  # a new forward pass
        hu = _unit_tokens(h, state["mask"])
        for length in range(1, min(span, s) + 1):
            run_sums[length - 1, s - length] += _angle_sum(window[s - length], hu)
        window[s] = hu
        window.pop(s - span, None)

    def sink(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        mask = state["mask"]
        if full:
            acc = stats.accs.get(i)
            if acc is None:
                acc = stats.accs[i] = LinearityAccumulator(x.shape[-1], device=x.device, dtype=accumulate_dtype)
            acc.update(x, y, mask=mask)
        xu = _unit_tokens(x, mask)
        yu = _unit_tokens(y, mask)
        s = sums[i]
        s[1] += _angle_sum(xu, yu)
        if not full:  # with the accumulator, the mean cosine comes from its float64 statistics
            s[0] += (xu.double() * yu.double()).sum(-1).clamp(-1.0, 1.0).sum()

    iterator: Iterable = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=desc, unit="batch", total=total, dynamic_ncols=True)
    was = model.training
    model.eval()
    try:
        with _PairStream(model, pos, sink, state_sink if span else None):
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
    if span:
        table = run_sums.cpu()
        stats.span_sum = {length: {l: float(table[length - 1, l]) for l in range(n - length + 1)}
                          for length in range(1, span + 1)}
    if stats.n_tokens == 0:
        raise DataError("block_statistics: no tokens (empty batches)")
    return stats


def score_name(method: str, metric: str = "linearity") -> str:
    return {"linearity": metric, "cosine": "block_influence", "angular": "angular_distance",
            "angular1": "angular_distance_single_block"}.get(method, method)


def block_scores(stats: BlockStats, method: str, metric: str = "linearity") -> dict[int, float]:
    """Raw score of each block: linearity (higher = more removable), block influence 1 - E[cos] and single-block
    angular distance (lower = more removable)."""
    if method == "linearity":
        if metric not in ("linearity", "linearity_wo_residual"):
            raise ConfigError(f"linearity metric must be linearity or linearity_wo_residual, got {metric!r}")
        return {p: float(getattr(stats.result(p), metric)) for p in stats.positions}
    if method == "cosine":
        return {p: 1.0 - stats.cosine(p) for p in stats.positions}
    if method == "angular1":
        return {p: stats.angular(p) for p in stats.positions}
    if method == "angular":
        raise ConfigError("angular scores runs of blocks, not single blocks: use run_distances / best_run "
                          "(or angular1 for the single-block distance)")
    raise ConfigError(f"{method!r} has no score; scored methods: {', '.join(RANKED)}")


def run_distances(stats: BlockStats, n: int, eligible: Iterable[int] | None = None) -> dict[int, float]:
    """``{l: d(l, n)}`` for every run l .. l+n-1 made only of ``eligible`` positions (default: ``stats.positions``)."""
    ok = set(stats.positions if eligible is None else eligible)
    if not 1 <= n <= stats.span:
        raise ConfigError(f"no angular distances over {n} blocks (collected with span={stats.span})")
    return {l: stats.angular_run(l, n) for l in sorted(stats.span_sum[n]) if all(l + j in ok for j in range(n))}


def best_run(stats: BlockStats, n: int, eligible: Iterable[int] | None = None) -> tuple[list[int], dict[int, float]]:
    """Gromov et al.'s choice of ``n`` blocks to cut: the run ``l*, ..., l*+n-1`` with ``l* = argmin_l d(l, n)``
    among the runs of eligible positions (ties: the deeper run). Returns the run and ``{l: d(l, n)}``."""
    if n == 0:
        return [], {}
    dist = run_distances(stats, n, eligible)
    if not dist:
        raise ConfigError(f"--select angular: no run of {n} consecutive blocks that can be cut (blocks already "
                          f"replaced by linear maps break runs)")
    start = min(dist, key=lambda l: (_finite(dist[l], math.inf), -l))
    return list(range(start, start + n)), dist


def rank_blocks(scores: dict[int, float], method: str) -> list[int]:
    """Positions ordered most removable first (ties: the deeper block first, as it disturbs fewer states)."""
    if method == "linearity":
        key = lambda p: (-_finite(scores[p], -math.inf), -p)  # noqa: E731
    elif method in ("cosine", "angular1"):
        key = lambda p: (_finite(scores[p], math.inf), -p)  # noqa: E731
    else:
        raise ConfigError(f"cannot rank by {method!r}")
    return sorted(scores, key=key)


def _finite(v: float, default: float) -> float:
    return v if v is not None and math.isfinite(v) else default
