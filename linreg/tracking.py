"""What a run writes for people to watch: TensorBoard scalars and figures, and JSONL twins of them.

Only rank 0 writes. On resume, TensorBoard events past the resumed step are purged and the JSONL files
are cut back to the resumed step, so a restarted run never shows two curves for the same steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LINEARITY_METRICS = ("linearity", "linearity_wo_residual", "contribution_norm", "cosine")


def read_jsonl_records(path: Path) -> list[tuple[str, dict]]:
    """``(line, record)`` for every parseable line of a run's JSONL log; blank lines and a last line
    cut by a crash are skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return out


def _truncate_jsonl(path: Path, keep_through_step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line, rec in read_jsonl_records(path) if rec.get("step", 0) <= keep_through_step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    tmp.replace(path)


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.linearity_path = self.run_dir / "linearity.jsonl"
        if resume_step is not None:
            for p in (self.metrics_path, self.linearity_path):
                _truncate_jsonl(p, resume_step)
        self.writer = SummaryWriter(
            log_dir=str(self.run_dir / "tensorboard"),
            purge_step=resume_step + 1 if resume_step is not None else None,
        )

    def _append(self, path: Path, record: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def scalars(self, step: int, values: dict[str, float], jsonl: bool = True) -> None:
        if not self.enabled:
            return
        clean = {}
        for k, v in values.items():
            if v is None:
                continue
            v = float(v)
            clean[k] = v
            self.writer.add_scalar(k, v, step)
        if jsonl:
            self._append(self.metrics_path, {"step": step, **clean})

    def linearity(self, step: int, layers: list[dict[str, Any]], meta: dict | None = None) -> None:
        """One scalar per layer and metric (``linearity/layer_03`` ...), their means, a per-layer figure,
        and one JSONL line."""
        if not self.enabled:
            return
        for metric in LINEARITY_METRICS:
            vals = [layer[metric] for layer in layers]
            for i, v in enumerate(vals):
                self.writer.add_scalar(f"{metric}/layer_{i:02d}", v, step)
            finite = [v for v in vals if v is not None and math.isfinite(v)]
            if finite:
                self.writer.add_scalar(f"{metric}/mean", sum(finite) / len(finite), step)
        self.writer.add_figure("linearity/profile", linearity_figure(layers, step), step)
        self._append(self.linearity_path, {"step": step, **(meta or {}), "layers": layers})

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def linearity_figure(layers: list[dict[str, Any]], step: int | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = list(range(len(layers)))
    ax.plot(xs, [layer["linearity"] for layer in layers], marker="o", label="linearity")
    ax.plot(xs, [layer["linearity_wo_residual"] for layer in layers], marker="s", label="without residual")
    ax.set_xlabel("block")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    if step is not None:
        ax.set_title(f"layer linearity at step {step}")
    fig.tight_layout()
    return fig


def linearity_table(layers: list[dict[str, Any]]) -> str:
    """The per-layer table printed at the end of a run."""
    head = f"{'block':>5}  {'linearity':>9}  {'w/o resid':>9}  {'contrib':>8}  {'cosine':>7}"
    rows = [head, "-" * len(head)]
    for i, layer in enumerate(layers):
        rows.append(
            f"{i:>5}  {layer['linearity']:>9.4f}  {layer['linearity_wo_residual']:>9.4f}  "
            f"{layer['contribution_norm']:>8.4f}  {layer['cosine']:>7.4f}"
        )
    return "\n".join(rows)
