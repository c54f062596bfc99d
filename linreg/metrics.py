"""Layer linearity metrics of "Your Transformer is Secretly Linear" (Razzhigaev et al., 2024).

Definitions (full text with formulas: ``docs/metrics.md``). For token embeddings X, Y of shape
``[n_tokens, d]`` (X = input of a block, Y = its output):

* **linearity score**: center both by their column means, divide each by its Frobenius norm
  (X~, Y~), then ``score = 1 - min_A ||X~ A - Y~||_F^2`` over all d x d matrices A. Equivalently the
  share of Y~'s energy that lies in the column space of X~: ``||P_X Y~||_F^2``, in [0, 1]. It is
  invariant to scaling, translation and any invertible linear map of X (and of Y).
* **chance level**: when Y is independent of X the score is about ``rank(X)/(n-1)`` (the share of a
  random direction of the (n-1)-dimensional centered token space that falls in a rank(X)-dimensional
  subspace). Every result carries it as ``baseline``; a score is only meaningful well above it.
  The score needs ``n > d + 1`` tokens (:class:`~linreg.errors.NotEnoughTokensError` otherwise).
* **linearity without residual**: the same score between X and Y - X (the block's own contribution).
* **contribution norm**: mean over tokens of ``||y - x|| / ||x||``.
* **cosine**: mean over tokens of ``cos(x, y)``.

Numerics. Everything is computed in float64 whatever the input dtype or device. Scores come from
sufficient statistics: the token count, the column means, the centered cross-products
``Cxx = Xc^T Xc`` and ``Cxt = Xc^T Tc`` (T the target) and the centered column sums of squares of T.
Batches are merged with the pairwise update of Chan, Golub & LeVeque (each batch is centered on its
own mean, then the means' offset enters as a rank-one correction), so large common offsets in the
hidden states never cancel catastrophically, and ranks of a distributed run merge the same way.
The projection ``||P_X T||^2 = tr(Cxt^T Cxx^+ Cxt)`` is evaluated with a symmetric eigendecomposition
of the Jacobi-scaled Gram matrix ``D Cxx D`` (``D = diag(Cxx)^-1/2``): the scaling removes the huge
spread of column scales of hidden states (outlier "massive activation" features) that dominates the
condition number, features constant over all tokens are dropped, and eigenvalues below
``rtol * max eigenvalue`` (default 1e-12, i.e. singular values below 1e-6 of the largest, the level of
float32 rounding of the inputs) are treated as zero, which makes the score well defined and stable
for rank-deficient X (duplicated, zero or linearly dependent features). The Gram route costs two
``n x d x d`` float64 products and O(d^2) memory independent of n, versus an SVD of the whole
``n x d`` matrix for the pseudo-inverse route of the paper's notebook.

The cut-off is never below ``d * eps`` of the statistics' dtype (the eigensolver's own accuracy).
In float64 that is 1e-12 or less up to d = 4503. ``LinearityAccumulator(dtype=torch.float32)`` is
lossy: its cut-off is ``d * eps32`` (4.9e-4 of the largest eigenvalue at d = 4096), which drops real
directions of hidden states with spread spectra, so their scores come out too low. Every result
therefore carries ``rank`` (directions kept), ``features`` (non-constant features) and
``precision_cut`` (dropped directions clearly above rounding noise), and a :class:`PrecisionWarning`
is raised once when ``precision_cut > 0``. NaN/Inf in the inputs raise DataError instead of
silently dropping the feature (a NaN diagonal entry fails every comparison).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

from linreg.errors import DataError, NotEnoughTokensError

__all__ = [
    "DEFAULT_RTOL",
    "LayerLinearity",
    "PrecisionWarning",
    "LinearityAccumulator",
    "linearity_score",
    "linearity_wo_residual",
    "contribution_norm",
    "mean_cosine",
    "per_token_error",
    "layer_linearity",
    "chance_level",
]

#: Relative cut-off on the eigenvalues of the Jacobi-scaled Gram matrix (see module docstring).
DEFAULT_RTOL = 1e-12
# A feature whose centered spread is below 64 ulps of its mean (in the accumulation dtype) is
# treated as constant (dropped) instead of being blown up to unit scale by the Jacobi scaling.
# Norms below this are treated as zero in per-token ratios (contribution norm, cosine).
_TINY = 1e-30


def chance_level(n_tokens: int, rank: int) -> float:
    """Expected linearity score of a target independent of X: ``rank / (n_tokens - 1)``."""
    return float(rank) / float(n_tokens - 1) if n_tokens > 1 else float("nan")


@dataclass
class LayerLinearity:
    """Linearity metrics of one pair (X = block input, Y = block output).

    ``baseline`` is the chance level ``rank(X)/(n_tokens-1)`` of ``linearity`` and
    ``linearity_wo_residual`` (equal to ``dim/(n_tokens-1)`` when X has full rank).
    A metric that is undefined (a target constant over all tokens) is NaN, and None in ``to_dict``.

    ``rank`` is the number of directions of X kept in the least-squares solve and ``features`` the
    number of features of X that vary over the tokens (``rank <= features <= dim``). ``rank <
    features`` means dependent features: exactly (duplicated, or tied by a norm), or too weak to
    resolve. ``precision_cut`` counts the dropped directions whose eigenvalue was clearly above
    rounding noise (``64 * eps`` of the largest) but below the cut-off that the accumulation dtype
    forces (``d * eps``; with float32 statistics 1.2e-4 of the largest eigenvalue at d = 1024): real
    directions whose share of Y is missing from the scores, so they come out too low (a lower bound:
    weaker real directions are dropped too). It is 0 with float64 statistics up to d = 4503 (see
    :class:`PrecisionWarning`).
    """

    linearity: float
    linearity_wo_residual: float
    contribution_norm: float
    cosine: float
    n_tokens: int
    dim: int
    baseline: float
    rank: int | None = None
    features: int | None = None
    precision_cut: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become None)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
        return out


class PrecisionWarning(UserWarning):
    """Real directions of X were dropped because of the accumulation dtype's resolution.

    Emitted once per process and statistics dtype; ``LayerLinearity.precision_cut`` says how many
    directions each block lost. With float32 statistics the fix is float64 (the default).
    """


_PRECISION_WARNED: set[str] = set()


def _warn_precision(proj: "_Projector") -> None:
    key = str(proj.dtype)
    if proj.precision_cut <= 0 or key in _PRECISION_WARNED:
        return
    _PRECISION_WARNED.add(key)
    name = key.replace("torch.", "")
    if proj.dtype == torch.float64:
        advice = (f"this is the accuracy limit of the float64 eigensolver at d = {proj.dim}; the lost share is "
                  f"at most the energy of Y in those directions")
    else:
        advice = "accumulate the statistics in float64 (the default; --accumulate-dtype float64)"
    warnings.warn(
        f"{name} linearity statistics keep {proj.rank} of the {proj.features} non-constant feature directions "
        f"of X; at least {proj.precision_cut} of the dropped ones are real directions (eigenvalues between the "
        f"{name} rounding level, 64 eps, and the eigensolver cut-off, d * eps = {proj.cut:.1e} of the largest), "
        f"so the scores miss their share of Y and come out too low; {advice}. Warned once; "
        f"LayerLinearity.rank, .features and .precision_cut give the numbers of every block.",
        PrecisionWarning,
        stacklevel=2,
    )


def _nonfinite(where: str, dtype: torch.dtype | None = None) -> DataError:
    extra = ""
    if dtype is not None and dtype != torch.float64:
        extra = f", or the {str(dtype).replace('torch.', '')} statistics overflowed (accumulate in float64)"
    return DataError(
        f"non-finite hidden states (NaN or Inf) in {where}: fp16 overflow? run the model in bfloat16 or "
        f"float32 (--dtype bfloat16/float32){extra}; a score of such data would be meaningless"
    )


def _all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ----------------------------------------------------------------------------------------------
# input handling


def _as_2d(name: str, t: Any, dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.ndim < 1:
        raise DataError(f"{name}: expected a tensor of shape [..., d], got a scalar")
    if dim is not None and t.shape[-1] != dim:
        raise DataError(f"{name}: last dimension is {t.shape[-1]}, expected hidden size {dim}")
    if not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.float64)
    if t.is_complex():
        raise DataError(f"{name}: complex tensors are not supported")
    return t.reshape(-1, t.shape[-1])


def _check_pair(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = _as_2d("x", x)
    y2 = _as_2d("y", y)
    if x2.shape != y2.shape:
        raise DataError(f"x and y must have the same shape [n_tokens, d]; got {tuple(x2.shape)} and {tuple(y2.shape)}")
    return x2, y2


def _chunk_rows(dim: int) -> int:
    """Rows per float64 chunk: about 4 M elements (32 MB) per chunk matrix."""
    return max(256, (1 << 22) // max(dim, 1))


# ----------------------------------------------------------------------------------------------
# the solve shared by every score


class _Projector:
    """Pseudo-inverse of a centered Gram matrix ``Cxx`` in Jacobi-scaled coordinates.

    ``Cxx^+ ~= S V diag(1/lam) V^T S`` restricted to the non-constant features ``idx``, with
    ``S = diag(Cxx[idx, idx])^-1/2`` and the eigenpairs (lam, V) of ``S Cxx S`` above the cut-off
    ``cut = max(rtol, d * eps) * max(lam)``. ``precision_cut`` counts the eigenvalues above
    ``max(rtol, 64 * eps) * max(lam)`` (clearly above the rounding noise of an exact dependency)
    that the cut still drops: directions lost to the dtype's resolution, not dependent features.
    """

    def __init__(self, cxx: torch.Tensor, n: int, mean_x: torch.Tensor, rtol: float):
        diag = cxx.diagonal()
        eps = torch.finfo(cxx.dtype).eps
        self.dtype = cxx.dtype
        self.dim = cxx.shape[0]
        # eigenvalues below ~d * eps * max are rounding noise of eigh itself, whatever rtol says
        self.cut = max(float(rtol), self.dim * eps)
        floor = max(float(rtol), 64 * eps)
        self.precision_cut = 0
        if not _all_finite(diag, mean_x):
            raise _nonfinite("x", cxx.dtype)  # callers check first; NaN would silently drop features here
        const_level = n * (64 * eps * mean_x.abs()) ** 2
        ok = (diag > const_level) & (diag > 0)
        self.idx = torch.nonzero(ok).flatten()
        self.features = int(self.idx.numel())
        if self.idx.numel() == 0:
            self.scale = diag.new_zeros(0)
            self.vecs = cxx.new_zeros(0, 0)
            self.lam = diag.new_zeros(0)
            return
        scale = diag[self.idx].rsqrt()
        sub = cxx if self.idx.numel() == self.dim else cxx[self.idx][:, self.idx]
        gs = sub * scale[:, None] * scale[None, :]
        gs = 0.5 * (gs + gs.T)
        lam, vecs = torch.linalg.eigh(gs)
        top = lam.max().clamp_min(0)
        keep = lam > self.cut * top
        self.precision_cut = int(((lam > floor * top) & ~keep).sum())
        self.scale = scale
        self.lam = lam[keep]
        self.vecs = vecs[:, keep]
        _warn_precision(self)

    @property
    def rank(self) -> int:
        return int(self.lam.numel())

    def coefficients(self, cxt: torch.Tensor) -> torch.Tensor:
        """``V^T S Cxt[idx]`` ([rank, d_t]): coordinates of X^T T in the whitened basis."""
        return self.vecs.T @ (self.scale[:, None] * cxt[self.idx])

    def explained(self, cxt: torch.Tensor) -> float:
        """``||P_X T||_F^2 = tr(Cxt^T Cxx^+ Cxt)`` for the centered target T."""
        if self.rank == 0:
            return 0.0
        p = self.coefficients(cxt)
        return float(((p * p).sum(dim=1) / self.lam).sum())

    def solve(self, cxt: torch.Tensor) -> torch.Tensor:
        """Least-squares map ``A = Cxx^+ Cxt`` ([d, d_t]), zero rows for dropped features."""
        out = cxt.new_zeros(self.dim, cxt.shape[1])
        if self.rank:
            p = self.coefficients(cxt) / self.lam[:, None]
            out[self.idx] = self.scale[:, None] * (self.vecs @ p)
        return out


def _share(projector: _Projector, cxt: torch.Tensor, qt: torch.Tensor) -> float:
    total = float(qt.sum())
    if not total > 0:
        return float("nan")  # constant target: the share of its (zero) energy is undefined
    return projector.explained(cxt) / total


# ----------------------------------------------------------------------------------------------
# streaming statistics


class LinearityAccumulator:
    """Streaming float64 sufficient statistics of (X, Y) pairs for one block; O(d^2) memory.

    Keeps the token count, column means of X and Y, centered cross-products ``Cxx = Xc^T Xc`` and
    ``Cxz = Xc^T Zc`` with ``Z = Y - X`` (the block's residual-branch contribution; ``Cxy = Cxx + Cxz``
    follows without cancellation, while taking Cxz directly keeps the small residual branch of deep
    models accurate), centered column sums of squares of Y and Z, and running sums of the per-token
    contribution-norm ratio and cosine. Batches merge by Chan's pairwise update (module docstring).

    ``update(x, y, mask)`` takes ``[..., d]`` tensors of any dtype/device; ``mask`` (shape ``[...]``,
    bool or 0/1) selects the tokens to count (exclude padding). ``all_reduce`` merges the statistics
    of every torch.distributed rank in place, so all ranks then score the union of their tokens.

    ``dtype`` (default float64) is the dtype of the statistics and of the solve. float32 is lossy, not
    just in the last digits: eigenvalues below ``d * eps32`` of the largest are cut (real directions of
    spread-spectrum hidden states; see the module docstring and ``LayerLinearity.precision_cut``). Use
    it only where float64 is much slower (consumer GPUs); H100/H200-class GPUs run float64 fast.

    Read-only attributes (after the first update): ``n_tokens``; ``mean_x``, ``mean_y`` [d];
    ``cxx``, ``cxz`` [d, d] (centered); ``qy``, ``qz`` [d] (centered column sums of squares of Y and
    of Y - X, so ``qy.sum()`` is ``||Yc||_F^2``); ``sums`` = [sum of ||y-x||/||x||, sum of cos(x, y)].
    """

    def __init__(self, dim: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64):
        if int(dim) <= 0:
            raise DataError(f"LinearityAccumulator: dim must be positive, got {dim}")
        if not dtype.is_floating_point:
            raise DataError(f"LinearityAccumulator: dtype must be a floating dtype, got {dtype}")
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.n_tokens = 0
        self._alloc_done = False
        self._reduced = False

    # -- storage ------------------------------------------------------------------------------
    def _alloc(self, device: torch.device) -> None:
        d, kw = self.dim, {"dtype": self.dtype, "device": device}
        self.device = device
        self.mean_x = torch.zeros(d, **kw)
        self.mean_y = torch.zeros(d, **kw)
        self.cxx = torch.zeros(d, d, **kw)
        self.cxz = torch.zeros(d, d, **kw)
        self.qy = torch.zeros(d, **kw)
        self.qz = torch.zeros(d, **kw)
        # [sum of ||y-x||/||x||, sum of cos(x, y)]
        self.sums = torch.zeros(2, **kw)
        self._alloc_done = True

    def _ensure(self, like: torch.Tensor) -> None:
        if not self._alloc_done:
            self._alloc(self.device if self.device is not None else like.device)

    # -- updates ------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> "LinearityAccumulator":
        """Add the tokens of ``x``, ``y`` (``[..., d]``) selected by ``mask`` (``[...]``)."""
        if x.shape != y.shape:
            raise DataError(f"update: x and y shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.shape[-1] != self.dim:
            raise DataError(f"update: last dimension is {x.shape[-1]}, accumulator has dim {self.dim}")
        self._ensure(x)
        x = x.detach()
        y = y.detach()
        if mask is not None:
            mask = torch.as_tensor(mask, device=x.device)
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise DataError(f"update: mask shape {tuple(mask.shape)} does not match tokens shape {tuple(x.shape[:-1])}")
            mask = mask.bool()
            x, y = x[mask], y[mask]
        x = x.reshape(-1, self.dim)
        y = y.reshape(-1, self.dim)
        rows = _chunk_rows(self.dim)
        for start in range(0, x.shape[0], rows):
            self._update_chunk(x[start : start + rows], y[start : start + rows])
        return self

    def _update_chunk(self, x: torch.Tensor, y: torch.Tensor) -> None:
        m = x.shape[0]
        if m == 0:
            return
        # fresh float64 copies, modified in place below (three chunk-sized buffers in all)
        xc = x.to(device=self.device, dtype=self.dtype, copy=True)
        zc = y.to(device=self.device, dtype=self.dtype, copy=True)
        # per-token ratios on the raw values
        xn = torch.linalg.vector_norm(xc, dim=1)
        yn = torch.linalg.vector_norm(zc, dim=1)
        self.sums[1] += (torch.linalg.vecdot(xc, zc) / (xn * yn).clamp_min(_TINY)).sum()
        zc -= xc  # z = y - x
        self.sums[0] += (torch.linalg.vector_norm(zc, dim=1) / xn.clamp_min(_TINY)).sum()
        # batch-centered moments
        mx = xc.mean(dim=0)
        mz = zc.mean(dim=0)
        my = mx + mz
        xc -= mx
        zc -= mz
        n = self.n_tokens
        if n == 0:
            torch.mm(xc.T, xc, out=self.cxx)
            torch.mm(xc.T, zc, out=self.cxz)
        else:
            total = n + m
            w = n * m / total
            dx = mx - self.mean_x
            dy = my - self.mean_y
            dz = dy - dx
            self.cxx.addmm_(xc.T, xc).addr_(dx, dx, alpha=w)
            self.cxz.addmm_(xc.T, zc).addr_(dx, dz, alpha=w)
        # column sums of squares, squaring the buffers in place (a contiguous reduction over rows
        # is much faster than a strided column norm)
        qy = torch.add(xc, zc).square_().sum(dim=0)
        qz = zc.square_().sum(dim=0)
        if n == 0:
            self.mean_x.copy_(mx)
            self.mean_y.copy_(my)
            self.qy.copy_(qy)
            self.qz.copy_(qz)
        else:
            self.qy.add_(qy).add_(dy * dy, alpha=w)
            self.qz.add_(qz).add_(dz * dz, alpha=w)
            self.mean_x.add_(dx, alpha=m / total)
            self.mean_y.add_(dy, alpha=m / total)
        self.n_tokens = n + m

    def merge(self, other: "LinearityAccumulator") -> "LinearityAccumulator":
        """Add the statistics of another accumulator (same dim) into this one."""
        if other.dim != self.dim:
            raise DataError(f"merge: dims differ ({self.dim} vs {other.dim})")
        if other.n_tokens == 0:
            return self
        self._ensure(other.cxx)
        if self.n_tokens == 0:
            for name in ("mean_x", "mean_y", "cxx", "cxz", "qy", "qz", "sums"):
                getattr(self, name).copy_(getattr(other, name).to(self.device, self.dtype))
            self.n_tokens = other.n_tokens
            return self
        n, m = self.n_tokens, other.n_tokens
        total = n + m
        w = n * m / total
        o = {k: getattr(other, k).to(self.device, self.dtype) for k in ("mean_x", "mean_y", "cxx", "cxz", "qy", "qz", "sums")}
        dx = o["mean_x"] - self.mean_x
        dy = o["mean_y"] - self.mean_y
        dz = dy - dx
        self.cxx.add_(o["cxx"]).addr_(dx, dx, alpha=w)
        self.cxz.add_(o["cxz"]).addr_(dx, dz, alpha=w)
        self.qy.add_(o["qy"]).add_(dy * dy, alpha=w)
        self.qz.add_(o["qz"]).add_(dz * dz, alpha=w)
        self.sums.add_(o["sums"])
        self.mean_x.add_(dx, alpha=m / total)
        self.mean_y.add_(dy, alpha=m / total)
        self.n_tokens = total
        return self

    @torch.no_grad()
    def all_reduce(self, group: Any = None) -> "LinearityAccumulator":
        """Merge the statistics of all ranks of ``group`` in place (every rank gets the union).

        Ranks' means differ, so centered moments cannot simply be summed: each rank first moves its
        moments from its own mean to the global mean (``C + n_r d_r d_r^T`` with ``d_r = mean_r -
        mean``, a sum of positive terms, no cancellation), then everything is summed. Three
        collectives: the token counts (int64, exact at any count), the weighted means, the moments.
        A no-op when torch.distributed is not initialized (a world of one). Every rank must call it,
        also ranks that saw no tokens. Allowed once per accumulator: afterwards every rank holds the
        union, so a second call would count every rank's tokens again (DataError); use a fresh
        accumulator for the next measurement.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self._reduced:
            raise DataError(
                "all_reduce: this accumulator already holds the statistics of every rank; a second all_reduce "
                "would count each rank's tokens again (use a fresh LinearityAccumulator per measurement)"
            )
        if not self._alloc_done:
            dev = self.device
            if dev is None:
                dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
            self._alloc(dev)
        d = self.dim
        count = torch.tensor([self.n_tokens], dtype=torch.int64, device=self.device)
        dist.all_reduce(count, group=group)
        n_total = int(count.item())
        self._reduced = True
        if n_total == 0:
            return self
        n_local = float(self.n_tokens)
        head = torch.cat([n_local * self.mean_x, n_local * self.mean_y])
        dist.all_reduce(head, group=group)
        gx = head[:d] / n_total
        gy = head[d:] / n_total
        dx = self.mean_x - gx
        dy = self.mean_y - gy
        dz = dy - dx
        body = torch.cat(
            [
                (self.cxx + n_local * torch.outer(dx, dx)).flatten(),
                (self.cxz + n_local * torch.outer(dx, dz)).flatten(),
                self.qy + n_local * dy * dy,
                self.qz + n_local * dz * dz,
                self.sums,
            ]
        )
        dist.all_reduce(body, group=group)
        dd = d * d
        self.cxx.copy_(body[:dd].view(d, d))
        self.cxz.copy_(body[dd : 2 * dd].view(d, d))
        self.qy.copy_(body[2 * dd : 2 * dd + d])
        self.qz.copy_(body[2 * dd + d : 2 * dd + 2 * d])
        self.sums.copy_(body[2 * dd + 2 * d :])
        self.mean_x.copy_(gx)
        self.mean_y.copy_(gy)
        self.n_tokens = n_total
        return self

    # -- results ------------------------------------------------------------------------------
    def _check_enough(self, what: str) -> None:
        if self.n_tokens <= self.dim + 1:
            raise NotEnoughTokensError(self.n_tokens, self.dim, what)

    def _check_finite(self) -> None:
        """DataError if a NaN/Inf reached the statistics (NaN would otherwise drop features silently)."""
        if not _all_finite(self.mean_x, self.cxx):
            raise _nonfinite("x (the block input)", self.dtype)
        if not _all_finite(self.mean_y, self.cxz, self.qy, self.qz, self.sums):
            raise _nonfinite("y (the block output)", self.dtype)

    def _projector(self, rtol: float) -> _Projector:
        self._check_finite()
        return _Projector(self.cxx, self.n_tokens, self.mean_x, rtol)

    @torch.no_grad()
    def result(self, rtol: float = DEFAULT_RTOL) -> LayerLinearity:
        """All metrics of the tokens seen so far.

        Raises NotEnoughTokensError if n <= d + 1, and DataError if the statistics are not finite
        (NaN/Inf hidden states). Warns once (:class:`PrecisionWarning`) when the accumulation dtype
        forced real directions of X out of the solve (``precision_cut > 0``).
        """
        self._check_enough("linearity score")
        proj = self._projector(rtol)
        cxy = self.cxx + self.cxz
        n = self.n_tokens
        return LayerLinearity(
            linearity=_share(proj, cxy, self.qy),
            linearity_wo_residual=_share(proj, self.cxz, self.qz),
            contribution_norm=float(self.sums[0]) / n,
            cosine=float(self.sums[1]) / n,
            n_tokens=n,
            dim=self.dim,
            baseline=chance_level(n, proj.rank),
            rank=proj.rank,
            features=proj.features,
            precision_cut=proj.precision_cut,
        )

    @torch.no_grad()
    def fit_affine(self, rtol: float = DEFAULT_RTOL) -> tuple[torch.Tensor, torch.Tensor]:
        """Least-squares ``(W [d, d], b [d])`` with ``y ~ x @ W + b`` on the raw data (float64).

        Minimum-norm solution (in Jacobi-scaled coordinates) when X is rank deficient; features
        constant over all tokens get zero rows (their effect is absorbed in ``b``). Solved from the
        Gram matrix, so W carries a relative error of about ``eps64 * cond(Xs)^2`` (Xs the centered,
        Jacobi-scaled X; e.g. 1e-8 for cond 1e4), while the least-squares objective is reached to
        near float64 precision, far below what a bf16/fp32 replacement layer can resolve.
        """
        self._check_enough("affine fit")
        proj = self._projector(rtol)
        w = proj.solve(self.cxx + self.cxz)
        b = self.mean_y - self.mean_x @ w
        return w, b


# ----------------------------------------------------------------------------------------------
# one-shot functions


class _PairMoments:
    """Chunked centered moments of (X, T) for the one-shot scores (T = Y, or Y - X if residual)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, residual: bool):
        n, d = x.shape
        f64 = torch.float64
        device = x.device
        rows = _chunk_rows(d)
        # float64 column means first, then the centered products; both chunk by chunk so that no
        # float64 copy of a whole input is ever made
        self.mean_x = torch.zeros(d, dtype=f64, device=device)
        self.mean_t = torch.zeros(d, dtype=f64, device=device)
        for s in range(0, n, rows):
            self.mean_x += x[s : s + rows].sum(dim=0, dtype=f64)
            self.mean_t += y[s : s + rows].sum(dim=0, dtype=f64)
        self.mean_x /= n
        self.mean_t /= n
        if residual:
            self.mean_t -= self.mean_x
        self.cxx = torch.zeros(d, d, dtype=f64, device=device)
        self.cxt = torch.zeros(d, d, dtype=f64, device=device)
        self.qt = torch.zeros(d, dtype=f64, device=device)
        for s in range(0, n, rows):
            xc = x[s : s + rows].to(dtype=f64, copy=True)
            tc = y[s : s + rows].to(dtype=f64, copy=True)
            if residual:
                tc -= xc
            xc -= self.mean_x
            tc -= self.mean_t
            self.cxx.addmm_(xc.T, xc)
            self.cxt.addmm_(xc.T, tc)
            self.qt += tc.square_().sum(dim=0)
        self.n = n


def _one_shot(x: Any, y: Any, residual: bool, rtol: float, what: str) -> tuple[float, int, int]:
    x2, y2 = _check_pair(x, y)
    n, d = x2.shape
    if n <= d + 1:
        raise NotEnoughTokensError(n, d, what)
    with torch.no_grad():
        mom = _PairMoments(x2.detach(), y2.detach(), residual)
        # any NaN/Inf in a column makes its mean non-finite (and the products of that column)
        if not _all_finite(mom.mean_x, mom.cxx):
            raise _nonfinite("x")
        if not _all_finite(mom.mean_t, mom.cxt, mom.qt):
            raise _nonfinite("y")
        proj = _Projector(mom.cxx, n, mom.mean_x, rtol)
        return _share(proj, mom.cxt, mom.qt), proj.rank, n


def linearity_score(x: torch.Tensor, y: torch.Tensor, *, rtol: float = DEFAULT_RTOL) -> float:
    """Linearity score of Y given X (both ``[n_tokens, d]``, any dtype/device; float64 inside).

    ``1 - min_A ||X~ A - Y~||_F^2`` with X~, Y~ centered and scaled to unit Frobenius norm; the
    share of Y's centered energy in the column space of X. Chance level ``rank(X)/(n-1)``.
    Memory: O(chunk * d + d^2) beyond the inputs. Raises NotEnoughTokensError if ``n <= d + 1``.
    """
    score, _, _ = _one_shot(x, y, False, rtol, "linearity score")
    return score


def linearity_wo_residual(x: torch.Tensor, y: torch.Tensor, *, rtol: float = DEFAULT_RTOL) -> float:
    """Linearity score of ``Y - X`` given X (the block's contribution without the residual path)."""
    score, _, _ = _one_shot(x, y, True, rtol, "linearity score without residual")
    return score


def contribution_norm(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over tokens of ``||y - x|| / ||x||`` (float64)."""
    x2, y2 = _check_pair(x, y)
    x2, y2 = x2.detach().double(), y2.detach().double()
    return float(((y2 - x2).norm(dim=1) / x2.norm(dim=1).clamp_min(_TINY)).mean())


def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over tokens of ``cos(x, y)`` (float64)."""
    x2, y2 = _check_pair(x, y)
    x2, y2 = x2.detach().double(), y2.detach().double()
    return float(((x2 * y2).sum(dim=1) / (x2.norm(dim=1) * y2.norm(dim=1)).clamp_min(_TINY)).mean())


def layer_linearity(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, *, rtol: float = DEFAULT_RTOL) -> LayerLinearity:
    """All metrics of one pair at once (through :class:`LinearityAccumulator`)."""
    x_t = torch.as_tensor(x)
    acc = LinearityAccumulator(x_t.shape[-1], device=x_t.device)
    acc.update(x_t, torch.as_tensor(y), mask=mask)
    return acc.result(rtol=rtol)


def per_token_error(x: torch.Tensor, y: torch.Tensor, *, rtol: float = DEFAULT_RTOL) -> torch.Tensor:
    """Squared residual of each token under the least-squares map, on normalized data.

    With X~, Y~ centered and scaled to unit Frobenius norm and A the least-squares map,
    returns ``||(X~ A - Y~)_i||^2`` for each token i (float64, shape ``[n]``, on x's device); the
    values sum to ``1 - linearity_score(x, y)``. Materializes the centered float64 matrices.
    Raises DataError on NaN/Inf in x or y.
    """
    x2, y2 = _check_pair(x, y)
    n, d = x2.shape
    if n <= d + 1:
        raise NotEnoughTokensError(n, d, "per-token error")
    with torch.no_grad():
        xc = x2.detach().double()
        yc = y2.detach().double()
        if not _all_finite(xc):
            raise _nonfinite("x")
        if not _all_finite(yc):
            raise _nonfinite("y")
        mean_x = xc.mean(dim=0)
        xc = xc - mean_x
        yc = yc - yc.mean(dim=0)
        energy = float((yc * yc).sum())
        if not energy > 0:
            raise DataError("per_token_error: y is constant over all tokens; its normalized residual is undefined")
        proj = _Projector(xc.T @ xc, n, mean_x, rtol)
        a = proj.solve(xc.T @ yc)
        resid = xc @ a - yc
        return (resid * resid).sum(dim=1) / energy
