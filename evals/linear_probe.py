"""Linear probing of every layer of one or several causal LMs (``linreg probe``).

For every layer's hidden states we pool one feature vector per example (the last real token, the
mean over real tokens, or both), fit a regularised logistic-regression probe (standardised
features, L2 penalty ``C``) on a training split and report its accuracy on a held-out split, next
to a shuffled-label control that should sit at chance. Accuracy is plotted against layer for every
model (the paper's probing figure).

Layer convention: layer 0 is the embedding output, layer i (1..L) the output of block i, as in
Hugging Face's ``output_hidden_states`` (for Mistral/Llama the last entry is after the final norm).

Tasks:
- ``xstorycloze-en``: every story gives two examples, the four sentences plus the right ending
  (label 1) and plus the wrong ending (label 0). Both examples of a story fall into the same split.
  Read from the hub (``juletxara/xstory_cloze``, config ``en``) or from a local JSONL/JSON/CSV file
  with the hub's columns (``input_sentence_1..4, sentence_quiz1, sentence_quiz2,
  answer_right_ending``) or StoryCloze's (``InputSentence1..4, RandomFifthSentenceQuiz1/2,
  AnswerRightEnding``).
- any classification data: a local file or a hub data set with a text field (optionally a second
  text field) and a label field (integers or strings).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evals.common import (
    DTYPES,
    DEVICES_HELP,
    ConfigError,
    DataError,
    environment_info,
    fmt,
    load_model_and_tokenizer,
    markdown_table,
    model_labels,
    now_iso,
    read_jsonl,
    run_cli,
    setup_logging,
    write_json,
    write_text,
)

log = logging.getLogger("evals.probe")

XSTORYCLOZE_HUB = ("juletxara/xstory_cloze", "en")
POOLINGS = ("last", "mean")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@dataclass
class ProbeData:
    """Texts with integer labels; examples sharing a ``group`` are kept in the same split."""

    name: str
    texts: list[str]
    labels: np.ndarray
    groups: np.ndarray
    label_names: list[str]
    source: str = ""

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.groups = np.asarray(self.groups, dtype=np.int64)
        if not (len(self.texts) == len(self.labels) == len(self.groups)):
            raise DataError(f"{self.name}: texts, labels and groups differ in length")

    def __len__(self):
        return len(self.texts)

    def head(self, n: int) -> "ProbeData":
        """The first ``n`` groups (stories) - keeps both endings of a story together."""
        keep_groups = list(dict.fromkeys(self.groups.tolist()))[:n]
        mask = np.isin(self.groups, keep_groups)
        idx = np.nonzero(mask)[0]
        return ProbeData(self.name, [self.texts[i] for i in idx], self.labels[idx], self.groups[idx],
                         self.label_names, self.source)


_XSC_KEYS = {
    "hub": (["input_sentence_1", "input_sentence_2", "input_sentence_3", "input_sentence_4"],
            ["sentence_quiz1", "sentence_quiz2"], "answer_right_ending"),
    "storycloze": (["InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4"],
                   ["RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2"], "AnswerRightEnding"),
}


def _xsc_style(row: dict) -> str | None:
    for style, (sents, quiz, ans) in _XSC_KEYS.items():
        if all(k in row for k in sents + quiz + [ans]):
            return style
    return None


def xstorycloze_examples(rows: list[dict], source: str = "") -> ProbeData:
    """Two examples per story: story + right ending (label 1), story + wrong ending (label 0)."""
    texts, labels, groups = [], [], []
    for i, row in enumerate(rows):
        style = _xsc_style(row)
        if style is None:
            sents, quiz, ans = _XSC_KEYS["hub"]
            missing = [k for k in sents + quiz + [ans] if k not in row]
            raise DataError(f"{source or 'xstorycloze'} row {i}: missing field(s) {missing} "
                            f"(or the StoryCloze names {_XSC_KEYS['storycloze'][0][0]}...)")
        sents, quiz, ans = _XSC_KEYS[style]
        try:
            right = int(row[ans])
        except (TypeError, ValueError) as exc:
            raise DataError(f"{source} row {i}: {ans}={row[ans]!r} is not 1 or 2") from exc
        if right not in (1, 2):
            raise DataError(f"{source} row {i}: {ans}={right} is not 1 or 2")
        story = " ".join(str(row[k]).strip() for k in sents)
        for j, key in enumerate(quiz, 1):
            texts.append(f"{story} {str(row[key]).strip()}")
            labels.append(1 if j == right else 0)
            groups.append(i)
    if not texts:
        raise DataError(f"{source or 'xstorycloze'}: no stories")
    return ProbeData("xstorycloze-en", texts, labels, groups, ["wrong ending", "right ending"], source)


def classification_examples(rows: list[dict], *, text_field: str = "text", label_field: str = "label",
                            text_pair_field: str | None = None, name: str = "classification",
                            source: str = "") -> ProbeData:
    """Examples from rows with a text field (plus optional second text) and a label field."""
    if not rows:
        raise DataError(f"{source or name}: no rows")
    texts, raw = [], []
    for i, row in enumerate(rows):
        for key in [text_field, label_field] + ([text_pair_field] if text_pair_field else []):
            if key not in row:
                raise DataError(f"{source or name} row {i}: no field {key!r} (fields: {sorted(row)}); "
                                "choose the fields with --text-field / --label-field")
        text = str(row[text_field])
        if text_pair_field:
            text = f"{text}\n{row[text_pair_field]}"
        texts.append(text)
        raw.append(row[label_field])
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
        values = sorted(set(int(v) for v in raw))
        names = [str(v) for v in values]
        index = {v: k for k, v in enumerate(values)}
        labels = [index[int(v)] for v in raw]
    else:
        names = sorted(set(str(v) for v in raw))
        index = {v: k for k, v in enumerate(names)}
        labels = [index[str(v)] for v in raw]
    if len(names) < 2:
        raise DataError(f"{source or name}: label field {label_field!r} has a single value {names}; "
                        "a probe needs at least two classes")
    return ProbeData(name, texts, labels, np.arange(len(texts)), names, source)


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a local .jsonl, .json (list of objects or {"data": [...]}) or .csv/.tsv file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(p)
    if suffix == ".json":
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: not valid JSON ({exc.msg})") from exc
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
            raise DataError(f"{p}: expected a list of objects (or {{'data': [...]}})")
        return obj
    if suffix in (".csv", ".tsv"):
        with p.open(encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    raise DataError(f"{p}: unknown data file type {suffix!r}; use .jsonl, .json, .csv or .tsv")


def load_hub_rows(name: str, config: str | None, splits: list[str]) -> list[dict]:  # pragma: no cover - hub
    """Rows of hub data set splits (needs network access to the hub)."""
    import datasets

    rows: list[dict] = []
    for split in splits:
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds
            raise DataError(f"cannot load hub data set {name!r} (config {config!r}, split {split!r}): {exc}. "
                            "Offline? Pass a local file with --data.") from exc
        rows.extend(dict(r) for r in ds)
    return rows


def load_probe_data(*, task: str | None = None, data: str | None = None, hub: str | None = None,
                    hub_config: str | None = None, splits: str | None = None, fmt_: str = "auto",
                    text_field: str = "text", label_field: str = "label",
                    text_pair_field: str | None = None, limit: int | None = None) -> ProbeData:
    """Build the probing data from the CLI choices (exactly one of task / data / hub)."""
    given = [x for x in (task, data, hub) if x]
    if len(given) != 1:
        raise ConfigError("give exactly one of --task, --data or --hub")
    if task:
        if task not in ("xstorycloze-en", "xstorycloze_en"):
            raise ConfigError(f"unknown task {task!r}; built in: xstorycloze-en (else use --data or --hub)")
        rows = load_hub_rows(*XSTORYCLOZE_HUB, (splits or "train,eval").split(","))
        out = xstorycloze_examples(rows, source=f"hub:{XSTORYCLOZE_HUB[0]}/{XSTORYCLOZE_HUB[1]}")
    else:
        if data:
            rows, source = read_rows(data), str(data)
        else:
            rows = load_hub_rows(hub, hub_config, (splits or "train").split(","))
            source = f"hub:{hub}" + (f"/{hub_config}" if hub_config else "")
        kind = fmt_
        if kind == "auto":
            kind = "xstorycloze" if rows and _xsc_style(rows[0]) else "classification"
        if kind == "xstorycloze":
            out = xstorycloze_examples(rows, source=source)
        elif kind == "classification":
            name = Path(data).stem if data else hub.split("/")[-1]
            out = classification_examples(rows, text_field=text_field, label_field=label_field,
                                          text_pair_field=text_pair_field, name=name, source=source)
        else:
            raise ConfigError(f"unknown --format {fmt_!r}; choose auto, xstorycloze or classification")
    if limit:
        out = out.head(limit)
    return out


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------
def extract_features(model, tokenizer, texts: list[str], *, pooling=POOLINGS, batch_size: int = 16,
                     max_length: int = 512, progress: bool = True) -> dict[str, np.ndarray]:
    """Pooled hidden states of every layer: ``{pooling: float32 array [L+1, N, d]}``.

    Batched; texts are sorted by length so batches pad little, and results come back in input
    order. Long texts are truncated from the left (the ending is what matters). ``last`` takes the
    last real token, ``mean`` averages over real tokens. Batches are padded on the right whatever the
    tokenizer's ``padding_side`` (restored afterwards): with causal attention the real tokens then see
    exactly the positions and context they have alone, also in models with absolute position
    embeddings (GPT-2, OPT), which left padding would shift.
    """
    import torch
    from tqdm.auto import tqdm

    for p in pooling:
        if p not in POOLINGS:
            raise ConfigError(f"unknown pooling {p!r}; choose from {POOLINGS}")
    if not texts:
        raise DataError("no texts to extract features from")
    old_side = getattr(tokenizer, "truncation_side", "right")
    old_padding = getattr(tokenizer, "padding_side", "right")
    tokenizer.truncation_side = "left"
    tokenizer.padding_side = "right"  # real tokens at positions 0..n-1, as without padding
    try:
        lengths = [len(t) for t in texts]
        order = np.argsort(lengths, kind="stable")[::-1]
        device = next(model.parameters()).device
        out: dict[str, np.ndarray] = {}
        bar = tqdm(total=len(texts), desc="features", unit="ex", disable=not progress)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                idx = order[start:start + batch_size]
                enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                truncation=True, max_length=max_length)
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                hs = model(**enc, output_hidden_states=True, use_cache=False).hidden_states
                mask = enc["attention_mask"]
                if mask.sum(1).min() == 0:
                    raise DataError("a text tokenized to zero tokens; drop empty texts")
                T = mask.shape[1]
                last = (T - 1 - mask.flip(1).float().argmax(1)).long()
                m = mask.unsqueeze(-1).to(torch.float32)
                ar = torch.arange(mask.shape[0], device=mask.device)
                for p in pooling:
                    arr = out.get(p)
                    if arr is None:
                        arr = out[p] = np.zeros((len(hs), len(texts), hs[0].shape[-1]), np.float32)
                    for layer, h in enumerate(hs):  # one layer at a time: no [L+1, B, T, d] copy
                        if p == "last":
                            feats = h[ar, last].to(torch.float32)
                        else:
                            feats = (h.to(torch.float32) * m).sum(1) / m.sum(1)
                        arr[layer, idx] = feats.cpu().numpy()
                bar.update(len(idx))
        bar.close()
    finally:
        tokenizer.truncation_side = old_side
        tokenizer.padding_side = old_padding
    return out


# --------------------------------------------------------------------------------------------
# probes
# --------------------------------------------------------------------------------------------
def split_indices(groups: np.ndarray, test_size: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices; examples sharing a group land in the same split."""
    if not 0.0 < test_size < 1.0:
        raise ConfigError(f"test size {test_size} must be in (0, 1)")
    uniq = np.unique(groups)
    if len(uniq) < 2:
        raise DataError("need at least two groups (stories/examples) to split train and test")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(uniq)
    n_test = min(max(1, int(round(test_size * len(uniq)))), len(uniq) - 1)
    test_groups = perm[:n_test]
    is_test = np.isin(groups, test_groups)
    return np.nonzero(~is_test)[0], np.nonzero(is_test)[0]


def train_probe(x_train, y_train, x_test, y_test, *, C: float = 1.0, max_iter: int = 2000,
                seed: int = 0) -> tuple[float, float]:
    """Fit standardised L2 logistic regression; returns (test accuracy, train accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        # a single class in training: the probe can only predict it
        only = y_train[0]
        return float(np.mean(y_test == only)), 1.0
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    clf.fit(np.asarray(x_train, np.float64), y_train)
    return (float(clf.score(np.asarray(x_test, np.float64), y_test)),
            float(clf.score(np.asarray(x_train, np.float64), y_train)))


def probe_layers(features: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None, *,
                 test_size: float = 0.3, seed: int = 0, C: float = 1.0, max_iter: int = 2000,
                 control: bool = True, progress: bool = False) -> dict:
    """Probe every layer of ``features`` [L, N, d] for ``labels`` [N].

    Returns ``{"layers": [{"layer", "accuracy", "train_accuracy", "control_accuracy"}...],
    "best_layer", "best_accuracy", "mean_accuracy", "chance", "n_train", "n_test"}``. The control
    probe is trained and tested on a random permutation of the labels (same split): it measures
    what the probe gets without any real signal, i.e. chance.
    """
    from tqdm.auto import tqdm

    features = np.asarray(features)
    labels = np.asarray(labels, np.int64)
    if features.ndim != 3 or features.shape[1] != len(labels):
        raise DataError(f"features must be [layers, N={len(labels)}, d], got {features.shape}")
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    tr, te = split_indices(groups, test_size, seed)
    shuffled = np.random.default_rng(seed + 1).permutation(labels)
    chance = float(np.max(np.bincount(labels[te])) / len(te))
    layers = []
    for layer in tqdm(range(features.shape[0]), desc="probes", unit="layer", disable=not progress):
        x = features[layer]
        acc, train_acc = train_probe(x[tr], labels[tr], x[te], labels[te], C=C, max_iter=max_iter, seed=seed)
        row = {"layer": layer, "accuracy": acc, "train_accuracy": train_acc}
        if control:
            row["control_accuracy"] = train_probe(x[tr], shuffled[tr], x[te], shuffled[te], C=C,
                                                  max_iter=max_iter, seed=seed)[0]
        layers.append(row)
    accs = [r["accuracy"] for r in layers]
    best = int(np.argmax(accs))
    return {"layers": layers, "best_layer": best, "best_accuracy": accs[best],
            "mean_accuracy": float(np.mean(accs)), "chance": chance,
            "n_train": int(len(tr)), "n_test": int(len(te))}


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
def render_markdown(result: dict) -> str:
    task = result["task"]
    lines = [f"# Linear probing: {task['name']}", "",
             f"{task['n_examples']} examples ({task['n_train']} train / {task['n_test']} test), "
             f"labels {task['label_names']}, majority-class accuracy {task['chance']:.3f}. "
             f"Logistic regression, C={result['settings']['C']}. Layer 0 = embeddings, "
             "layer i = output of block i.", ""]
    summary = []
    for m in result["models"]:
        for pooling, pr in m["probes"].items():
            controls = [r.get("control_accuracy") for r in pr["layers"] if r.get("control_accuracy") is not None]
            summary.append([m["label"], pooling, str(pr["best_layer"]), fmt(pr["best_accuracy"]),
                            fmt(pr["mean_accuracy"]), fmt(float(np.mean(controls)) if controls else None)])
    lines.append(markdown_table(["model", "pooling", "best layer", "best acc", "mean acc", "control acc (mean)"],
                                summary))
    poolings = list(dict.fromkeys(p for m in result["models"] for p in m["probes"]))
    for pooling in poolings:
        models = [m for m in result["models"] if pooling in m["probes"]]
        n_rows = max(len(m["probes"][pooling]["layers"]) for m in models)
        rows = []
        for layer in range(n_rows):
            row = [str(layer)]
            for m in models:
                lay = m["probes"][pooling]["layers"]
                row.append(fmt(lay[layer]["accuracy"]) if layer < len(lay) else "")
            rows.append(row)
        lines += ["", f"## Test accuracy per layer ({pooling}-token features)" if pooling == "last"
                  else f"## Test accuracy per layer ({pooling}-pooled features)", ""]
        lines.append(markdown_table(["layer"] + [m["label"] for m in models], rows))
    return "\n".join(lines)


def plot_accuracy(result: dict, path: str | Path, *, relative_depth: bool = False) -> Path:
    """Accuracy against layer, one line per model (control dashed), one panel per pooling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    poolings = list(dict.fromkeys(p for m in result["models"] for p in m["probes"]))
    fig, axes = plt.subplots(1, len(poolings), figsize=(6 * len(poolings), 4.2), squeeze=False)
    for ax, pooling in zip(axes[0], poolings):
        for k, m in enumerate(result["models"]):
            if pooling not in m["probes"]:
                continue
            lay = m["probes"][pooling]["layers"]
            x = np.array([r["layer"] for r in lay], float)
            if relative_depth and len(x) > 1:
                x = x / x.max()
            color = f"C{k % 10}"
            ax.plot(x, [r["accuracy"] for r in lay], marker="o", ms=3, color=color, label=m["label"])
            if "control_accuracy" in lay[0]:
                ax.plot(x, [r["control_accuracy"] for r in lay], ls="--", lw=1, color=color, alpha=0.5,
                        label=f"{m['label']} (shuffled labels)")
        ax.axhline(result["task"]["chance"], color="grey", ls=":", lw=1, label="majority class")
        if not relative_depth:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("relative depth" if relative_depth else "layer (0 = embeddings)")
        ax.set_ylabel("probe test accuracy")
        ax.set_title(f"{result['task']['name']}: {pooling} token" if pooling == "last"
                     else f"{result['task']['name']}: {pooling} pooled")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linreg probe",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Linear probing of every layer: pooled hidden states -> logistic-regression probe -> "
            "held-out accuracy per layer, for one or several models, with a shuffled-label control.\n"
            "Writes probe_results.json, probe_results.md and probe_accuracy.png to --output-dir."),
        epilog=(
            "examples:\n"
            "  linreg probe --model runs/baseline --model runs/cosine --task xstorycloze-en -o out/probe\n"
            "  linreg probe --model runs/baseline/hf --data xstorycloze_en.jsonl -o out/probe\n"
            "  linreg probe --model gpt2 --data sst2.jsonl --text-field sentence --label-field label\n"
            "layer 0 is the embedding output, layer i the output of block i."),
    )
    g = p.add_argument_group("models")
    g.add_argument("--model", action="append", required=True, metavar="PATH_OR_NAME",
                   help="model folder, run folder (its hf/ export is used) or hub name; repeat for several models")
    g.add_argument("--label", action="append", default=None, metavar="NAME",
                   help="table/plot label of each --model, in the same order (default: folder name)")
    g.add_argument("--device", default="auto", help=f"device: {DEVICES_HELP} (default: auto)")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="model dtype (default auto: bfloat16 on CUDA with bf16, else float32); features are float32")
    g.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code from the hub")
    d = p.add_argument_group("data (exactly one of --task, --data, --hub)")
    d.add_argument("--task", choices=["xstorycloze-en"], help="built-in task, loaded from the hub (juletxara/xstory_cloze, en)")
    d.add_argument("--data", metavar="FILE", help="local .jsonl/.json/.csv/.tsv: xstorycloze rows or text+label rows")
    d.add_argument("--hub", metavar="NAME", help="hub data set name for a classification task")
    d.add_argument("--hub-config", default=None, help="hub data set configuration (with --hub)")
    d.add_argument("--split", default=None,
                   help="comma-separated hub splits to pool before our own train/test split "
                        "(default: train,eval for xstorycloze-en, train for --hub)")
    d.add_argument("--format", dest="fmt", default="auto", choices=["auto", "xstorycloze", "classification"],
                   help="how to read --data/--hub rows (auto: xstorycloze if its columns are present)")
    d.add_argument("--text-field", default="text", help="text field of classification rows (default: text)")
    d.add_argument("--text-pair-field", default=None, help="optional second text field, joined with a newline")
    d.add_argument("--label-field", default="label", help="label field of classification rows (default: label)")
    d.add_argument("--limit", type=int, default=None, help="use only the first N stories/examples (quick runs)")
    f = p.add_argument_group("features and probes")
    f.add_argument("--pooling", default="both", choices=["last", "mean", "both"],
                   help="feature per example: last real token, mean over real tokens, or both (default)")
    f.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default: 16)")
    f.add_argument("--max-length", type=int, default=512, help="max tokens per text, truncated from the left (default: 512)")
    f.add_argument("--test-size", type=float, default=0.3, help="held-out fraction of stories/examples (default: 0.3)")
    f.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression (default: 1.0)")
    f.add_argument("--max-iter", type=int, default=2000, help="solver iterations (default: 2000)")
    f.add_argument("--seed", type=int, default=0, help="seed of the split and the control permutation (default: 0)")
    f.add_argument("--no-control", action="store_true", help="skip the shuffled-label control probes")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output-dir", default="eval_results/probe", help="output folder (default: eval_results/probe)")
    o.add_argument("--relative-depth", action="store_true",
                   help="plot against layer / number of layers (for models of different depth)")
    o.add_argument("--save-features", action="store_true", help="also save features_<label>.npz (can be large)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    o.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def run_probe(args: argparse.Namespace) -> dict:
    models = args.model
    labels = model_labels(models, args.label)  # fail fast, before any data or model is loaded
    for name, v in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    if args.C <= 0:
        raise ConfigError(f"--C must be > 0, got {args.C}")
    data = load_probe_data(task=args.task, data=args.data, hub=args.hub, hub_config=args.hub_config,
                           splits=args.split, fmt_=args.fmt, text_field=args.text_field,
                           label_field=args.label_field, text_pair_field=args.text_pair_field, limit=args.limit)
    log.info("probing %s: %d examples, labels %s", data.name, len(data), data.label_names)
    pooling = list(POOLINGS) if args.pooling == "both" else [args.pooling]
    out_dir = Path(args.output_dir)
    entries = []
    split_info = None
    for path, label in zip(models, labels):
        log.info("model %s (%s)", label, path)
        model, tok = load_model_and_tokenizer(path, dtype=args.dtype, device=args.device,
                                              trust_remote_code=args.trust_remote_code)
        feats = extract_features(model, tok, data.texts, pooling=pooling, batch_size=args.batch_size,
                                 max_length=args.max_length, progress=not args.no_progress)
        if args.save_features:
            np.savez_compressed(out_dir / f"features_{label}.npz", labels=data.labels, groups=data.groups,
                                **{f"features_{p}": feats[p] for p in feats})
        entry = {"label": label, "model": str(path), "n_layers": int(next(iter(feats.values())).shape[0] - 1),
                 "hidden_size": int(next(iter(feats.values())).shape[-1]), "probes": {}}
        for p in pooling:
            pr = probe_layers(feats[p], data.labels, data.groups, test_size=args.test_size, seed=args.seed,
                              C=args.C, max_iter=args.max_iter, control=not args.no_control,
                              progress=not args.no_progress)
            split_info = {k: pr.pop(k) for k in ("chance", "n_train", "n_test")}
            entry["probes"][p] = pr
            log.info("%s %s: best layer %d, accuracy %.3f", label, p, pr["best_layer"], pr["best_accuracy"])
        entries.append(entry)
        del model
    return {
        "kind": "probe",
        "version": 1,
        "task": {"name": data.name, "source": data.source, "n_examples": len(data),
                 "label_names": data.label_names, **split_info},
        "settings": {"pooling": pooling, "C": args.C, "test_size": args.test_size, "seed": args.seed,
                     "max_length": args.max_length, "batch_size": args.batch_size, "dtype": args.dtype,
                     "control": not args.no_control,
                     "layer_convention": "0 = embeddings, i = output of block i (HF hidden_states)"},
        "models": entries,
        "meta": {"created": now_iso(), **environment_info()},
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = run_probe(args)
        write_json(out_dir / "probe_results.json", result)
        md = render_markdown(result)
        write_text(out_dir / "probe_results.md", md)
        plot_accuracy(result, out_dir / "probe_accuracy.png", relative_depth=args.relative_depth)
        if not args.quiet:
            print(md)
            print(f"wrote {out_dir / 'probe_results.json'}, {out_dir / 'probe_results.md'}, "
                  f"{out_dir / 'probe_accuracy.png'}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
