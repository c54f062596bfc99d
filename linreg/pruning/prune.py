"""Choosing blocks and applying the cut: one-shot or iterative, removal or linear replacement, and sweeps over K.

One-shot (default): one calibration pass scores every block; the K best are cut together (``--select angular``:
the contiguous run of K blocks with the smallest angular distance between its input and its output, Gromov et
al.). With ``replace="linear"`` each chosen block's map is the least-squares fit of *its own* input -> output in
the original model (independent fits, the same pass).

Iterative (``iterative=True``): K rounds of score -> cut one block -> re-score the changed model. With
``replace="linear"`` each round's fit sees the blocks already replaced, so later maps compensate for earlier
ones (sequential fits). ``last`` and ``given`` pick the same blocks either way; with ``replace="linear"``
iterative mode still fits them one after the other. ``angular`` is refused with ``iterative`` (it chooses one run
of K blocks at once; one block per round would be ``angular1``).

Blocks already replaced by a linear map are never candidates (they would score a perfect 1), and no ``angular``
run contains one.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from linreg.errors import ConfigError
from linreg.hidden import find_blocks
from linreg.pruning.linear_block import LinearBlock
from linreg.pruning.select import (RANKED, SCORES, best_run, block_scores, block_statistics, rank_blocks,
                                   score_name)
from linreg.pruning.surgery import identity_block, provenance, remove_blocks, replace_blocks, swap_blocks

__all__ = ["prune_model", "sweep", "choose_last"]


def _eligible(model) -> list[int]:
    return [i for i, b in enumerate(find_blocks(model)) if not isinstance(b, LinearBlock)]


def choose_last(eligible: list[int], n_blocks: int, k: int) -> list[int]:
    """The k deepest eligible blocks, not counting the final block."""
    pool = [p for p in eligible if p != n_blocks - 1]
    if k > len(pool):
        raise ConfigError(f"--select last: only {len(pool)} blocks besides the final one can be removed, asked for {k}")
    return sorted(pool[-k:], reverse=True) if k else []


def _validate(select: str, replace: str, k: int, given: list[int] | None, n_eligible: int, n_total: int,
              iterative: bool = False) -> None:
    if select not in SCORES:
        raise ConfigError(f"--select {select!r}: choose from {', '.join(SCORES)}")
    if replace not in ("none", "linear"):
        raise ConfigError(f"--replace {replace!r}: choose none or linear")
    if select == "angular" and iterative:
        raise ConfigError("--select angular chooses one contiguous run of K blocks in a single pass (Gromov et al.); "
                          "it has no iterative form. Use --select angular1 --iterative to cut one block per round "
                          "by its own angular distance")
    if select == "given":
        if not given:
            raise ConfigError("--select given needs --layers i,j,...")
        if k and k != len(given):
            raise ConfigError(f"--remove {k} disagrees with the {len(given)} blocks named by --layers")
    elif given:
        raise ConfigError("--layers only goes with --select given")
    if k < 0:
        raise ConfigError(f"--remove must be >= 0, got {k}")
    if replace == "linear" and k > n_eligible:
        raise ConfigError(f"--remove {k}: the model has only {n_eligible} blocks that can be replaced")
    if replace == "none" and k >= n_total:
        raise ConfigError(f"--remove {k}: the model has {n_total} blocks; at least one must stay")


def _check_given(given: list[int], kept: list[int]) -> None:
    """``--layers`` names original block indices of blocks the model still has, each once."""
    bad = [g for g in given if g not in kept]
    if bad:
        raise ConfigError(f"--layers {bad}: not blocks of this model (its blocks are original indices {kept})")
    dup = sorted({g for g in given if given.count(g) > 1})
    if dup:
        raise ConfigError(f"--layers names blocks {dup} more than once")


def prune_model(model: torch.nn.Module, batches: list[dict], k: int, *, select: str = "linearity",
                replace: str = "none", iterative: bool = False, given: list[int] | None = None,
                metric: str = "linearity", progress: bool = False,
                on_round: Callable[[int, torch.nn.Module], None] | None = None) -> dict[str, Any]:
    """Cut ``k`` blocks of ``model`` in place; returns a report (original block indices throughout).

    ``on_round(r, model)`` is called after every round of iterative pruning (sweeps evaluate there).
    ``k = 0`` (or an empty ``given``) leaves the model as it is. For ``select="angular"`` the report's
    ``scores`` are ``d(l, k)`` keyed by the original index of each candidate run's first block."""
    blocks = find_blocks(model)
    info = provenance(model)
    n = len(blocks)
    if select == "given":
        k = len(given or [])
    _validate(select, replace, k, given, len(_eligible(model)), n, iterative)
    report: dict[str, Any] = {"select": select, "score": score_name(select, metric), "replace": replace,
                              "iterative": iterative, "remove": k, "rounds": []}
    if select == "given":
        _check_given(list(given), info["kept_layers"])
    rounds = k if iterative else 1
    per_round = 1 if iterative else k
    chosen_all: list[int] = []
    fit_quality: dict[int, float] = {}
    for r in range(rounds):
        if per_round == 0:
            break
        n_now = len(find_blocks(model))
        eligible = _eligible(model)
        kept = provenance(model)["kept_layers"]
        scores: dict[int, float] = {}
        if select in RANKED or select == "angular":
            need_full = select == "linearity" or replace == "linear"
            stats = block_statistics(model, batches, positions=eligible, full=need_full, progress=progress,
                                     desc=f"scoring (round {r + 1}/{rounds})" if iterative else "scoring",
                                     span=per_round if select == "angular" else 0)
            if select == "angular":
                picks, scores = best_run(stats, per_round, eligible)
            else:
                scores = block_scores(stats, select, metric)
                picks = rank_blocks(scores, select)[:per_round]
        elif select == "last":
            picks = choose_last(eligible, n_now, per_round if iterative else k)[:per_round]
            stats = None
        else:  # given: original indices -> current positions, in the order given
            todo = [g for g in given if g not in chosen_all]
            picks = [kept.index(g) for g in todo[:per_round]]
            stats = None
        picked_orig = [kept[p] for p in picks]
        report["rounds"].append({"scores": {str(kept[p]): v for p, v in scores.items()},
                                 "chosen": picked_orig})
        if replace == "linear":
            if stats is None or any(p not in stats.accs for p in picks):
                stats = block_statistics(model, batches, positions=picks, full=True, progress=progress,
                                         desc="fitting")
            maps = {p: stats.fit(p) for p in picks}
            for p in picks:
                fit_quality[kept[p]] = stats.result(p).linearity
            replace_blocks(model, maps)
        else:
            remove_blocks(model, picks)
        chosen_all.extend(picked_orig)
        if on_round is not None:
            on_round(r, model)
    report["chosen"] = chosen_all
    final = provenance(model)
    report["removed"] = sorted(final["removed"])
    report["replaced"] = sorted(final["linear"])
    report["kept_layers"] = list(final["kept_layers"])
    report["num_hidden_layers"] = {"before": n, "after": len(find_blocks(model))}
    if fit_quality:
        report["fit_r2"] = {str(k_): v for k_, v in sorted(fit_quality.items())}
    return report


def sweep(model: torch.nn.Module, batches: list[dict], ks: list[int], evaluate: Callable[[torch.nn.Module], float], *,
          select: str = "linearity", iterative: bool = False, given: list[int] | None = None,
          metric: str = "linearity", progress: bool = False,
          save_replaced: Callable[[int, torch.nn.Module], None] | None = None) -> dict[str, Any]:
    """Perplexity (``evaluate(model)``) against the number of cut blocks for removal and linear replacement.

    One-shot: one scoring pass (with the fits of every block); the K-block variants are evaluated by swapping
    identity maps (removal; the same function as deleting the blocks) or the fitted maps into the original model,
    which is restored afterwards. The blocks cut for each K are in ``chosen[K]``; for the ranked scores they are
    the first K of ``order``, for ``angular`` each K has its own best run (not nested). Iterative: each variant is
    pruned round by round on a copy and evaluated after each round; the blocks cut are ``removal_order`` and
    ``linear_order`` (the variants re-score different models, so they may differ). ``save_replaced(k, model)``
    is called on each linear variant (for distillation)."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 0:
        raise ConfigError(f"--sweep: block counts must be >= 0, got {ks}")
    kmax = max(ks)
    n = len(find_blocks(model))
    eligible = _eligible(model)
    kept = provenance(model)["kept_layers"]
    given = list(given) if given else None
    _validate(select, "none", 0, given, len(eligible), n, iterative)
    if given is not None:
        _check_given(given, kept)
    limit = min(len(eligible), n - 1)  # removal keeps one block; linear replacement needs eligible blocks
    if kmax > limit:
        raise ConfigError(f"--sweep up to {kmax} blocks, but only {limit} can be cut from this model "
                          f"({n} blocks, {len(eligible)} not yet replaced)")
    out: dict[str, Any] = {"ks": ks, "select": select, "score": score_name(select, metric), "iterative": iterative,
                           "removal": {}, "linear": {}, "chosen": {}}
    if 0 in ks:
        out["removal"]["0"] = out["linear"]["0"] = evaluate(model)
        out["chosen"]["0"] = []
    positive = [k for k in ks if k > 0]
    if not positive:
        return out
    if iterative:
        for variant, replace in (("removal", "none"), ("linear", "linear")):
            work = copy.deepcopy(model)

            def on_round(r: int, m: torch.nn.Module, variant=variant, replace=replace) -> None:
                if r + 1 in positive:
                    out[variant][str(r + 1)] = evaluate(m)
                    if replace == "linear" and save_replaced is not None:
                        save_replaced(r + 1, m)

            rep = prune_model(work, batches, kmax, select=select, replace=replace, iterative=True, given=given,
                              metric=metric, progress=progress, on_round=on_round)
            out[f"{variant}_order"] = rep["chosen"]
            del work
        del out["chosen"]  # the two variants may cut different blocks: removal_order and linear_order
        return out
    stats = block_statistics(model, batches, positions=eligible, full=True, progress=progress, desc="scoring",
                             span=kmax if select == "angular" else 0)
    runs: dict[int, list[int]] = {}
    if select == "angular":
        out["angular_distance"] = {}
        for k in positive:
            runs[k], dist = best_run(stats, k, eligible)
            out["angular_distance"][str(k)] = {str(kept[l]): v for l, v in dist.items()}
    else:
        if select in RANKED:
            scores = block_scores(stats, select, metric)
            order = rank_blocks(scores, select)
            out["scores"] = {str(kept[p]): v for p, v in scores.items()}
        elif select == "last":
            order = choose_last(eligible, n, kmax)
        else:
            order = [kept.index(g) for g in (given or [])]
        if kmax > len(order):
            raise ConfigError(f"--sweep up to {kmax} blocks, but only {len(order)} can be cut")
        out["order"] = [kept[p] for p in order[:kmax]]
        runs = {k: order[:k] for k in positive}
    maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    ref = next(model.parameters())
    for k in positive:
        picks = runs[k]
        out["chosen"][str(k)] = [kept[p] for p in picks]
        ident = {p: identity_block(model, p) for p in picks}
        with swap_blocks(model, ident):
            out["removal"][str(k)] = evaluate(model)
        lin = {}
        for p in picks:
            if p not in maps:
                maps[p] = stats.fit(p)
            w, b = maps[p]
            lin[p] = LinearBlock.from_affine(w, b, tuple_output=ident[p].tuple_output, layer_idx=p,
                                             attention_type=getattr(find_blocks(model)[p], "attention_type", None),
                                             dtype=ref.dtype, device=ref.device)
        with swap_blocks(model, lin):
            out["linear"][str(k)] = evaluate(model)
        if save_replaced is not None:
            work = copy.deepcopy(model)
            replace_blocks(work, {p: maps[p] for p in picks})
            save_replaced(k, work)
            del work
    return out
