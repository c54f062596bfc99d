"""Side-by-side table of several models' evaluation results (``linreg compare``).

Reads any mix of result files written by ``linreg superglue`` (``superglue_results.json``),
``linreg judge`` (``judge_results.json``) and ``linreg probe`` (``probe_results.json``), matches
models by label across files, and writes one Markdown table: one row per metric and one column per
model (the paper's "baseline vs +cosine vs +MSE" layout; ``--transpose`` for models as rows), with
optional differences to a baseline and the best value per metric in bold. Higher is better for every
metric shown.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import OrderedDict
from pathlib import Path

from evals.common import ConfigError, DataError, load_result, markdown_table, run_cli, setup_logging, write_json, write_text

log = logging.getLogger("evals.compare")

Metrics = "OrderedDict[str, dict[str, tuple[float | None, float | None]]]"


def _sglue_metrics(res: dict) -> list[tuple[str, str, float | None, float | None]]:
    from evals.superglue import COLUMNS, MEAN_KEY

    headers = {c[0]: c[3] for c in COLUMNS}
    headers[MEAN_KEY] = "Mean"
    out = []
    for m in res["models"]:
        scores, stderr = m.get("scores", {}), m.get("stderr", {}) or {}
        for col in res.get("columns") or list(scores):
            if col in scores:
                out.append((m["label"], f"SuperGLUE: {headers.get(col, col)}", scores[col], stderr.get(col)))
    return out


def _judge_metrics(res: dict) -> list[tuple[str, str, float | None, float | None]]:
    out = []
    judge = res.get("judge", {}).get("model", "judge")
    for m in res["models"]:
        for cat, s in m.get("scores", {}).items():
            out.append((m["label"], f"{judge} judge: {cat.capitalize()}", s.get("mean"), s.get("sem")))
    return out


def _probe_metrics(res: dict) -> list[tuple[str, str, float | None, float | None]]:
    out = []
    task = res.get("task", {}).get("name", "probe")
    for m in res["models"]:
        for pooling, pr in m.get("probes", {}).items():
            out.append((m["label"], f"Probe {task} ({pooling}): best layer acc", pr.get("best_accuracy"), None))
            out.append((m["label"], f"Probe {task} ({pooling}): mean acc", pr.get("mean_accuracy"), None))
    return out


EXTRACTORS = {"superglue": _sglue_metrics, "judge": _judge_metrics, "probe": _probe_metrics}


def collect(paths: list[str | Path], label_map: dict[str, str] | None = None) -> tuple[Metrics, list[str]]:
    """metric -> {label: (value, stderr)}, and the labels in order of first appearance."""
    label_map = label_map or {}
    metrics: OrderedDict = OrderedDict()
    origin: dict[tuple[str, str], str] = {}
    labels: list[str] = []
    for path in paths:
        res = load_result(path)
        kind = res["kind"]
        if kind not in EXTRACTORS:
            raise DataError(f"{path}: unknown result kind {kind!r}; expected one of {', '.join(EXTRACTORS)}")
        for label, metric, value, stderr in EXTRACTORS[kind](res):
            label = label_map.get(label, label)
            if label not in labels:
                labels.append(label)
            if (metric, label) in origin and metrics[metric][label] != (value, stderr):
                raise DataError(f"model {label!r} has two different values for {metric!r}: in "
                                f"{origin[(metric, label)]} and {path}; rename one with --rename OLD=NEW")
            origin[(metric, label)] = str(path)
            metrics.setdefault(metric, {})[label] = (value, stderr)
    if not metrics:
        raise DataError("the result files hold no metrics")
    return metrics, labels


def _num(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def build_table(metrics: Metrics, labels: list[str], *, baseline: str | None = None, digits: int = 3,
                stderr: bool = False, bold_best: bool = True, transpose: bool = False) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the comparison table."""
    if baseline is not None and baseline not in labels:
        raise ConfigError(f"baseline {baseline!r} is not among the models {labels}")
    rows_out = []
    cells: dict[tuple[str, str], str] = {}
    for metric, per in metrics.items():
        vals = [per.get(lab, (None, None))[0] for lab in labels]
        best = max((v for v in vals if _num(v)), default=None)
        n_num = sum(1 for v in vals if _num(v))
        base = per.get(baseline, (None, None))[0] if baseline else None
        for lab in labels:
            v, se = per.get(lab, (None, None))
            if not _num(v):
                cells[(metric, lab)] = "–"
                continue
            s = f"{v:.{digits}f}"
            if stderr and _num(se):
                s += f" ± {se:.{digits}f}"
            if baseline and lab != baseline and _num(base):
                s += f" ({v - base:+.{digits}f})"
            if bold_best and n_num > 1 and v == best:
                s = f"**{s}**"
            cells[(metric, lab)] = s
    if not transpose:
        headers = ["metric"] + labels
        for metric in metrics:
            rows_out.append([metric] + [cells[(metric, lab)] for lab in labels])
    else:
        headers = ["model"] + list(metrics)
        for lab in labels:
            rows_out.append([lab] + [cells[(metric, lab)] for metric in metrics])
    return headers, rows_out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linreg compare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("Merge result files of `linreg superglue`, `linreg judge` and `linreg probe` into one "
                     "side-by-side Markdown table (metrics as rows, models as columns)."),
        epilog=("examples:\n"
                "  linreg compare out/sglue/superglue_results.json out/judge/judge_results.json --baseline baseline\n"
                "  linreg compare a.json b.json --rename run_0412=baseline --models baseline,+cosine,+mse -o table.md"),
    )
    p.add_argument("results", nargs="+", help="result JSON files (superglue_results.json, judge_results.json, probe_results.json)")
    p.add_argument("--models", default=None, help="comma-separated labels: which models, in which order (default: all)")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="rename a model label, e.g. when runs were labelled by folder name (repeatable)")
    p.add_argument("--baseline", default=None, help="label of the baseline; other columns show the difference to it")
    p.add_argument("--stderr", action="store_true", help="show standard errors where the results have them")
    p.add_argument("--digits", type=int, default=3, help="decimals (default: 3)")
    p.add_argument("--no-bold", action="store_true", help="do not bold the best value per metric")
    p.add_argument("--transpose", action="store_true", help="models as rows, metrics as columns")
    p.add_argument("--metrics", default=None,
                   help="only metrics whose name contains one of these comma-separated words (case-insensitive)")
    p.add_argument("-o", "--output", default=None, help="write the Markdown table to this file (default: stdout only)")
    p.add_argument("--json", default=None, help="also write the merged values as JSON to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(0, args.quiet)

    def body() -> int:
        label_map = {}
        for item in args.rename:
            if "=" not in item:
                raise ConfigError(f"--rename wants OLD=NEW, got {item!r}")
            old, new = item.split("=", 1)
            label_map[old] = new
        metrics, labels = collect(args.results, label_map)
        if args.models:
            wanted = [m.strip() for m in args.models.split(",") if m.strip()]
            missing = [m for m in wanted if m not in labels]
            if missing:
                raise ConfigError(f"--models names {missing} not found; the files have {labels}")
            labels = wanted
        if args.metrics:
            words = [w.strip().lower() for w in args.metrics.split(",") if w.strip()]
            metrics = OrderedDict((k, v) for k, v in metrics.items() if any(w in k.lower() for w in words))
            if not metrics:
                raise ConfigError(f"no metric matches --metrics {args.metrics!r}")
        headers, rows = build_table(metrics, labels, baseline=args.baseline, digits=args.digits, stderr=args.stderr,
                                    bold_best=not args.no_bold, transpose=args.transpose)
        md = markdown_table(headers, rows)
        if args.output:
            write_text(args.output, md)
        if args.json:
            write_json(args.json, {"kind": "comparison", "models": labels,
                                   "sources": [str(p) for p in args.results],
                                   "metrics": {k: {lab: {"value": v[0], "stderr": v[1]} for lab, v in per.items()
                                                   if lab in labels} for k, per in metrics.items()}})
        if not args.quiet:
            print(md, end="")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
