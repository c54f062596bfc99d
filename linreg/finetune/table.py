"""``linreg finetune-table``: the linearity change of fine-tuning runs, per model and task, over seeds.

The shape of Table 1 of the paper: for every (model, task), the linearity of the blocks before
fine-tuning (the step-0 line of ``linearity.jsonl``) and after it (the last line), averaged over the
blocks, with and without the residual stream, the change, each as mean ± standard deviation over the
seeds (runs) of that model and task, and the final validation metrics. Writes Markdown, JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from linreg.errors import DataError, LinregError

__all__ = ["RunSummary", "read_run", "find_runs", "summarize", "to_markdown", "plot_table", "write_table", "main",
           "clean_floats", "strict_json"]

METRICS = ("linearity", "linearity_wo_residual")


@dataclass
class RunSummary:
    run_dir: Path
    model: str
    task: str
    kind: str
    seed: int | None
    before_step: int
    after_step: int
    before: dict[str, float]  # metric -> mean over blocks
    after: dict[str, float]
    before_layers: dict[str, list[float]]
    after_layers: dict[str, list[float]]
    val: dict[str, float] = field(default_factory=dict)  # last logged value of every val/* metric
    n_tokens: int | None = None
    baseline: float | None = None

    def delta(self, metric: str) -> float:
        return self.after[metric] - self.before[metric]


def clean_floats(obj):
    """NaN/inf -> None, recursively through dicts, lists and tuples (strict JSON has no NaN). Shared with
    ``evals.common`` (its result files)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_floats(v) for v in obj]
    return obj


def strict_json(obj, **kwargs) -> str:
    """``json.dumps`` of ``obj`` with NaN/inf written as null (standard JSON every reader accepts)."""
    return json.dumps(clean_floats(obj), allow_nan=False, **kwargs)


def _finite_mean(values: list[float]) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):  # a last line cut by a crash
                continue
            raise DataError(f"{path}:{i}: malformed JSON line") from None
    return out


def _run_info(run_dir: Path) -> dict[str, Any]:
    info_path = run_dir / "finetune.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    recipe_path = run_dir / "recipe.yaml"
    if recipe_path.is_file():  # any run of the loop (e.g. pretraining): label it from its recipe
        import yaml

        rec = yaml.safe_load(recipe_path.read_text()) or {}
        kind = (rec.get("task") or {}).get("kind", "lm")
        return {"model": rec.get("name", run_dir.name), "task": "pretraining" if kind == "lm" else kind,
                "kind": kind, "seed": (rec.get("train") or {}).get("seed"),
                "train_steps": (rec.get("train") or {}).get("steps")}
    return {"model": run_dir.name, "task": "?", "kind": "?", "seed": None}


def _check_finished(run_dir: Path, info: dict[str, Any], last: int) -> None:
    """DataError unless the run is finished: ``finetune.json`` says ``finished`` (its ``final_step`` being the
    last tracked step), or, for other runs of the loop, the last tracked step is the recipe's
    ``train.steps`` (the loop always tracks at the end). A folder with neither file is taken as it is."""
    if "finished" in info:  # finetune.json (written with finished false when a run starts)
        final = info.get("final_step")
        if not info["finished"]:
            at = f"stopped at step {final}" if final is not None else f"last tracked step {last}"
            raise DataError(f"{run_dir}: unfinished run (finetune.json: finished false, {at}); rerun its command "
                            f"to continue it (--resume auto)")
        if final is not None and int(final) != last:
            raise DataError(f"{run_dir}: finetune.json says finished at step {final} but linearity.jsonl ends at "
                            f"step {last}")
        return
    steps = info.get("train_steps")
    if steps is not None and last != int(steps):
        raise DataError(f"{run_dir}: unfinished run (linearity.jsonl ends at step {last}, the recipe has "
                        f"train.steps={steps})")


def read_run(run_dir: str | Path) -> RunSummary:
    """Before (step 0) and after (last step) linearity of one run folder."""
    run_dir = Path(run_dir)
    lin_path = run_dir / "linearity.jsonl"
    if not lin_path.is_file():
        raise DataError(f"{run_dir}: no linearity.jsonl (not a run folder, or tracking was off)")
    by_step: dict[int, dict] = {}
    for rec in _read_jsonl(lin_path):
        by_step[int(rec["step"])] = rec  # a restarted run's later line for a step wins
    if 0 not in by_step:
        raise DataError(f"{lin_path}: no step-0 line (the linearity before fine-tuning); the run needs "
                        f"track.enabled and track.at_start")
    last = max(by_step)
    if last == 0:
        raise DataError(f"{lin_path}: only the step-0 line; the run has not tracked after training yet")
    info = _run_info(run_dir)
    _check_finished(run_dir, info, last)

    def means(rec):
        return {m: _finite_mean([layer.get(m) for layer in rec["layers"]]) for m in METRICS}

    def series(rec):
        return {m: [float(layer.get(m, float("nan"))) for layer in rec["layers"]] for m in METRICS}

    val: dict[str, float] = {}
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        for rec in _read_jsonl(metrics_path):
            for k, v in rec.items():
                if k.startswith("val/") and v is not None:
                    val[k] = float(v)
    b, a = by_step[0], by_step[last]
    return RunSummary(run_dir=run_dir, model=str(info.get("model")), task=str(info.get("task")),
                      kind=str(info.get("kind")), seed=info.get("seed"), before_step=0, after_step=last,
                      before=means(b), after=means(a), before_layers=series(b), after_layers=series(a), val=val,
                      n_tokens=b.get("n_tokens"), baseline=b.get("baseline"))


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders: each path that holds a linearity.jsonl, or every folder below it that does (a sweep
    folder with seed_* runs, or a folder of sweeps)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "linearity.jsonl").is_file():
            found = [p]
        elif p.is_dir():
            found = sorted({f.parent for f in p.rglob("linearity.jsonl")})
            if not found:
                raise DataError(f"{p}: no run folder (with a linearity.jsonl) below it")
        else:
            raise DataError(f"{p}: no such folder")
        out += [f for f in found if f not in out]
    return out


def _stat(values: list[float]) -> dict[str, Any]:
    vals = [float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    mean = sum(finite) / len(finite) if finite else float("nan")
    std = statistics.stdev(finite) if len(finite) > 1 else None
    return {"mean": mean, "std": std, "values": vals}


def summarize(runs: list[RunSummary]) -> list[dict[str, Any]]:
    """One row per (model, task), in order of first appearance; mean ± sample std (ddof 1) over runs."""
    groups: dict[tuple[str, str], list[RunSummary]] = {}
    for r in runs:
        groups.setdefault((r.model, r.task), []).append(r)
    rows = []
    for (model, task), rs in groups.items():
        n_layers = {len(r.before_layers["linearity"]) for r in rs}
        if len(n_layers) != 1:
            raise DataError(f"{model} / {task}: runs with different numbers of blocks {sorted(n_layers)}: "
                            + ", ".join(str(r.run_dir) for r in rs))
        n_tokens = {r.n_tokens for r in rs}
        if len(n_tokens) != 1:  # different held-out tokens: their linearity values do not average
            raise DataError(f"{model} / {task}: runs measured on different numbers of held-out tokens "
                            f"{sorted(n_tokens)} (track.blocks or validation data differ): "
                            + ", ".join(str(r.run_dir) for r in rs))
        steps = {r.after_step for r in rs}
        if len(steps) != 1:  # runs of different lengths: their "after" values do not average
            raise DataError(f"{model} / {task}: runs end at different steps {sorted(steps)} (train.steps "
                            f"differ); summarize them separately: "
                            + ", ".join(f"{r.run_dir} (step {r.after_step})" for r in rs))
        row: dict[str, Any] = {"model": model, "task": task, "kind": rs[0].kind,
                               "seeds": [r.seed for r in rs], "runs": [str(r.run_dir) for r in rs],
                               "steps": sorted({r.after_step for r in rs}), "n_tokens": rs[0].n_tokens,
                               "baseline": rs[0].baseline}
        for m in METRICS:
            row[m] = {"before": _stat([r.before[m] for r in rs]), "after": _stat([r.after[m] for r in rs]),
                      "delta": _stat([r.delta(m) for r in rs]),
                      "layers_before": [statistics.fmean(v) for v in zip(*[r.before_layers[m] for r in rs])],
                      "layers_after": [statistics.fmean(v) for v in zip(*[r.after_layers[m] for r in rs])]}
        keys = sorted({k for r in rs for k in r.val})
        row["val"] = {k: _stat([r.val.get(k, float("nan")) for r in rs]) for k in keys}
        rows.append(row)
    return rows


def _fmt(stat: dict | None, signed: bool = False, digits: int = 4) -> str:
    if stat is None or not math.isfinite(stat["mean"]):
        return "–"
    s = f"{stat['mean']:+.{digits}f}" if signed else f"{stat['mean']:.{digits}f}"
    if stat["std"] is not None:
        s += f" ± {stat['std']:.{digits}f}"
    return s


def to_markdown(rows: list[dict[str, Any]]) -> str:
    head = ["model", "task", "seeds", "steps", "linearity before", "after", "Δ", "w/o residual before", "after",
            "Δ", "val accuracy", "val F1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        lin, wo = r["linearity"], r["linearity_wo_residual"]
        cells = [r["model"], r["task"], str(len(r["seeds"])), ",".join(map(str, r["steps"])),
                 _fmt(lin["before"]), _fmt(lin["after"]), _fmt(lin["delta"], True),
                 _fmt(wo["before"]), _fmt(wo["after"]), _fmt(wo["delta"], True),
                 _fmt(r["val"].get("val/accuracy"), digits=3),
                 _fmt(r["val"].get("val/f1"), digits=3) if r["kind"] == "classification" else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Linearity: mean over the blocks of the score of block input -> block output (pre final norm), "
             "on the same held-out tokens, before fine-tuning (step 0) and after it (last tracked step); "
             "w/o residual: block input -> block output minus input. Mean ± sample standard deviation over "
             "seeds (no ± with one seed). val F1: class 1 for two classes, macro for more (CB)."]
    return "\n".join(lines + notes) + "\n"


def plot_table(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Bars of the change (mean ± std over seeds) per model/task, and the per-block profiles before and
    after fine-tuning (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = [f"{r['model']}\n{r['task']}" for r in rows]
    xs = range(len(rows))
    width = 0.38
    for k, (m, name) in enumerate((("linearity", "linearity"), ("linearity_wo_residual", "w/o residual"))):
        means = [r[m]["delta"]["mean"] for r in rows]
        errs = [r[m]["delta"]["std"] or 0.0 for r in rows]
        ax0.bar([x + (k - 0.5) * width for x in xs], means, width, yerr=errs, capsize=3, label=name)
    ax0.axhline(0.0, color="black", lw=0.8)
    ax0.set_xticks(list(xs))
    ax0.set_xticklabels(labels, fontsize=8)
    ax0.set_ylabel("after - before (mean over blocks)")
    ax0.set_title("linearity change (mean ± std over seeds)")
    ax0.legend(fontsize=8)
    ax0.grid(axis="y", alpha=0.3)
    for i, r in enumerate(rows):
        color = f"C{i % 10}"
        ys_b, ys_a = r["linearity"]["layers_before"], r["linearity"]["layers_after"]
        ax1.plot(range(len(ys_b)), ys_b, ls="--", marker=".", color=color)
        ax1.plot(range(len(ys_a)), ys_a, ls="-", marker="o", color=color, label=f"{r['model']} / {r['task']}")
    from matplotlib.ticker import MaxNLocator

    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("block")
    ax1.set_ylabel("linearity")
    ax1.set_title("per-block linearity: before (dashed), after (solid)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_table(run_dirs: list[str | Path], out_dir: str | Path, name: str = "finetune_table",
                plot: bool = True, strict: bool = False) -> dict[str, Any]:
    """Read the runs, write ``out_dir/name.{md,json,png}``; returns {"rows", "markdown", "paths", "skipped"}.

    Without ``strict``, a run folder that cannot be summarized yet (unfinished, no step-0 line) is
    skipped with a warning on stderr; with it, that is an error."""
    runs, skipped = [], []
    for d in find_runs(run_dirs):
        try:
            runs.append(read_run(d))
        except DataError as exc:
            if strict:
                raise
            skipped.append(str(exc))
            print(f"warning: skipping {d}: {exc}", file=sys.stderr)
    if not runs:
        raise DataError("no run to summarize" + (": " + "; ".join(skipped) if skipped else ""))
    rows = summarize(runs)
    md = to_markdown(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{name}.md", "json": out / f"{name}.json"}
    paths["markdown"].write_text(md)
    paths["json"].write_text(strict_json({"rows": rows, "skipped": skipped}, indent=2) + "\n")  # NaN -> null
    if plot:
        paths["png"] = plot_table(rows, out / f"{name}.png")
    return {"rows": rows, "markdown": md, "paths": paths, "skipped": skipped}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linreg finetune-table",
        description="Linearity before and after fine-tuning, per model and task, as mean ± std over seeds "
                    "(the shape of the paper's Table 1): reads linearity.jsonl (and finetune.json, "
                    "metrics.jsonl) of run folders and writes Markdown, JSON and a PNG plot.",
        epilog="examples:\n  linreg finetune-table runs/finetune-boolq            # a --seeds sweep folder\n"
               "  linreg finetune-table runs/ft-boolq runs/ft-cb --out results/\n"
               "  linreg finetune-table runs/a/seed_1 runs/a/seed_2 runs/b/seed_1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_DIR",
                   help="run folders (with linearity.jsonl) or folders to search for them (e.g. a sweep "
                        "folder holding seed_* runs); runs are grouped by the model and task in their "
                        "finetune.json (or recipe.yaml)")
    p.add_argument("--out", default=None,
                   help="folder for the output files (default: the folder given, when only one is given; "
                        "else the current folder)")
    p.add_argument("--name", default="finetune_table", help="output file name stem (default: finetune_table)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--strict", action="store_true",
                   help="fail on a run folder that cannot be summarized (unfinished: finetune.json says "
                        "finished false, or the last tracked step is not the recipe's train.steps; no step-0 "
                        "line) instead of skipping it with a warning")
    p.add_argument("--quiet", action="store_true", help="do not print the Markdown table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or (args.paths[0] if len(args.paths) == 1 and Path(args.paths[0]).is_dir() else ".")
    try:
        res = write_table(args.paths, out, args.name, plot=not args.no_plot, strict=args.strict)
    except LinregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(res["markdown"])
    print("wrote " + ", ".join(str(p) for p in res["paths"].values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
