"""linreg.metrics against an independent float64 numpy reference (lstsq on normalized matrices)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from linreg.errors import LinregError, NotEnoughTokensError
from linreg.metrics import (
    LayerLinearity,
    LinearityAccumulator,
    contribution_norm,
    layer_linearity,
    linearity_score,
    linearity_wo_residual,
    mean_cosine,
    per_token_error,
)

# ----------------------------------------------------------------------------------------------
# independent reference


def _normalized(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    a = a - a.mean(axis=0, keepdims=True)
    return a / np.linalg.norm(a)


def ref_fit(x, y):
    """(score, per-token squared residuals) by numpy lstsq on centered, unit-norm float64 data."""
    xn, yn = _normalized(x), _normalized(y)
    a, *_ = np.linalg.lstsq(xn, yn, rcond=None)
    resid = xn @ a - yn
    per_tok = (resid**2).sum(axis=1)
    return 1.0 - per_tok.sum(), per_tok


def ref_score(x, y):
    return ref_fit(x, y)[0]


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def make_pair(n: int, d: int, seed: int = 0, dtype=torch.float64, noise: float = 0.3):
    """A nonlinear, partly linear (x, y) pair with unequal feature scales."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    y = x + torch.tanh(x @ a) + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


# ----------------------------------------------------------------------------------------------
# linearity_score


def test_matches_reference_on_nonlinear_data():
    x, y = make_pair(1500, 24, seed=1)
    got = linearity_score(x, y)
    want = ref_score(np64(x), np64(y))
    assert 0.05 < want < 0.999  # the case is not trivial
    assert rel(got, want) < 1e-10


def test_exact_linear_map_scores_one():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(800, 16, generator=g, dtype=torch.float64)
    a = torch.randn(16, 16, generator=g, dtype=torch.float64)
    y = x @ a + torch.randn(16, generator=g, dtype=torch.float64)  # affine is fine: centering
    assert abs(linearity_score(x, y) - 1.0) < 1e-10
    # also a singular map (Y has rank 8)
    a[:, 8:] = 0
    assert abs(linearity_score(x, x @ a) - 1.0) < 1e-10


def test_independent_data_scores_chance_level():
    n, d = 4000, 32
    g = torch.Generator().manual_seed(3)
    scores = []
    for _ in range(3):
        x = torch.randn(n, d, generator=g)
        y = torch.randn(n, d, generator=g)
        s = linearity_score(x, y)
        assert rel(s, ref_score(np64(x), np64(y))) < 1e-9
        scores.append(s)
    chance = d / (n - 1)
    # score ~ Beta(d*d/2, (n-1-d)*d/2): std ~ sqrt(chance/(n*d/2)) ~ 2.5e-4, i.e. 3% of chance
    assert abs(np.mean(scores) - chance) < 0.1 * chance
    acc = LinearityAccumulator(d).update(x, y)
    assert acc.result().baseline == pytest.approx(chance, rel=1e-12)


def test_invariances():
    x, y = make_pair(1200, 20, seed=4)
    base = linearity_score(x, y)
    g = torch.Generator().manual_seed(5)
    m = torch.randn(20, 20, generator=g, dtype=torch.float64) + 3 * torch.eye(20, dtype=torch.float64)
    assert torch.linalg.cond(m) < 1e3
    assert rel(linearity_score(x @ m, y), base) < 1e-9  # invertible map of X
    assert rel(linearity_score(17.0 * x, 0.01 * y), base) < 1e-12  # scaling
    assert rel(linearity_score(x + 5.0, y - 3.0), base) < 1e-12  # translation
    assert rel(linearity_score(x, y @ m), ref_score(np64(x), np64(y @ m))) < 1e-9
    # per-feature scaling spanning 12 orders of magnitude (massive-activation-like features)
    w = torch.logspace(-6, 6, 20, dtype=torch.float64)
    assert rel(linearity_score(x * w, y), base) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_scored_in_float64(dtype):
    x, y = make_pair(600, 12, seed=6, dtype=dtype)
    assert x.dtype == dtype
    want = ref_score(np64(x), np64(y))  # the same (rounded) values, in float64
    assert rel(linearity_score(x, y), want) < 1e-9
    assert rel(linearity_wo_residual(x, y), ref_score(np64(x), np64(y) - np64(x))) < 1e-9


def test_rank_deficient_x():
    g = torch.Generator().manual_seed(7)
    n = 1000
    base = torch.randn(n, 10, generator=g, dtype=torch.float64)
    x = torch.cat(
        [
            base,
            base[:, :3] * 2.0,  # duplicated (scaled) features
            base[:, 3:5] @ torch.randn(2, 2, generator=g, dtype=torch.float64),  # linear combinations
            torch.zeros(n, 2, dtype=torch.float64),  # dead features
            torch.full((n, 1), 123.456, dtype=torch.float64),  # constant feature
        ],
        dim=1,
    )
    y = torch.tanh(base @ torch.randn(10, 18, generator=g, dtype=torch.float64)) + 0.1 * torch.randn(n, 18, generator=g, dtype=torch.float64)
    got = linearity_score(x, y)
    want = ref_score(np64(x), np64(y))
    assert math.isfinite(got) and 0 < got < 1
    assert rel(got, want) < 1e-9
    # the effective rank enters the chance level: 10 independent directions, not 18 features
    acc = LinearityAccumulator(18).update(x, y)
    r = acc.result()
    assert r.baseline == pytest.approx(10 / (n - 1), rel=1e-12)
    assert rel(r.linearity, want) < 1e-9


def test_wo_residual_contribution_and_cosine():
    x, y = make_pair(900, 16, seed=8)
    xs, ys = np64(x), np64(y)
    assert rel(linearity_wo_residual(x, y), ref_score(xs, ys - xs)) < 1e-10
    want_ratio = np.mean(np.linalg.norm(ys - xs, axis=1) / np.linalg.norm(xs, axis=1))
    want_cos = np.mean((xs * ys).sum(1) / (np.linalg.norm(xs, axis=1) * np.linalg.norm(ys, axis=1)))
    assert rel(contribution_norm(x, y), want_ratio) < 1e-12
    assert rel(mean_cosine(x, y), want_cos) < 1e-12


def test_per_token_error():
    x, y = make_pair(700, 10, seed=9, dtype=torch.float32)
    err = per_token_error(x, y)
    assert err.shape == (700,) and err.dtype == torch.float64
    _, want = ref_fit(np64(x), np64(y))
    np.testing.assert_allclose(err.numpy(), want, rtol=1e-8, atol=1e-15)
    assert float(err.sum()) == pytest.approx(1 - linearity_score(x, y), rel=1e-9)


def test_not_enough_tokens_message():
    d = 16
    x = torch.randn(d + 1, d)
    with pytest.raises(NotEnoughTokensError) as info:
        linearity_score(x, x * 2)
    msg = str(info.value)
    assert "17 tokens" in msg and "hidden size 16" in msg and "at least 18" in msg
    assert isinstance(info.value, LinregError)
    acc = LinearityAccumulator(d).update(x, x)
    with pytest.raises(NotEnoughTokensError, match="at least 18"):
        acc.result()
    with pytest.raises(NotEnoughTokensError):
        LinearityAccumulator(d).result()  # no tokens at all
    with pytest.raises(NotEnoughTokensError):
        per_token_error(x, x)
    # d + 2 tokens is the minimum that is accepted
    x = torch.randn(d + 2, d, dtype=torch.float64)
    assert math.isfinite(linearity_score(x, torch.randn(d + 2, d, dtype=torch.float64)))


def test_shape_errors():
    from linreg.errors import DataError

    with pytest.raises(DataError, match="same shape"):
        linearity_score(torch.randn(50, 4), torch.randn(50, 5))
    acc = LinearityAccumulator(4)
    with pytest.raises(DataError, match="dim 4"):
        acc.update(torch.randn(10, 5), torch.randn(10, 5))
    with pytest.raises(DataError, match="mask shape"):
        acc.update(torch.randn(2, 5, 4), torch.randn(2, 5, 4), mask=torch.ones(2, 4))


def test_non_finite_inputs_are_refused():
    """One Inf or NaN must not drop its feature silently and yield a normal-looking score."""
    from linreg.errors import DataError

    g = torch.Generator().manual_seed(31)
    x = torch.randn(300, 8, generator=g)
    y = x @ torch.randn(8, 8, generator=g)  # exactly linear: a real score would be 1
    for bad in (float("inf"), float("-inf"), float("nan")):
        xb = x.clone()
        xb[205, 0] = bad
        yb = y.clone()
        yb[7, 3] = bad
        for fn in (linearity_score, linearity_wo_residual, per_token_error):
            with pytest.raises(DataError, match=r"non-finite hidden states .* in x: fp16 overflow\? .*bfloat16"):
                fn(xb, y)
            with pytest.raises(DataError, match=r"non-finite hidden states .* in y"):
                fn(x, yb)
        for dtype in (torch.float64, torch.float32):
            acc = LinearityAccumulator(8, dtype=dtype).update(x[:100], y[:100]).update(xb[100:], y[100:])
            with pytest.raises(DataError, match=r"in x \(the block input\)"):
                acc.result()
            with pytest.raises(DataError, match="non-finite"):
                acc.fit_affine()
            acc = LinearityAccumulator(8, dtype=dtype).update(x, yb)
            with pytest.raises(DataError, match=r"in y \(the block output\)") as info:
                acc.result()
            assert ("float32 statistics overflowed" in str(info.value)) == (dtype == torch.float32)
        xb[205, 0] = 1.0  # the same data made finite again scores normally
        assert linearity_score(xb, y) > 0.99


def _spread_spectrum(n: int, d: int, seed: int):
    """Float32 x whose centered singular values spread over 1 .. 1e-4 (log-spaced), y using every direction."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -4, d, dtype=torch.float64)
    x = (u * s) @ v.T
    y = u @ torch.randn(d, d, generator=g, dtype=torch.float64) + 0.2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.float(), y.float()


def test_float32_statistics_report_and_warn_about_directions_cut_for_precision(monkeypatch):
    """float32 statistics cut eigenvalues below d * eps32: real directions are lost (scores too low); the result
    says how many (rank vs non-constant features, precision_cut) and a PrecisionWarning is raised once. float64
    statistics keep them all and match the reference; exactly dependent features are no precision cut."""
    import warnings

    import linreg.metrics as metrics

    monkeypatch.setattr(metrics, "_PRECISION_WARNED", set())
    n, d = 3000, 256
    x, y = _spread_spectrum(n, d, seed=32)
    want = ref_score(np64(x), np64(y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", metrics.PrecisionWarning)
        r64 = LinearityAccumulator(d).update(x, y).result()
    assert (r64.rank, r64.features, r64.precision_cut) == (d, d, 0)
    assert rel(r64.linearity, want) < 1e-8
    acc32 = LinearityAccumulator(d, dtype=torch.float32)
    for a in range(0, n, 500):
        acc32.update(x[a : a + 500], y[a : a + 500])
    with pytest.warns(metrics.PrecisionWarning, match=r"keep \d+ of the 256 non-constant .*float64") as rec:
        r32 = acc32.result()
        acc32.result()  # warned once, not once per call or block
    assert len(rec) == 1
    assert r32.features == d and r32.rank < d and r32.precision_cut > 0
    assert r32.rank + r32.precision_cut <= d
    assert r32.baseline == pytest.approx(r32.rank / (n - 1))
    assert want - r32.linearity > 1e-3  # the cost is not in "the last digits"
    assert r32.to_dict()["precision_cut"] == r32.precision_cut
    # exactly dependent features (duplicates of a well-conditioned x) lower the rank without a precision cut
    g = torch.Generator().manual_seed(33)
    base = torch.randn(n, 200, generator=g)
    xd = torch.cat([base, base[:, :56] * 2.0], dim=1)
    yd = torch.tanh(base @ torch.randn(200, d, generator=g) / 10)
    monkeypatch.setattr(metrics, "_PRECISION_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error", metrics.PrecisionWarning)
        for dtype in (torch.float64, torch.float32):
            r = LinearityAccumulator(d, dtype=dtype).update(xd, yd).result()
            assert (r.rank, r.features, r.precision_cut) == (200, d, 0), dtype


# ----------------------------------------------------------------------------------------------
# accumulator


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e6])
def test_accumulator_equals_one_shot_uneven_batches(offset):
    n, d = 1700, 20
    x, y = make_pair(n, d, seed=10)
    g = torch.Generator().manual_seed(11)
    x = x + offset * (1 + torch.rand(d, generator=g, dtype=torch.float64))  # large, different offsets
    y = y - offset * (1 + torch.rand(d, generator=g, dtype=torch.float64))
    acc = LinearityAccumulator(d)
    bounds = [0, 1, 4, 333, 334, 1000, 1699, 1700]
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc.update(x[a:b], y[a:b])
    assert acc.n_tokens == n
    r = acc.result()
    assert rel(r.linearity, linearity_score(x, y)) < 1e-9
    assert rel(r.linearity_wo_residual, linearity_wo_residual(x, y)) < 1e-9
    assert rel(r.contribution_norm, contribution_norm(x, y)) < 1e-9
    assert rel(r.cosine, mean_cosine(x, y)) < 1e-9
    # and against the reference computed on data centered in numpy
    xs, ys = np64(x), np64(y)
    assert rel(r.linearity, ref_score(xs, ys)) < 1e-9
    assert rel(r.linearity_wo_residual, ref_score(xs, ys - xs)) < 1e-9


def test_accumulator_float32_with_offset_matches_one_shot():
    # hidden states often carry large per-feature offsets; the float32 values are what they are,
    # both paths must agree on exactly those values
    x, y = make_pair(2000, 32, seed=12, dtype=torch.float32)
    x = x + 300.0
    y = y + 300.0
    acc = LinearityAccumulator(32)
    for a in range(0, 2000, 123):
        acc.update(x[a : a + 123], y[a : a + 123])
    assert rel(acc.result().linearity, linearity_score(x, y)) < 1e-9
    assert rel(acc.result().linearity, ref_score(np64(x), np64(y))) < 1e-9


def test_accumulator_mask_and_3d_input():
    b, t, d = 6, 50, 8
    x, y = make_pair(b * t, d, seed=13)
    x3, y3 = x.view(b, t, d), y.view(b, t, d)
    lengths = torch.tensor([50, 10, 33, 1, 0, 49])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    acc = LinearityAccumulator(d)
    acc.update(x3[:3], y3[:3], mask=mask[:3].long())  # 0/1 integer mask
    acc.update(x3[3:], y3[3:], mask=mask[3:])  # bool mask
    assert acc.n_tokens == int(lengths.sum())
    sel_x, sel_y = x3[mask], y3[mask]
    r = acc.result()
    assert rel(r.linearity, ref_score(np64(sel_x), np64(sel_y))) < 1e-9
    assert rel(r.contribution_norm, contribution_norm(sel_x, sel_y)) < 1e-12
    assert r.n_tokens == sel_x.shape[0] and r.dim == d
    # padding values must not matter
    x3p = x3.clone()
    x3p[~mask] = 1e6
    acc2 = LinearityAccumulator(d).update(x3p, y3, mask=mask)
    assert rel(acc2.result().linearity, r.linearity) < 1e-9


def test_accumulator_merge():
    x, y = make_pair(900, 12, seed=14)
    a = LinearityAccumulator(12).update(x[:200] + 50, y[:200])
    b = LinearityAccumulator(12).update(x[200:] + 50, y[200:])
    a.merge(b)
    assert rel(a.result().linearity, ref_score(np64(x), np64(y))) < 1e-9


def test_fit_affine_matches_lstsq_with_intercept():
    n, d = 1200, 14
    x, y = make_pair(n, d, seed=15)
    x = x + 40.0
    acc = LinearityAccumulator(d)
    for a in range(0, n, 250):
        acc.update(x[a : a + 250], y[a : a + 250])
    w, b = acc.fit_affine()
    assert w.shape == (d, d) and b.shape == (d,) and w.dtype == torch.float64
    xs = np.c_[np64(x), np.ones(n)]
    sol, *_ = np.linalg.lstsq(xs, np64(y), rcond=None)
    np.testing.assert_allclose(w.numpy(), sol[:-1], rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(b.numpy(), sol[-1], rtol=1e-8, atol=1e-8)
    # the fitted map reproduces the score: 1 - ||XW + b - Y||^2 / ||Yc||^2 = linearity
    pred = np64(x) @ w.numpy() + b.numpy()
    yc = np64(y) - np64(y).mean(0)
    assert rel(1 - ((pred - np64(y)) ** 2).sum() / (yc**2).sum(), acc.result().linearity) < 1e-9


def test_to_dict_is_json_ready():
    r = layer_linearity(*make_pair(300, 6, seed=16))
    assert isinstance(r, LayerLinearity)
    d = r.to_dict()
    assert set(d) == {"linearity", "linearity_wo_residual", "contribution_norm", "cosine", "n_tokens", "dim", "baseline",
                      "rank", "features", "precision_cut"}
    assert (d["rank"], d["features"], d["precision_cut"]) == (6, 6, 0)
    json.dumps(d, allow_nan=False)
    # an identity block has an undefined wo-residual score: NaN in the dataclass, None in JSON
    x = make_pair(300, 6, seed=17)[0]
    r2 = layer_linearity(x, x.clone())
    assert r2.linearity == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(r2.linearity_wo_residual)
    assert r2.to_dict()["linearity_wo_residual"] is None


# ----------------------------------------------------------------------------------------------
# two gloo ranks


def _rank_worker(rank: int, world: int, init_file: str, data_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from linreg.errors import DataError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = torch.load(data_file)
        x, y = data["x"][rank], data["y"][rank]
        acc = LinearityAccumulator(x.shape[-1])
        # uneven batches inside the rank too
        acc.update(x[:7], y[:7]).update(x[7:], y[7:])
        acc.all_reduce()
        try:  # a second all_reduce would count every rank's tokens twice: refused (on every rank, no collective)
            acc.all_reduce()
            second = "no error"
        except DataError as exc:
            second = str(exc)
        # token counts travel as int64: 2**24 + 3 is not a float32 number
        big = LinearityAccumulator(1, dtype=torch.float32)
        xb = torch.randn(2**24 + 1 if rank == 0 else 2, 1, generator=torch.Generator().manual_seed(rank))
        big.update(xb, 2 * xb)
        big.all_reduce()
        del xb
        # an accumulator that saw nothing on rank 1
        acc_empty = LinearityAccumulator(x.shape[-1])
        if rank == 0:
            acc_empty.update(x, y)
        acc_empty.all_reduce()
        w, b = acc.fit_affine()
        torch.save(
            {"result": acc.result().to_dict(), "n": acc.n_tokens, "w": w, "b": b, "empty": acc_empty.result().to_dict(),
             "second": second, "n_big": big.n_tokens},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_ranks_scores_the_union(tmp_path):
    import torch.multiprocessing as mp

    d = 10
    x0, y0 = make_pair(230, d, seed=18)
    x1, y1 = make_pair(410, d, seed=19)
    x1 = x1 * 3 + 1e4  # the ranks see differently located data: per-rank means differ a lot
    y1 = y1 - 5e3
    torch.save({"x": [x0, x1], "y": [y0, y1]}, tmp_path / "data.pt")
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "data.pt"), str(tmp_path)), nprocs=2, join=True)
    xu, yu = torch.cat([x0, x1]), torch.cat([y0, y1])
    want = ref_score(np64(xu), np64(yu))
    want_wo = ref_score(np64(xu), np64(yu - xu))
    sol, *_ = np.linalg.lstsq(np.c_[np64(xu), np.ones(len(xu))], np64(yu), rcond=None)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["n"] == 640
        assert "already holds the statistics of every rank" in out["second"]
        assert out["n_big"] == 2**24 + 3
        assert rel(out["result"]["linearity"], want) < 1e-9
        assert rel(out["result"]["linearity_wo_residual"], want_wo) < 1e-9
        assert rel(out["result"]["contribution_norm"], contribution_norm(xu, yu)) < 1e-9
        assert rel(out["result"]["cosine"], mean_cosine(xu, yu)) < 1e-9
        # the union is ill-conditioned on purpose (cond(Xc) ~ 5e4): the Gram route loses
        # ~eps*cond^2 ~ 1e-7 in W, but the least-squares objective is reached to 1e-9
        np.testing.assert_allclose(out["w"].numpy(), sol[:-1], rtol=1e-5, atol=1e-6)
        resid = ((np64(xu) @ out["w"].numpy() + out["b"].numpy() - np64(yu)) ** 2).sum()
        best = ((np.c_[np64(xu), np.ones(len(xu))] @ sol - np64(yu)) ** 2).sum()
        assert rel(resid, best) < 1e-9
        assert rel(out["empty"]["linearity"], ref_score(np64(x0), np64(y0))) < 1e-9
