"""Reading one configured source into a stream of documents (plain ``str``).

Local files are read lazily, file by file and line by line where the format allows it (``.txt``,
``.jsonl``, Parquet row groups), so ``max_docs`` stops early and large corpora are never held in memory
here. Hub data sets go through ``datasets.load_dataset`` (``streaming: true`` avoids the full download).

Every document is stripped of surrounding whitespace; empty documents and null values are skipped and
counted. Errors name the file (and line for JSON Lines), the field, and what was found instead.
"""

from __future__ import annotations

import glob as _glob
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from linreg.data.config import SourceConfig
from linreg.errors import DataError

__all__ = [
    "SUFFIXES",
    "resolve_files",
    "iter_file",
    "iter_documents",
    "source_fingerprint",
]

# suffix -> format; ".gz" variants are decompressed on the fly
SUFFIXES = {
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
}


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suf, fmt in SUFFIXES.items():
        if name.endswith(suf):
            return fmt
    return None


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def resolve_files(pattern: str | os.PathLike) -> list[Path]:
    """The files of a source ``path``: one file, a glob (``**`` allowed), or a folder (searched
    recursively for supported suffixes). Sorted, so the reading order does not depend on the file system."""
    text = os.path.expanduser(str(pattern))
    if _is_glob(text):
        files = sorted(Path(p) for p in _glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data source {pattern}: the glob matches no file (looked from {Path.cwd()})")
    else:
        p = Path(text)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and _format_of(f) and not f.name.startswith("."))
            if not files:
                raise DataError(
                    f"data source {p}: folder holds no file with a supported suffix ({', '.join(SUFFIXES)}, "
                    f"optionally .gz)"
                )
        elif p.is_file():
            files = [p]
        else:
            raise DataError(f"data source not found: {p} (resolved to {p.absolute()})")
    bad = [f for f in files if _format_of(f) is None]
    if bad:
        raise DataError(
            f"data source {pattern}: unsupported file type {bad[0]} (use {', '.join(SUFFIXES)}, optionally .gz)"
        )
    return files


def _open_text(path: Path) -> TextIO:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline=None)
    return open(path, encoding="utf-8", newline=None)


def _get_text(record: Any, field: str, where: str) -> str | None:
    if not isinstance(record, dict):
        if isinstance(record, str):
            return record
        raise DataError(f"{where}: expected a JSON object with the text field {field!r}, got {type(record).__name__}")
    if field not in record:
        keys = ", ".join(map(str, record)) or "(none)"
        raise DataError(f"{where}: no field {field!r} in the record; available fields: {keys} (set text_field)")
    value = record[field]
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{where}: field {field!r} holds {type(value).__name__}, expected a string")


def _iter_txt(path: Path, mode: str) -> Iterator[str]:
    with _open_text(path) as fh:
        if mode == "file":
            yield fh.read()
            return
        if mode == "line":
            yield from fh
            return
        para: list[str] = []
        for line in fh:
            if line.strip():
                para.append(line)
            elif para:
                yield "".join(para)
                para = []
        if para:
            yield "".join(para)


def _iter_jsonl(path: Path, field: str, first_line: int = 1, lines: Iterator[str] | None = None) -> Iterator[str | None]:
    fh = None
    if lines is None:
        fh = _open_text(path)
        lines = iter(fh)
    try:
        for lineno, line in enumerate(lines, start=first_line):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            yield _get_text(record, field, f"{path}:{lineno}")
    finally:
        if fh is not None:
            fh.close()


def _iter_json(path: Path, field: str) -> Iterator[str | None]:
    """A JSON array of records (or strings), an object holding such an array, or JSON Lines named .json."""
    with _open_text(path) as fh:
        text = fh.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: JSON Lines
            yield from _iter_jsonl(path, field, lines=iter(text.splitlines()))
            return
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(obj, dict):
        lists = {k: v for k, v in obj.items() if isinstance(v, list)}
        if "data" in lists:
            obj = lists["data"]
        elif len(lists) == 1:
            obj = next(iter(lists.values()))
        elif field in obj:
            obj = [obj]
        else:
            raise DataError(
                f"{path}: a JSON object without a record list; expected an array of records, an object with one "
                f"array (e.g. 'data'), or JSON Lines. Top-level keys: {', '.join(obj) or '(none)'}"
            )
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(obj).__name__}")
    for i, record in enumerate(obj):
        yield _get_text(record, field, f"{path}: record {i}")


def _iter_parquet(path: Path, field: str) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{path}: no column {field!r}; available columns: {', '.join(names)} (set text_field)")
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: column {field!r} holds {type(value).__name__}, expected strings")
            yield value


def iter_file(path: Path, text_field: str = "text", txt_split: str = "paragraph") -> Iterator[str | None]:
    """Raw documents of one local file (``None`` for null values), before stripping and filtering."""
    fmt = _format_of(path)
    try:
        if fmt == "txt":
            yield from _iter_txt(path, txt_split)
        elif fmt == "jsonl":
            yield from _iter_jsonl(path, text_field)
        elif fmt == "json":
            yield from _iter_json(path, text_field)
        elif fmt == "parquet":
            yield from _iter_parquet(path, text_field)
        else:
            raise DataError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)}, optionally .gz)")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except (OSError, EOFError) as exc:  # unreadable file, truncated .gz
        raise DataError(f"{path}: cannot read ({exc})") from None


def _iter_hub(src: SourceConfig) -> Iterator[str | None]:
    import datasets

    try:
        ds = datasets.load_dataset(
            src.hf, src.hf_config, split=src.split, streaming=src.streaming, revision=src.revision
        )
    except Exception as exc:  # hub, network, missing config or split: all surface as DataError
        raise DataError(
            f"could not load hub data set {src.label} (hf={src.hf!r}, hf_config={src.hf_config!r}, "
            f"split={src.split!r}): {type(exc).__name__}: {exc}"
        ) from exc
    cols = ds.column_names
    if cols is not None and src.text_field not in cols:
        raise DataError(
            f"hub data set {src.label}: no column {src.text_field!r}; available columns: {', '.join(cols)} "
            f"(set text_field)"
        )
    if cols is not None and len(cols) > 1:
        ds = ds.select_columns([src.text_field])
    for batch in ds.iter(batch_size=1000):
        if src.text_field not in batch:
            raise DataError(
                f"hub data set {src.label}: no column {src.text_field!r}; available columns: "
                f"{', '.join(batch)} (set text_field)"
            )
        yield from batch[src.text_field]


def iter_documents(src: SourceConfig, stats: dict | None = None) -> Iterator[str]:
    """Documents of one source in reading order: stripped, empty/null ones skipped, at most ``max_docs``.

    ``stats`` (optional) is updated in place with ``docs`` and ``skipped`` counts.
    """
    stats = stats if stats is not None else {}
    stats.setdefault("docs", 0)
    stats.setdefault("skipped", 0)
    if src.hf is not None:
        raw: Iterator[str | None] = _iter_hub(src)
    else:
        files = resolve_files(src.path)
        raw = (doc for f in files for doc in iter_file(f, src.text_field, src.txt_split))
    limit = src.max_docs
    for doc in raw:
        if doc is None or not doc.strip():
            stats["skipped"] += 1
            continue
        yield doc.strip()
        stats["docs"] += 1
        if limit is not None and stats["docs"] >= limit:
            break


def _hash_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def source_fingerprint(src: SourceConfig, mode: str = "stat") -> dict:
    """What identifies a source's content, for the shard fingerprint.

    Local files: their absolute paths with size and modification time (``mode="stat"``, cheap), or
    their content hashes (``mode="content"``: survives copies to another disk). Hub data sets: name,
    configuration, split and revision (pin ``revision`` for reproducibility; a moving branch is not
    detected). Reading options (text field, max_docs, txt_split) are included either way.
    """
    out: dict[str, Any] = {
        "text_field": src.text_field,
        "max_docs": src.max_docs,
        "weight": src.weight,
        "name": src.label,
    }
    if src.hf is not None:
        out.update(hf=src.hf, hf_config=src.hf_config, split=src.split, revision=src.revision, streaming=src.streaming)
        return out
    files = resolve_files(src.path)
    out["txt_split"] = src.txt_split
    if mode == "content":
        out["files"] = [[f.name, f.stat().st_size, _hash_file(f)] for f in files]
    else:
        entries = []
        for f in files:
            st = f.stat()
            entries.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        out["files"] = entries
    return out
