"""SuperGLUE zero-shot through lm-evaluation-harness (``linreg superglue``).

The paper's columns: boolq, cb (accuracy and macro F1), copa, multirc, record (F1 and exact match),
rte, wic, xstorycloze-en, and their mean. Scoring is lm-eval's (log-likelihood of each choice); we
only choose the tasks, drive :func:`lm_eval.simple_evaluate` from Python on our models and collect
the numbers. Mind the names: lm-eval's ``rte`` is GLUE's; SuperGLUE's is ``sglue_rte``.

Data:
- default: the harness's own tasks, data from the hub (``aps/super_glue``, ``juletxara/xstory_cloze``);
- ``--data-dir DIR``: local files ``DIR/<task>.jsonl`` (or ``.json``) with the hub's columns. For each
  task we take the installed harness's task YAML, point it at the local file (``dataset_path: json``
  with ``data_files``), copy its helper modules, and write it to a temporary folder that is passed to
  lm-eval as an include path: prompts and metrics stay exactly the harness's.

ReCoRD: the harness's helper imports ``transformers.data.metrics.squad_metrics``, which transformers 5
dropped; when that import fails, the ReCoRD config uses :mod:`evals.lm_record` (same prompt and
scoring) instead, for hub and local data alike.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    run_cli,
    setup_logging,
    write_json,
    write_text,
)

log = logging.getLogger("evals.superglue")


@dataclass(frozen=True)
class TaskSpec:
    key: str  # our name (and local file stem)
    harness: str  # lm-eval task name
    yaml: str  # harness YAML, relative to lm_eval/tasks
    aliases: tuple[str, ...] = ()  # other accepted local file stems


TASKS: dict[str, TaskSpec] = {t.key: t for t in [
    TaskSpec("boolq", "boolq", "super_glue/boolq/default.yaml"),
    TaskSpec("cb", "cb", "super_glue/cb/default.yaml"),
    TaskSpec("copa", "copa", "super_glue/copa/default.yaml"),
    TaskSpec("multirc", "multirc", "super_glue/multirc/default.yaml"),
    TaskSpec("record", "record", "super_glue/record/default.yaml"),
    TaskSpec("rte", "sglue_rte", "super_glue/rte/default.yaml", ("sglue_rte",)),  # not GLUE's `rte`
    TaskSpec("wic", "wic", "super_glue/wic/default.yaml"),
    TaskSpec("xstorycloze_en", "xstorycloze_en", "xstorycloze/default_en.yaml", ("xstorycloze-en",)),
]}

# (result key, task key, lm-eval metric, Markdown header) - the paper's columns, in order
COLUMNS: list[tuple[str, str, str, str]] = [
    ("boolq", "boolq", "acc", "BoolQ"),
    ("cb_acc", "cb", "acc", "CB acc"),
    ("cb_f1", "cb", "f1", "CB F1"),
    ("copa", "copa", "acc", "COPA"),
    ("multirc", "multirc", "acc", "MultiRC"),
    ("record_f1", "record", "f1", "ReCoRD F1"),
    ("record_em", "record", "em", "ReCoRD EM"),
    ("rte", "rte", "acc", "RTE"),
    ("wic", "wic", "acc", "WiC"),
    ("xstorycloze_en", "xstorycloze_en", "acc", "xStoryCloze-en"),
]
MEAN_KEY = "mean"


def _require_lm_eval():
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401 - needs accelerate
    except ImportError as exc:
        raise ConfigError(
            f"lm-evaluation-harness is not usable here ({exc}); install the optional extra: "
            "pip install 'linreg[eval]' (lm-eval>=0.4.5 with its HF backend: pip install 'lm-eval[hf]')"
        ) from exc
    return lm_eval


def harness_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def record_helper_importable() -> bool:
    """Whether the harness's own ReCoRD helper can load (it needs transformers' squad_metrics)."""
    try:
        import transformers.data.metrics.squad_metrics  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


# --------------------------------------------------------------------------------------------
# task configs
# --------------------------------------------------------------------------------------------
class _Fn(str):
    """A ``!function module.name`` value of a task YAML."""


def _yaml_loader(base: type):
    class Loader(base):  # type: ignore[misc, valid-type]
        pass

    Loader.add_constructor("!function", lambda loader, node: _Fn(loader.construct_scalar(node)))
    return Loader


def _yaml_dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Fn, lambda d, v: d.represent_scalar("!function", str(v)))
    return Dumper


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


def read_task_yaml(path: Path) -> tuple[dict, dict[str, Path]]:
    """A harness task YAML with its ``include`` chain merged; also which folder each function's
    module lives in (``{"utils": Path(...)}``)."""
    import yaml

    loader = _yaml_loader(yaml.SafeLoader)
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
    modules: dict[str, Path] = {}
    base: dict = {}
    if "include" in cfg:
        inc = Path(cfg.pop("include"))
        inc = inc if inc.is_absolute() else path.parent / inc
        base, modules = read_task_yaml(inc)
    for v in _walk(cfg):
        if isinstance(v, _Fn):
            modules[v.rsplit(".", 1)[0]] = path.parent
    merged = {**base, **cfg}
    return merged, modules


def write_task_configs(keys: list[str], out_dir: Path, data_files: dict[str, Path] | None = None,
                       prefix: str = "linreg_") -> dict[str, str]:
    """Write lm-eval task YAMLs for ``keys`` into ``out_dir`` (one subfolder per task).

    With ``data_files`` (key -> local file) every task reads its local file; without, only tasks that
    need a fix (ReCoRD when the harness helper cannot load) are written, keeping hub data. Returns
    key -> lm-eval task name to request (built-in names for tasks left as they are).
    """
    import yaml

    root = harness_tasks_dir()
    dumper = _yaml_dumper()
    record_ok = record_helper_importable()
    names: dict[str, str] = {}
    for key in keys:
        spec = TASKS[key]
        local = data_files is not None
        fix_record = key == "record" and not record_ok
        if not local and not fix_record:
            names[key] = spec.harness
            continue
        src = root / spec.yaml
        if not src.is_file():
            raise ConfigError(f"the installed lm-eval has no task config {spec.yaml} for {key!r}; "
                              "install lm-eval>=0.4.5")
        cfg, modules = read_task_yaml(src)
        task_dir = out_dir / key
        task_dir.mkdir(parents=True, exist_ok=True)
        for module, folder in modules.items():
            if key == "record" and fix_record:
                (task_dir / f"{module}.py").write_text(
                    "# written by evals.superglue: ReCoRD helpers that work with transformers 5\n"
                    "from evals.lm_record import *  # noqa: F401,F403\n", encoding="utf-8")
            else:
                shutil.copyfile(folder / f"{module}.py", task_dir / f"{module}.py")
        cfg["task"] = f"{prefix}{key}"
        cfg.pop("tag", None)  # keep our copies out of the harness's groups
        if local:
            cfg["dataset_path"] = "json"
            cfg.pop("dataset_name", None)
            cfg["dataset_kwargs"] = {"data_files": {"validation": str(Path(data_files[key]).resolve())}}
            cfg["validation_split"] = "validation"
            for k in ("training_split", "test_split", "fewshot_split"):
                cfg.pop(k, None)
        (task_dir / f"{key}.yaml").write_text(yaml.dump(cfg, Dumper=dumper, sort_keys=False, allow_unicode=True),
                                              encoding="utf-8")
        names[key] = cfg["task"]
    return names


def find_data_files(data_dir: str | Path, keys: list[str]) -> dict[str, Path]:
    """``DIR/<task>.jsonl`` (or ``.json``, or an alias stem such as ``sglue_rte``) for every key."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data folder not found: {d}")
    found, missing = {}, []
    for key in keys:
        stems = (key,) + TASKS[key].aliases
        cand = [d / f"{s}{ext}" for s in stems for ext in (".jsonl", ".json")]
        hit = next((c for c in cand if c.is_file()), None)
        if hit is None:
            missing.append(f"{key} ({' or '.join(c.name for c in cand[:2])})")
        else:
            found[key] = hit
    if missing:
        raise DataError(f"{d}: no data file for {', '.join(missing)}; pass --tasks to run a subset")
    return found


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def _metric(res: dict, metric: str) -> tuple[float | None, float | None]:
    value = res.get(f"{metric},none", res.get(metric))
    stderr = res.get(f"{metric}_stderr,none", res.get(f"{metric}_stderr"))
    value = float(value) if isinstance(value, (int, float)) else None
    stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
    return value, stderr


def run_superglue(model: Any, tokenizer: Any = None, *, tasks: list[str] | None = None,
                  data_dir: str | Path | None = None, batch_size: int | str = 8, device: str = "auto",
                  dtype: str = "auto", limit: int | float | None = None, num_fewshot: int = 0,
                  bootstrap_iters: int = 10000, max_length: int | None = None, seed: int = 1234,
                  keep_task_dir: str | Path | None = None, trust_remote_code: bool = False) -> dict:
    """Evaluate one model (a path/hub name, or a loaded ``PreTrainedModel`` plus its tokenizer).

    Returns ``{"scores": {column: value}, "stderr": {column: value}, "tasks": {key: lm-eval name},
    "n_samples": {key: n}, "raw": lm-eval's per-task results}``; ``scores["mean"]`` is the mean of the
    available columns.
    """
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    keys = list(tasks or TASKS)
    unknown = [k for k in keys if k not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)} "
                          "(SuperGLUE's RTE is 'rte' here, run as lm-eval's sglue_rte)")
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_model_and_tokenizer(str(model), dtype=dtype, device=device,
                                                    trust_remote_code=trust_remote_code)
    elif tokenizer is None:
        raise ConfigError("pass the tokenizer together with a model object")
    data_files = find_data_files(data_dir, keys) if data_dir else None
    tmp = Path(keep_task_dir) if keep_task_dir else Path(tempfile.mkdtemp(prefix="linreg_lmeval_tasks_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        names = write_task_configs(keys, tmp, data_files)
        custom = any(n != TASKS[k].harness for k, n in names.items())
        tm_kwargs: dict[str, Any] = {"include_path": str(tmp) if custom else None}
        if all(n != TASKS[k].harness for k, n in names.items()) and \
                "include_defaults" in inspect.signature(TaskManager.__init__).parameters:
            tm_kwargs["include_defaults"] = False  # all ours: skip indexing the harness's ~10k configs
        tm = TaskManager(**tm_kwargs)
        lm_kwargs = dict(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        if max_length:
            lm_kwargs["max_length"] = max_length
        lm = HFLM(**lm_kwargs)
        out = lm_eval.simple_evaluate(model=lm, tasks=[names[k] for k in keys], num_fewshot=num_fewshot,
                                      limit=limit, task_manager=tm, log_samples=False,
                                      bootstrap_iters=bootstrap_iters, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        if not keep_task_dir:
            shutil.rmtree(tmp, ignore_errors=True)
    if out is None:  # non-zero ranks in distributed runs
        return {}
    results = out["results"]
    scores, stderr = {}, {}
    for col, key, metric, _ in COLUMNS:
        if key not in names:
            continue
        res = results.get(names[key])
        if res is None:
            raise DataError(f"lm-eval returned no results for {names[key]}")
        scores[col], stderr[col] = _metric(res, metric)
    vals = [v for v in scores.values() if v is not None]
    scores[MEAN_KEY] = sum(vals) / len(vals) if vals else None
    n_samples = {k: (out.get("n-samples", {}).get(names[k], {}) or {}).get("effective") for k in keys}
    return {"scores": scores, "stderr": stderr, "tasks": names, "n_samples": n_samples,
            "raw": {names[k]: results.get(names[k]) for k in keys},
            "versions": {names[k]: out.get("versions", {}).get(names[k]) for k in keys}}


def render_markdown(result: dict) -> str:
    cols = [c for c in COLUMNS if any(c[0] in m["scores"] for m in result["models"])]
    headers = ["model"] + [c[3] for c in cols] + ["Mean"]
    rows = []
    for m in result["models"]:
        rows.append([m["label"]] + [fmt(m["scores"].get(c[0])) for c in cols] + [fmt(m["scores"].get(MEAN_KEY))])
    src = result["settings"]["data"]
    return (f"# SuperGLUE zero-shot (lm-eval {result['meta'].get('lm_eval', '?')})\n\n"
            f"{result['settings']['num_fewshot']}-shot, data: {src}"
            + (f", limit {result['settings']['limit']} per task" if result["settings"]["limit"] else "")
            + ". RTE is SuperGLUE's (lm-eval `sglue_rte`). Mean over the columns shown.\n\n"
            + markdown_table(headers, rows))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linreg superglue",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "SuperGLUE zero-shot through lm-evaluation-harness (optional extra: pip install 'linreg[eval]'). "
            "Columns: boolq, cb acc and F1, copa, multirc, record F1 and EM, rte (SuperGLUE's: lm-eval "
            "sglue_rte), wic, xstorycloze-en, mean.\nWrites superglue_results.json and superglue_results.md "
            "to --output-dir."),
        epilog=(
            "tasks: " + ", ".join(TASKS) + "\n"
            "local data (--data-dir): DIR/<task>.jsonl with the hub's columns, e.g. boolq: passage, question,\n"
            "  label; cb/rte: premise, hypothesis, label; copa: premise, choice1, choice2, question, label;\n"
            "  multirc: paragraph, question, answer, label; record: passage, query, entities, answers;\n"
            "  wic: sentence1, sentence2, start1, end1, label (+word, start2, end2); xstorycloze_en:\n"
            "  input_sentence_1..4, sentence_quiz1, sentence_quiz2, answer_right_ending.\n"
            "examples:\n"
            "  linreg superglue --model runs/baseline --model runs/cosine --model runs/mse -o out/sglue\n"
            "  linreg superglue --model runs/baseline --data-dir data/superglue_local --limit 200"),
    )
    g = p.add_argument_group("models")
    g.add_argument("--model", action="append", required=True, metavar="PATH_OR_NAME",
                   help="model folder, run folder (its hf/ export) or hub name; repeat for several models")
    g.add_argument("--label", action="append", default=None, metavar="NAME",
                   help="label of each --model, in the same order (default: folder name)")
    g.add_argument("--device", default="auto", help=f"device: {DEVICES_HELP}")
    g.add_argument("--dtype", default="auto", choices=DTYPES, help="model dtype (default: auto)")
    g.add_argument("--batch-size", default="8", help="lm-eval batch size, an integer or 'auto' (default: 8)")
    g.add_argument("--max-length", type=int, default=None, help="context length for lm-eval (default: the model's)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code from the hub")
    d = p.add_argument_group("tasks and data")
    d.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset (default: all)")
    d.add_argument("--data-dir", default=None, help="local task files instead of the hub (see below)")
    d.add_argument("--limit", type=float, default=None,
                   help="examples per task (an integer, or a fraction < 1); for quick checks only")
    d.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples (default: 0, the paper's setting)")
    d.add_argument("--bootstrap-iters", type=int, default=10000,
                   help="bootstrap resamples for standard errors of F1-type metrics (0: none; default: 10000)")
    d.add_argument("--seed", type=int, default=1234, help="seed for lm-eval's samplers (default: 1234)")
    d.add_argument("--keep-task-dir", default=None, help="write the generated task YAMLs here and keep them")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output-dir", default="eval_results/superglue", help="output folder (default: eval_results/superglue)")
    o.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    o.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        labels = model_labels(args.model, args.label)
        tasks = [t.strip().replace("-", "_") for t in args.tasks.split(",") if t.strip()]
        tasks = ["rte" if t == "sglue_rte" else t for t in tasks]
        bs: int | str = args.batch_size if args.batch_size.startswith("auto") else int(args.batch_size)
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        _require_lm_eval()
        entries = []
        for path, label in zip(args.model, labels):
            log.info("evaluating %s (%s)", label, path)
            r = run_superglue(path, tasks=tasks, data_dir=args.data_dir, batch_size=bs, device=args.device,
                              dtype=args.dtype, limit=limit, num_fewshot=args.num_fewshot,
                              bootstrap_iters=args.bootstrap_iters, max_length=args.max_length, seed=args.seed,
                              keep_task_dir=args.keep_task_dir, trust_remote_code=args.trust_remote_code)
            entries.append({"label": label, "model": str(path), **r})
        result = {
            "kind": "superglue",
            "version": 1,
            "columns": [c[0] for c in COLUMNS if c[1] in tasks] + [MEAN_KEY],
            "settings": {"tasks": tasks, "data": str(args.data_dir) if args.data_dir else "hub",
                         "num_fewshot": args.num_fewshot, "limit": limit, "batch_size": bs,
                         "dtype": args.dtype, "bootstrap_iters": args.bootstrap_iters, "seed": args.seed},
            "models": entries,
            "meta": {"created": now_iso(), **environment_info()},
        }
        out_dir = Path(args.output_dir)
        write_json(out_dir / "superglue_results.json", json.loads(json.dumps(result, default=str)))
        md = render_markdown(result)
        write_text(out_dir / "superglue_results.md", md)
        if not args.quiet:
            print(md)
            print(f"wrote {out_dir / 'superglue_results.json'}, {out_dir / 'superglue_results.md'}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
