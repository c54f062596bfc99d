"""Fine-tuning data: SuperGLUE MultiRC / BoolQ / CB, Anthropic HH (helpful) pairs, and any JSONL.

Everything ends up as one of two example types:

* :class:`ClassExample` ``(text, label)`` for sequence classification. SuperGLUE rows are joined into
  one text with markers (the paper's framing), question first so that truncation at ``train.seq_len``
  cuts the end of the passage, never the question::

      BoolQ    question: {question}\\npassage: {passage}
      MultiRC  question: {question}\\nanswer: {answer}\\npassage: {paragraph}
      CB       question: {hypothesis}\\npassage: {premise}

  MultiRC is the flattened Hugging Face layout: one row per (paragraph, question, candidate answer),
  label 1 when the answer is correct, so the answer is part of the text. CB has three classes
  (entailment, contradiction, neutral); BoolQ and MultiRC two (False, True).
* :class:`PairExample` ``(chosen, rejected)`` for reward modelling (Anthropic HH ``chosen``/``rejected``
  dialogues, kept verbatim).

Sources: the Hugging Face hub through ``datasets.load_dataset`` (``aps/super_glue`` with the task as
configuration, ``Anthropic/hh-rlhf`` with the helpful ``data_dir`` subsets), or local JSONL files: one
JSON object per line, blank lines ignored. Local SuperGLUE files use the hub field names (``question``,
``passage``, ``paragraph``, ``answer``, ``premise``, ``hypothesis``, ``label``); labels may be class
ids, booleans or class names. Generic files (``dataset: jsonl``) need ``text``/``label`` or
``chosen``/``rejected`` fields (names configurable). Any problem in a file is a
:class:`~linreg.errors.DataError` naming the file and the line number.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from linreg.errors import ConfigError, DataError

__all__ = [
    "ClassExample",
    "PairExample",
    "TaskData",
    "FinetuneOptions",
    "DATASETS",
    "format_boolq",
    "format_multirc",
    "format_cb",
    "read_jsonl",
    "synthetic_rows",
    "load_task_data",
]


@dataclass(frozen=True)
class ClassExample:
    text: str
    label: int


@dataclass(frozen=True)
class PairExample:
    chosen: str
    rejected: str


@dataclass
class FinetuneOptions:
    """``task.options`` of the ``classification`` and ``reward`` recipes (see docs/finetune.md)."""

    dataset: Literal["multirc", "boolq", "cb", "hh-helpful", "jsonl", "synthetic"] = "jsonl"
    train_file: str | None = None  # local JSONL (optionally .gz) instead of the hub
    validation_file: str | None = None  # local JSONL of the held-out split
    val_fraction: float | None = None  # no validation split: hold out this share of train (fixed seed 0)
    hf: str | None = None  # hub data set; default aps/super_glue (SuperGLUE) or Anthropic/hh-rlhf
    hf_config: str | None = None  # hub configuration; default: the SuperGLUE task name
    hf_data_dirs: list[str] | None = None  # hub data_dir subsets (HH default: helpful-base)
    revision: str | None = None  # hub revision for reproducibility
    train_split: str = "train"
    validation_split: str | None = None  # default: "validation" (SuperGLUE, jsonl), "test" (HH)
    text_field: str = "text"  # generic JSONL field names
    label_field: str = "label"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    labels: list[str] | None = None  # class names, index = class id (string labels map through this)
    num_labels: int | None = None  # default: from the task or the labels seen
    max_train_examples: int | None = None  # keep the first N training examples (reading order)
    max_eval_examples: int | None = None  # evaluate on the first N validation examples (default all)
    truncation_side: Literal["auto", "left", "right"] = "auto"  # auto: right (classification), left (reward)
    synthetic_train: int = 2000  # dataset synthetic: generated training examples (offline demos)
    synthetic_validation: int = 200  # dataset synthetic: generated validation examples
    name: str | None = None  # task label in the table (default: dataset name or the train file's stem)
    model_name: str | None = None  # model label in the table (default: from model.init_from)

    def validate(self, path: str = "task.options") -> None:
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{path}.val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.validation_file is not None and self.val_fraction is not None:
            raise ConfigError(f"{path}: give validation_file or val_fraction, not both")
        if self.dataset == "jsonl" and self.train_file is None:
            raise ConfigError(f"{path}.train_file: dataset 'jsonl' needs a local JSONL file")
        if self.train_file is not None and self.validation_file is None and self.val_fraction is None:
            # every data set read from a local file (jsonl, or boolq/multirc/cb/hh-helpful/synthetic with
            # train_file): the validation split cannot come from the hub
            raise ConfigError(f"{path}: train_file (dataset {self.dataset!r}) needs validation_file or "
                              f"val_fraction (task metrics and the linearity tracking use held-out examples)")
        if self.validation_file is not None and self.train_file is None:
            raise ConfigError(f"{path}.validation_file: only together with train_file")
        for name in ("num_labels", "max_train_examples", "max_eval_examples", "synthetic_train",
                     "synthetic_validation"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{path}.{name}: must be positive, got {v}")
        if self.num_labels is not None and self.num_labels < 2:
            raise ConfigError(f"{path}.num_labels: a classifier needs at least 2 classes, got {self.num_labels}")
        if self.labels is not None:
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise ConfigError(f"{path}.labels: need at least two distinct class names, got {self.labels}")
            if self.num_labels is not None and self.num_labels != len(self.labels):
                raise ConfigError(f"{path}: num_labels={self.num_labels} but {len(self.labels)} labels are named")


@dataclass
class TaskData:
    kind: Literal["classification", "reward"]
    train: list
    validation: list
    label_names: list[str] | None = None  # classification: index = class id
    name: str = "task"
    sources: dict[str, str] = field(default_factory=dict)  # split -> where it came from

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 1


# --------------------------------------------------------------------------------------------------
# formatting


def format_boolq(row: dict) -> str:
    return f"question: {row['question']}\npassage: {row['passage']}"


def format_multirc(row: dict) -> str:
    return f"question: {row['question']}\nanswer: {row['answer']}\npassage: {row['paragraph']}"


def format_cb(row: dict) -> str:
    return f"question: {row['hypothesis']}\npassage: {row['premise']}"


@dataclass(frozen=True)
class _Spec:
    kind: str
    fields: tuple[str, ...]
    fmt: Callable[[dict], str] | None
    label_names: tuple[str, ...] | None
    hf: str
    hf_config: str | None
    validation_split: str
    data_dirs: tuple[str, ...] = ()


DATASETS: dict[str, _Spec] = {
    "boolq": _Spec("classification", ("question", "passage", "label"), format_boolq, ("False", "True"),
                   "aps/super_glue", "boolq", "validation"),
    "multirc": _Spec("classification", ("paragraph", "question", "answer", "label"), format_multirc,
                     ("False", "True"), "aps/super_glue", "multirc", "validation"),
    "cb": _Spec("classification", ("premise", "hypothesis", "label"), format_cb,
                ("entailment", "contradiction", "neutral"), "aps/super_glue", "cb", "validation"),
    "hh-helpful": _Spec("reward", ("chosen", "rejected"), None, None, "Anthropic/hh-rlhf", None, "test",
                        ("helpful-base",)),
}


# --------------------------------------------------------------------------------------------------
# an embedded toy task (offline demos of the tiny recipes)

_NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Anna", "Sam", "Zoe", "Leo", "Emma", "Jack"]
_PLACES = ["park", "garden", "beach", "farm", "school", "lake", "forest", "zoo"]
_THINGS = ["ball", "kite", "doll", "book", "hat", "cup", "box", "drum", "boat", "shell"]
_COLORS = ["red", "blue", "green", "yellow", "pink", "brown", "white", "purple"]
_GOOD = ["happy", "glad", "proud", "excited", "cheerful"]
_BAD = ["sad", "worried", "upset", "scared", "grumpy"]
_FILLER = ["The sun was warm.", "A bird sang in a tree.", "{n} saw a {c} {t}.", "The wind was soft.",
           "{n} walked to the {p}.", "There was a {c} {t} on the grass.", "It was a long day.",
           "A friend said hello to {n}."]


def synthetic_rows(kind: str, n: int, seed: int) -> list[dict]:
    """Deterministic toy rows in the generic JSONL layout.

    classification: ``{"text", "label"}``; the passage is a few filler sentences ending with how a child
    felt, and the label is 1 when that feeling is a happy one (a tiny model learns it in a few dozen
    steps). reward: ``{"chosen", "rejected"}`` HH-style dialogues where the chosen answer helps
    and the rejected one does not."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        nm, p, t, c = rng.choice(_NAMES), rng.choice(_PLACES), rng.choice(_THINGS), rng.choice(_COLORS)
        if kind == "reward":
            prompt = f"\n\nHuman: What color is the {t} at the {p}?\n\nAssistant:"
            chosen = rng.choice([f" The {t} at the {p} is {c}.", f" It is {c}. {nm} put the {c} {t} there.",
                                 f" The {t} is {c}, and it is next to the {rng.choice(_PLACES)}."])
            rejected = rng.choice([" I do not know.", " Go away.", f" I will not tell you about the {t}.",
                                   " That is not a good question."])
            rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
            continue
        label = rng.random() < 0.5
        feel = rng.choice(_GOOD if label else _BAD)
        sents = [rng.choice(_FILLER).format(n=nm, p=p, t=rng.choice(_THINGS), c=rng.choice(_COLORS))
                 for _ in range(rng.randint(1, 3))]
        sents.append(f"{nm} felt {feel} at the {p}.")
        rows.append({"text": f"question: is {nm} happy?\npassage: " + " ".join(sents), "label": int(label)})
    return rows


# --------------------------------------------------------------------------------------------------
# reading


def read_jsonl(path: str | Path) -> Iterable[tuple[str, dict]]:
    """Yield ``("FILE:LINE", object)`` for every non-blank line; malformed lines raise DataError."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file not found: {path}")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError as exc:
                raise DataError(f"{p}:{lineno + 1}: not valid UTF-8 ({exc.reason})") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield f"{p}:{lineno}", obj


def _hub_rows(name: str, config: str | None, split: str, data_dirs: Iterable[str] | None,
              revision: str | None) -> Iterable[tuple[str, dict]]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise DataError(f"reading {name} from the hub needs the `datasets` package ({exc})") from exc
    for data_dir in (list(data_dirs) if data_dirs else [None]):
        label = name + (f"/{config}" if config else "") + (f"[{data_dir}]" if data_dir else "") + f":{split}"
        kw: dict[str, Any] = {"split": split}
        if revision:
            kw["revision"] = revision
        if data_dir:
            kw["data_dir"] = data_dir
        try:
            ds = datasets.load_dataset(name, config, **kw) if config else datasets.load_dataset(name, **kw)
        except Exception as exc:  # datasets raises many kinds (network, missing split, ...)
            raise DataError(f"could not load {label} from the Hugging Face hub: {type(exc).__name__}: {exc}. "
                            f"Offline? Point task.options.train_file/validation_file at local JSONL") from exc
        for i, row in enumerate(ds):
            yield f"{label} row {i}", dict(row)


def _require(row: dict, names: Iterable[str], where: str) -> None:
    for name in names:
        if name not in row:
            present = ", ".join(sorted(map(str, row))) or "none"
            raise DataError(f"{where}: missing field {name!r} (fields present: {present})")


def _text(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


class _LabelMap:
    """Turns raw labels (int ids, booleans, class names) into class ids, with errors naming the row."""

    def __init__(self, names: list[str] | None, num_labels: int | None, fixed: bool):
        self.names = list(names) if names else None
        self.num_labels = num_labels if num_labels is not None else (len(self.names) if self.names else None)
        self.fixed = fixed  # names given: unknown strings are errors; otherwise strings are collected
        self.seen_strings: dict[str, int] = {}

    def __call__(self, value: Any, name: str, where: str) -> Any:
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            if value < 0:
                raise DataError(f"{where}: field {name!r} is {value}; negative labels (unlabelled test rows?) "
                                f"cannot be trained on")
            if self.num_labels is not None and value >= self.num_labels:
                raise DataError(f"{where}: label {value} out of range for {self.num_labels} classes")
            return value
        if isinstance(value, float) and value.is_integer():
            return self(int(value), name, where)
        if isinstance(value, str):
            if self.names is not None and value in self.names:
                return self.names.index(value)
            lowered = value.strip().lower()
            if self.names is not None:
                for i, n in enumerate(self.names):
                    if n.lower() == lowered:
                        return i
            if self.fixed:
                raise DataError(f"{where}: unknown label {value!r}; classes: {', '.join(self.names or [])}")
            return ("str", value)  # resolved once every string label of the training split is known
        raise DataError(f"{where}: field {name!r} must be a class id, boolean or class name, got "
                        f"{type(value).__name__} {value!r:.60}")


def _pairs(rows: Iterable[tuple[str, dict]], chosen: str, rejected: str, limit: int | None) -> list[PairExample]:
    out = []
    for where, row in rows:
        _require(row, (chosen, rejected), where)
        out.append(PairExample(_text(row[chosen], chosen, where), _text(row[rejected], rejected, where)))
        if limit is not None and len(out) >= limit:
            break
    return out


def _classes(rows: Iterable[tuple[str, dict]], spec: _Spec | None, opts: FinetuneOptions, labels: _LabelMap,
             limit: int | None) -> list[tuple[str, Any, str]]:
    out = []
    for where, row in rows:
        if spec is not None:
            _require(row, spec.fields, where)
            for f in spec.fields:
                if f != "label":
                    _text(row[f], f, where)
            text = spec.fmt(row)
            raw = row["label"]
            label_name = "label"
        else:
            _require(row, (opts.text_field, opts.label_field), where)
            text = _text(row[opts.text_field], opts.text_field, where)
            raw = row[opts.label_field]
            label_name = opts.label_field
        out.append((text, labels(raw, label_name, where), where))
        if limit is not None and len(out) >= limit:
            break
    return out


def _split_off(items: list, fraction: float) -> tuple[list, list]:
    """Deterministic hold-out (seed 0, independent of train.seed so every seed tracks the same tokens)."""
    import numpy as np

    n_val = max(1, int(round(len(items) * fraction)))
    if n_val >= len(items):
        raise DataError(f"val_fraction={fraction} leaves no training examples out of {len(items)}")
    perm = np.random.default_rng(0).permutation(len(items))
    val_idx = set(perm[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]


def load_task_data(opts: FinetuneOptions, kind: str) -> TaskData:
    """Read the train and validation splits of ``opts`` for objective ``kind`` (classification|reward)."""
    spec = DATASETS.get(opts.dataset)
    if spec is not None and spec.kind != kind:
        raise ConfigError(f"task.options.dataset={opts.dataset!r} is a {spec.kind} data set; task.kind is {kind!r}")
    if kind not in ("classification", "reward"):
        raise ConfigError(f"load_task_data: unknown kind {kind!r}")

    def rows(split: str):
        if opts.dataset == "synthetic" and opts.train_file is None:
            n = opts.synthetic_train if split == "train" else opts.synthetic_validation
            return ((f"synthetic {split} example {i}", row)
                    for i, row in enumerate(synthetic_rows(kind, n, seed=0 if split == "train" else 1)))
        if opts.train_file is not None:
            path = opts.train_file if split == "train" else opts.validation_file
            return read_jsonl(path)
        assert spec is not None
        dirs = opts.hf_data_dirs if opts.hf_data_dirs is not None else list(spec.data_dirs)
        hub_split = opts.train_split if split == "train" else (opts.validation_split or spec.validation_split)
        return _hub_rows(opts.hf or spec.hf, opts.hf_config or spec.hf_config, hub_split, dirs, opts.revision)

    def source(split: str) -> str:
        if opts.dataset == "synthetic" and opts.train_file is None:
            return f"synthetic {kind} ({split})"
        if opts.train_file is not None:
            return str(opts.train_file if split == "train" else opts.validation_file)
        dirs = opts.hf_data_dirs if opts.hf_data_dirs is not None else list(spec.data_dirs)
        hub_split = opts.train_split if split == "train" else (opts.validation_split or spec.validation_split)
        return (f"hf:{opts.hf or spec.hf}" + (f"/{opts.hf_config or spec.hf_config}" if (opts.hf_config or
                spec.hf_config) else "") + (f"[{','.join(dirs)}]" if dirs else "") + f":{hub_split}")

    has_val = opts.val_fraction is None
    if opts.dataset == "synthetic" and opts.train_file is None:
        name = opts.name or f"synthetic-{kind}"
    else:
        name = opts.name or (opts.dataset if spec is not None else Path(opts.train_file).name.split(".")[0])
    sources = {"train": source("train")}
    if has_val:
        sources["validation"] = source("validation")
    else:
        sources["validation"] = f"{sources['train']} (held-out {opts.val_fraction:g})"

    if kind == "reward":
        chosen = spec.fields[0] if spec else opts.chosen_field
        rejected = spec.fields[1] if spec else opts.rejected_field
        train = _pairs(rows("train"), chosen, rejected, None if not has_val else opts.max_train_examples)
        if has_val:
            val = _pairs(rows("validation"), chosen, rejected, None)
        else:
            train, val = _split_off(train, opts.val_fraction)
            if opts.max_train_examples is not None:
                train = train[:opts.max_train_examples]
        if not train or not val:
            raise DataError(f"{name}: {len(train)} training and {len(val)} validation pairs; need both")
        return TaskData("reward", train, val, None, name, sources)

    names = list(opts.labels) if opts.labels else (list(spec.label_names) if spec else None)
    if names is None and opts.dataset == "synthetic" and opts.train_file is None:
        names = ["no", "yes"]
    labels = _LabelMap(names, opts.num_labels, fixed=names is not None)
    train_raw = _classes(rows("train"), spec, opts, labels, None if not has_val else opts.max_train_examples)
    val_raw = _classes(rows("validation"), spec, opts, labels, None) if has_val else None
    if not has_val:
        train_raw, val_raw = _split_off(train_raw, opts.val_fraction)
        if opts.max_train_examples is not None:
            train_raw = train_raw[:opts.max_train_examples]
    # string labels without given names: classes are the sorted names seen in the training split
    strings = sorted({lab[1] for _, lab, _ in train_raw if isinstance(lab, tuple)})
    if strings:
        if any(not isinstance(lab, tuple) for _, lab, _ in train_raw):
            raise DataError(f"{sources['train']}: labels mix class names and class ids; set task.options.labels")
        names = strings
    if names is None:
        ids = [lab for _, lab, _ in train_raw]
        n = opts.num_labels or (max(ids) + 1 if ids else 0)
        names = [str(i) for i in range(max(n, 2))]

    def resolve(items):
        out = []
        for text, lab, where in items:
            if isinstance(lab, tuple):
                if lab[1] not in names:
                    raise DataError(f"{where}: label {lab[1]!r} does not occur in the training split "
                                    f"(classes: {', '.join(names)}); set task.options.labels")
                lab = names.index(lab[1])
            elif lab >= len(names):
                raise DataError(f"{where}: label {lab} out of range for {len(names)} classes "
                                f"({', '.join(names)}); set task.options.num_labels")
            out.append(ClassExample(text, int(lab)))
        return out

    train, val = resolve(train_raw), resolve(val_raw)
    if not train or not val:
        raise DataError(f"{name}: {len(train)} training and {len(val)} validation examples; need both")
    return TaskData("classification", train, val, names, name, sources)
