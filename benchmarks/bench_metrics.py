"""Linearity-score benchmark: this repo's float64 Gram route against the paper notebook's SVD route.

    nice python benchmarks/bench_metrics.py [--quick] [--dims 768,2048] [--tokens 16384,131072]

For every (d, n) it builds hidden-state-like float32 data (anisotropic features, a few 100x
"massive activation" features, a mean offset, Y = X + a nonlinear block) and times, side by side
on the CPU, in one process:

* ``notebook``     the route of the paper's public notebook (LLM_microscope.ipynb): center and
                   Frobenius-normalize the whole float32 matrices, full thin SVD of X, explicit
                   pseudo-inverse ``pinv = V diag(1/S) U^T`` with no cut-off, ``A = pinv @ Y``,
                   ``score = 1 - ||X A - Y||^2``. One score per call (the wo-residual score needs a
                   second SVD).
* ``linearity_score``  :func:`linreg.metrics.linearity_score` (one score, float64, chunked).
* ``accumulator``  :class:`linreg.metrics.LinearityAccumulator` fed in batches of ``--batch`` tokens
                   (as ``measure_model`` does) then ``result()``: both scores, contribution norm and
                   cosine in one pass.

Peak memory is the growth of the process's peak resident set (VmHWM, reset through
``/proc/self/clear_refs`` before each call) over the resident set at the start of the call: every
tensor allocation of the call (the inputs already exist). The script re-executes itself with
``MALLOC_MMAP_THRESHOLD_=65536`` so that every tensor above 64 KB is its own mmap: its pages count
while it is alive and go back to the system when it is freed (glibc's default dynamic threshold
would recycle freed heap pages and hide later allocations). Each route gets one untimed warm-up
call on small data first (library initialization). Agreement: each score against a
float64 SVD reference with a relative cut-off of 1e-10 on singular values (computed when
``n * d <= --ref-max-elements``; "-" otherwise). ``--quick`` runs small sizes in seconds, plus a
rank-deficient case (duplicated features) where the notebook's uncut pseudo-inverse is unstable.

Markdown table to stdout, JSON into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from linreg.metrics import LinearityAccumulator, linearity_score  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


# ----------------------------------------------------------------------------------------------
# memory


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        m = re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measured(fn):
    """Run fn(); return (value, seconds, peak extra MB over the resident set at the start)."""
    gc.collect()
    can_reset = _reset_peak()
    start_rss = _status_mb("VmRSS")
    t0 = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM") - start_rss if can_reset else float("nan")
    return value, seconds, peak


# ----------------------------------------------------------------------------------------------
# the routes


def notebook_score(x: torch.Tensor, y: torch.Tensor) -> float:
    """The paper notebook's route (re-implemented): float32 SVD pseudo-inverse, no cut-off."""
    with torch.no_grad():
        xc = x - x.mean(dim=0, keepdim=True)
        yc = y - y.mean(dim=0, keepdim=True)
        xc = xc / xc.norm()
        yc = yc / yc.norm()
        u, s, vh = torch.linalg.svd(xc, full_matrices=False)
        pinv = (vh.T * (1.0 / s)[None, :]) @ u.T  # [d, n]
        del u
        a = pinv @ yc
        del pinv
        return float(1.0 - (xc @ a - yc).square().sum())


def accumulator_score(x: torch.Tensor, y: torch.Tensor, batch: int):
    acc = LinearityAccumulator(x.shape[1])
    for s in range(0, x.shape[0], batch):
        acc.update(x[s : s + batch], y[s : s + batch])
    return acc.result()


def reference_score(x: torch.Tensor, y: torch.Tensor, rcut: float = 1e-10) -> float:
    """float64 SVD projection with a relative singular-value cut-off (independent of the Gram route)."""
    with torch.no_grad():
        xc = x.double()
        xc -= xc.mean(dim=0, keepdim=True)
        u, s, _ = torch.linalg.svd(xc, full_matrices=False)
        del xc
        u = u[:, s > rcut * s.max()]
        yc = y.double()
        yc -= yc.mean(dim=0, keepdim=True)
        return float((u.T @ yc).square().sum() / yc.square().sum())


# ----------------------------------------------------------------------------------------------
# data


def make_data(n: int, d: int, seed: int, duplicate: int = 0):
    """Hidden-state-like float32 pair; ``duplicate`` > 0 copies that many features (rank deficient)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(d, generator=g) * 0.5)
    scales[: max(1, d // 256)] *= 100.0  # a few massive-activation features
    offset = torch.randn(d, generator=g) * 3.0
    x = torch.randn(n, d, generator=g)
    # correlated features: mix in a low-rank common component
    k = max(4, d // 32)
    x += torch.randn(n, k, generator=g) @ (torch.randn(k, d, generator=g) / math.sqrt(k))
    x.mul_(scales).add_(offset)
    if duplicate:
        x[:, -duplicate:] = x[:, :duplicate]
    w = torch.randn(d, d, generator=g) / math.sqrt(d)
    y = x @ w
    y.div_(y.std(dim=0, keepdim=True).clamp_min(1e-6)).tanh_().mul_(scales * 0.5)
    y.add_(x)
    del w
    return x, y


# ----------------------------------------------------------------------------------------------


def run_case(n: int, d: int, args, label: str = "", duplicate: int = 0) -> list[dict]:
    x, y = make_data(n, d, seed=n + d + duplicate, duplicate=duplicate)
    ref = None
    if n * d <= args.ref_max_elements:
        ref, ref_s, _ = measured(lambda: reference_score(x, y))
        print(f"  reference float64 SVD: {ref:.12f} ({ref_s:.1f} s)", file=sys.stderr, flush=True)
    rows = []
    routes = [
        ("notebook (float32 SVD pinv)", lambda: notebook_score(x, y)),
        ("linearity_score (float64 Gram)", lambda: linearity_score(x, y)),
        (f"accumulator (batches of {args.batch})", lambda: accumulator_score(x, y, args.batch)),
    ]
    for name, fn in routes:
        best = None
        for _ in range(args.repeat):
            value, seconds, peak = measured(fn)
            if best is None or seconds < best[1]:
                best = (value, seconds, peak)
        value, seconds, peak = best
        score = value.linearity if hasattr(value, "linearity") else float(value)
        row = {
            "case": label or "hidden-state-like",
            "d": d,
            "n": n,
            "route": name,
            "seconds": seconds,
            "peak_extra_mb": peak,
            "score": score,
            "reference": ref,
            "abs_err": abs(score - ref) if ref is not None else None,
        }
        if hasattr(value, "to_dict"):
            row["all_metrics"] = value.to_dict()
        rows.append(row)
        print(f"  {name}: {seconds:.2f} s, +{peak:.0f} MB, score {score:.12f}", file=sys.stderr, flush=True)
    routes.clear()  # x, y die with this frame
    return rows


def _fmt_err(e) -> str:
    return "-" if e is None else f"{e:.1e}"


def markdown(rows: list[dict], meta: dict) -> str:
    out = [
        f"Linearity score, CPU ({meta['threads']} threads, torch {meta['torch']}), input data {meta['input_dtype']} "
        f"({meta['input_mb_note']}).",
        "",
        "| case | d | n tokens | route | time s | peak extra MB | score | abs err vs float64 ref |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['case']} | {r['d']} | {r['n']} | {r['route']} | {r['seconds']:.2f} | {r['peak_extra_mb']:.0f} | "
            f"{r['score']:.9f} | {_fmt_err(r['abs_err'])} |"
        )
    return "\n".join(out)


def _warm_up(batch: int) -> None:
    x, y = make_data(512, 32, seed=0)
    notebook_score(x, y)
    linearity_score(x, y)
    accumulator_score(x, y, batch)
    reference_score(x, y)


def main(argv: list[str] | None = None) -> int:
    if argv is None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # fixed mmap threshold: freed tensors leave the resident set (see module docstring)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (d 64,256; n 4096,16384), runs in well under a minute")
    p.add_argument("--dims", default=None, help="comma-separated hidden sizes (default 768,2048)")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (default 16384,131072)")
    p.add_argument("--batch", type=int, default=4096, help="tokens per accumulator update (default 4096)")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per route, the fastest is kept (default 1; quick 2)")
    p.add_argument(
        "--ref-max-elements", type=float, default=1.1e8,
        help="compute the float64 SVD reference only when n*d is at most this (default 1.1e8: all but 131072 x 2048)",
    )
    p.add_argument("--no-rank-deficient", action="store_true", help="skip the rank-deficient (duplicated features) case")
    p.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/bench_metrics[-quick]-TIME.json)")
    args = p.parse_args(argv)

    dims = [int(v) for v in (args.dims or ("64,256" if args.quick else "768,2048")).split(",")]
    tokens = [int(v) for v in (args.tokens or ("4096,16384" if args.quick else "16384,131072")).split(",")]
    args.repeat = args.repeat or (2 if args.quick else 1)
    meta = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "input_dtype": "float32",
        "input_mb_note": "X and Y each n*d*4 bytes, not counted in peak extra",
        "batch": args.batch,
        "quick": args.quick,
    }
    meta["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    _warm_up(args.batch)
    rows: list[dict] = []
    for d in dims:
        for n in tokens:
            print(f"d={d} n={n}", file=sys.stderr, flush=True)
            rows += run_case(n, d, args)
    if not args.no_rank_deficient:
        n, d = (4096, 64) if args.quick else (16384, 768)
        print(f"rank-deficient d={d} n={n}", file=sys.stderr, flush=True)
        rows += run_case(n, d, args, label=f"{d // 16} duplicated features", duplicate=d // 16)

    table = markdown(rows, meta)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else RESULTS / f"bench_metrics{'-quick' if args.quick else ''}-{stamp}.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows, "markdown": table}, indent=2))
    print(f"\nJSON: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
