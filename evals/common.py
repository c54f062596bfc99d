"""Helpers shared by the evaluation commands.

- loading a causal LM and its tokenizer from a folder, one of our run folders (``RUN/hf``) or a hub
  name, with a dtype and a device;
- reading JSONL, writing JSON / JSONL / Markdown atomically;
- Markdown tables and number formatting;
- the CLI error convention of the repo (``error: ...`` on stderr, exit status 2).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from linreg.errors import ConfigError, DataError, LinregError
from linreg.finetune.table import clean_floats  # NaN/inf -> None (one copy, shared with the fine-tune table)

log = logging.getLogger("evals")

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES_HELP = "'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'"


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map what the user typed to what ``from_pretrained`` accepts.

    A run folder of ours (``output_dir`` with an ``hf/`` export) resolves to its ``hf/`` folder, a
    folder with ``config.json`` to itself, anything else that does not exist locally is taken as a
    hub name (``org/name``). A path that looks local (starts with ``/``, ``.`` or ``~``) but does not
    exist is an error.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        if (path / "hf" / "config.json").is_file():
            return str(path / "hf")
        raise DataError(
            f"model folder {text!r} has no config.json (nor hf/config.json of a run folder); "
            "pass a Hugging Face model folder, a run folder with an hf/ export, or a hub name"
        )
    if text.startswith(("/", ".", "~")) or path.suffix in {".json", ".bin", ".safetensors"}:
        raise DataError(f"model path {text!r} does not exist")
    return text


def model_label(name_or_path: str | os.PathLike) -> str:
    """A short label for tables: the run folder's name for ``RUN/hf``, the last path part else."""
    path = Path(str(name_or_path).rstrip("/"))
    if path.name == "hf" and path.parent.name:
        return path.parent.name
    return path.name or str(name_or_path)


def model_labels(models: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """Check the ``--model``/``--label`` pairs of an evaluation CLI before anything is loaded.

    Returns one unique label per model (``model_label`` where none is given); every model must
    resolve (``resolve_model_path``), so a typo fails before any data or weights are read.
    """
    labels = list(labels or [])
    if labels and len(labels) != len(models):
        raise ConfigError(f"{len(labels)} --label for {len(models)} --model; give one label per model or none")
    labels = labels or [model_label(m) for m in models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"model labels must be unique, got {labels}; set them with --label")
    for m in models:
        resolve_model_path(m)
    return labels


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    return device


def resolve_dtype(dtype: str | None, device: str = "cpu"):
    """torch dtype for a name in :data:`DTYPES`; 'auto' is bfloat16 on CUDA with bf16 support, else float32."""
    import torch

    if dtype in (None, "", "auto"):
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ConfigError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return table[dtype]


def ensure_pad_token(tokenizer) -> None:
    """Decoder-only tokenizers often lack a pad token: reuse EOS (or BOS, or UNK)."""
    if tokenizer.pad_token_id is None:
        for name in ("eos_token", "bos_token", "unk_token"):
            tok = getattr(tokenizer, name, None)
            if tok is not None:
                tokenizer.pad_token = tok
                return
        raise DataError("tokenizer has neither a pad token nor an EOS/BOS/UNK token to pad with")


def load_tokenizer(name_or_path: str, *, padding_side: str = "right", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load a tokenizer from {name_or_path!r}: {exc}") from exc
    ensure_pad_token(tok)
    tok.padding_side = padding_side
    return tok


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    dtype: str | None = "auto",
    device: str = "auto",
    padding_side: str = "right",
    trust_remote_code: bool = False,
):
    """Load a causal LM (eval mode) and its tokenizer (with a pad token) from a path or hub name.

    Returns ``(model, tokenizer)``; the model sits on ``device`` in ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tok = load_tokenizer(path, padding_side=padding_side, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load a causal LM from {name_or_path!r}: {exc}") from exc
    model.to(dev)
    model.eval()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def num_layers(model) -> int:
    cfg = model.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise DataError(f"cannot tell the number of layers of {type(model).__name__}")


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file (blank lines skipped); errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {p}")
    out = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            out.append(obj)
    return out


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    p = Path(path)
    _atomic_write(p, json.dumps(clean_floats(obj), indent=2, default=_json_default, allow_nan=False) + "\n")
    return p


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    p = Path(path)
    lines = [json.dumps(clean_floats(r), default=_json_default, ensure_ascii=False) for r in records]
    _atomic_write(p, "".join(line + "\n" for line in lines))
    return p


def write_text(path: str | os.PathLike, text: str) -> Path:
    p = Path(path)
    _atomic_write(p, text if text.endswith("\n") else text + "\n")
    return p


def load_result(path: str | os.PathLike) -> dict:
    """Read a results JSON written by one of the eval commands (checks it has ``kind`` and ``models``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"results file not found: {p}")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(obj, dict) or "kind" not in obj or not isinstance(obj.get("models"), list):
        raise DataError(f"{p}: not a linreg evaluation result (needs 'kind' and a 'models' list)")
    return obj


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 3, stderr: float | None = None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    s = f"{x:.{digits}f}"
    if stderr is not None and isinstance(stderr, (int, float)) and math.isfinite(stderr):
        s += f" ± {stderr:.{digits}f}"
    return s


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """GitHub Markdown table. ``align``: one char per column, 'l' or 'r' (default: first l, rest r)."""
    if align is None:
        align = "l" + "r" * (len(headers) - 1)
    cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|")
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, table has {len(headers)} columns")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def mean_sem(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """Mean, standard error of the mean (sample std, ddof=1, over sqrt(n)), and n."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return None, None, 0
    mean = sum(vals) / n
    if n == 1:
        return mean, None, 1
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return mean, math.sqrt(var / n), n


# --------------------------------------------------------------------------------------------
# CLI conventions
# --------------------------------------------------------------------------------------------
def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("evals").setLevel(level)
    for noisy in ("httpx", "httpx2", "httpcore", "openai", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)


def run_cli(fn: Callable[[], int]) -> int:
    """Run a CLI body; LinregError -> ``error: ...`` on stderr and 2; Ctrl-C -> 130."""
    try:
        return int(fn() or 0)
    except LinregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def environment_info() -> dict:
    """Versions of the main libraries, for the ``meta`` part of result files."""
    import importlib.metadata as md

    info = {"python": sys.version.split()[0]}
    for pkg in ("linreg", "torch", "transformers", "lm_eval", "openai", "scikit-learn"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return info


__all__ = [
    "ConfigError",
    "DataError",
    "LinregError",
    "clean_floats",
    "environment_info",
    "ensure_pad_token",
    "fmt",
    "load_model_and_tokenizer",
    "load_result",
    "load_tokenizer",
    "markdown_table",
    "mean_sem",
    "model_label",
    "now_iso",
    "num_layers",
    "read_jsonl",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
    "run_cli",
    "setup_logging",
    "write_json",
    "write_jsonl",
    "write_text",
]
