"""Data preparation: sources -> documents -> (trained) tokenizer -> token ids -> packed ``.npy`` blocks.

``prepare_data`` is idempotent and safe to call from every rank after rank 0 ran it (the trainer does
rank 0, barrier, everyone). The output folder ``<cache_root>/shards/<fingerprint>/`` holds::

    train.npy       [N, seq_len] uint16 (vocab <= 65536) or uint32 token ids, read with mmap_mode="r"
    val.npy         [M, seq_len] same dtype
    manifest.json   fingerprint, everything it was computed from, shapes, dtype, statistics

The fingerprint covers the sources (paths with size and mtime, or content hashes; hub name, config,
split, revision), the tokenizer (hash of its serialized pipeline), ``seq_len``, ``seed``, the
validation split, the mix weights and ``FORMAT_VERSION``. A folder is built under a temporary name
and renamed into place when complete, so a crash never leaves a shard set that looks finished. A
folder whose manifest does not match what this call would produce is refused, never mixed.

Order of operations (see ``docs/data.md``): read every source into an Arrow file (``max_docs``,
stripping, skipping empty documents); hold out validation documents per source (seeded); train the
tokenizer on the training documents if needed; tokenize with ``datasets.Dataset.map(batched=True,
num_proc=...)``, appending EOS after every document; choose documents per source to reach the mix
weights; shuffle the document order (seeded); concatenate and cut into blocks of ``seq_len`` tokens
(the incomplete last block is dropped).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from linreg.data.config import DataConfig, TokenizerConfig, resolve_cache_dir
from linreg.data.sources import iter_documents, source_fingerprint
from linreg.data.synthetic import synthetic_stories
from linreg.errors import DataError, LinregError

__all__ = ["PreparedData", "prepare_data", "load_prepared", "main", "FORMAT_VERSION"]

log = logging.getLogger("linreg.data")

FORMAT_VERSION = 1  # bump whenever the same inputs would give different shards
SYNTHETIC_VERSION = 1  # bump when synthetic_stories changes its output
MANIFEST = "manifest.json"
TOKENIZE_CALLS = 0  # number of tokenization passes run in this process (tests check the reuse path)
_BATCH_DOCS = 4096


@dataclass
class PreparedData:
    """Packed token blocks ready for training (memory-mapped, read-only) and their tokenizer."""

    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    tokenizer_dir: Path
    train: np.ndarray  # [N, seq_len]
    val: np.ndarray  # [M, seq_len]
    fingerprint: str
    shard_dir: Path
    stats: dict
    manifest: dict = field(default_factory=dict, repr=False)

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])

    @property
    def eos_token_id(self) -> int:
        return int(self.manifest.get("eos_token_id", self.tokenizer.eos_token_id))

    @property
    def vocab_size(self) -> int:
        return int(self.manifest.get("vocab_size", len(self.tokenizer)))


# --------------------------------------------------------------------------------------------- helpers


def _hash_json(obj: Any, size: int = 10) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=size).hexdigest()


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    import datasets

    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _write_text_arrow(docs: Iterator[str], path: Path, progress: bool, desc: str) -> Any:
    """Stream documents into an Arrow file (one ``text`` column) and memory-map it as a Dataset."""
    import pyarrow as pa
    from datasets import Dataset
    from tqdm.auto import tqdm

    schema = pa.schema([("text", pa.large_string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: list[str] = []
        for doc in tqdm(docs, desc=desc, unit=" docs", disable=not progress, mininterval=1.0):
            batch.append(doc)
            if len(batch) >= _BATCH_DOCS:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.large_string())], schema=schema))
                batch = []
        if batch:
            writer.write_batch(pa.record_batch([pa.array(batch, pa.large_string())], schema=schema))
    return Dataset.from_file(str(path))


def _embedded_docs(n: int, seed: int) -> Iterator[str]:
    yield from synthetic_stories(n, seed)


def _val_counts(n_docs: list[int], data: DataConfig) -> list[int]:
    """Validation documents per source: ``val_docs`` split in proportion to source sizes (largest
    remainder), or ``round(val_fraction * n)`` (at least 1 when the fraction is > 0); a source always
    keeps at least one training document."""
    if data.val_docs is not None:
        total = sum(n_docs)
        want = data.val_docs
        if want and want > total - len(n_docs):
            raise DataError(
                f"data.val_docs={want} leaves no training documents: the sources hold {total} documents in all"
            )
        if want == 0 or total == 0:
            return [0] * len(n_docs)
        exact = [want * n / total for n in n_docs]
        counts = [int(e) for e in exact]
        for i in sorted(range(len(n_docs)), key=lambda i: exact[i] - counts[i], reverse=True)[: want - sum(counts)]:
            counts[i] += 1
        return [min(c, max(n - 1, 0)) for c, n in zip(counts, n_docs)]
    out = []
    for n in n_docs:
        c = int(round(data.val_fraction * n))
        if data.val_fraction > 0 and c == 0 and n >= 2:
            c = 1
        out.append(min(c, max(n - 1, 0)))
    return out


def _tokenize_batch(batch: dict, tokenizer: Any, eos_id: int) -> dict:
    backend = tokenizer.backend_tokenizer
    texts = batch["text"]
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    encs = encode(texts, add_special_tokens=False)
    return {"input_ids": [e.ids + [eos_id] for e in encs]}


def _tokenize(ds: Any, tokenizer: Any, eos_id: int, num_proc: int, cache_file: Path, desc: str) -> Any:
    global TOKENIZE_CALLS
    import datasets

    TOKENIZE_CALLS += 1
    list_type = getattr(datasets, "List", None) or datasets.Sequence
    features = datasets.Features({"input_ids": list_type(datasets.Value("int32"))})
    nproc = max(1, min(num_proc, len(ds) // 1000))  # a worker gets at least one batch of 1000 documents
    return ds.map(
        _tokenize_batch,
        batched=True,
        batch_size=1000,
        num_proc=nproc if nproc > 1 else None,
        remove_columns=["text"],
        fn_kwargs={"tokenizer": tokenizer, "eos_id": eos_id},
        features=features,
        load_from_cache_file=False,
        cache_file_name=str(cache_file),
        new_fingerprint=cache_file.stem,
        desc=desc,
    )


def _lengths(table: Any) -> np.ndarray:
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    return pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)


def _pack(table: Any, order: np.ndarray, lengths: np.ndarray, seq_len: int, dtype: np.dtype, path: Path,
          vocab_size: int) -> dict:
    """Write the documents ``order`` of ``table`` (``input_ids`` lists), concatenated, as [N, seq_len]."""
    total = int(lengths[order].sum()) if len(order) else 0
    n_blocks = total // seq_len
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n_blocks, seq_len))
    cap = n_blocks * seq_len
    flat = mm.reshape(-1)
    pos = 0
    for start in range(0, len(order), _BATCH_DOCS * 4):
        if pos >= cap:
            break
        chunk = table.take(order[start : start + _BATCH_DOCS * 4])
        col = chunk.column("input_ids").combine_chunks()
        vals = col.flatten().to_numpy(zero_copy_only=False)
        if len(vals) and (int(vals.max()) >= vocab_size or int(vals.min()) < 0):
            raise DataError(f"token id {int(vals.max())} outside the tokenizer's vocabulary of {vocab_size}")
        n = min(len(vals), cap - pos)
        flat[pos : pos + n] = vals[:n]
        pos += n
    mm.flush()
    del flat, mm
    return {"blocks": n_blocks, "tokens": cap, "dropped_tokens": total - cap, "docs": int(len(order))}


def _mix(lengths: list[np.ndarray], weights: list[float] | None, mix_tokens: int | None, seed: int,
         labels: list[str]) -> tuple[list[np.ndarray], list[dict]]:
    """Which documents (local indices, repeats allowed) each source contributes to the training stream.

    No weights: every training document once. Weights: the budget B is ``mix_tokens`` or the sum of
    the sources' token counts; source s gets ``w_s / sum(w) * B`` tokens: ``floor(target / T_s)`` full
    passes over its documents, then documents of a seeded permutation until the target is reached
    (the last one may cross it, so each share is exact up to one document).
    """
    totals = [int(l.sum()) for l in lengths]
    if weights is None:
        picks = [np.arange(len(l), dtype=np.int64) for l in lengths]
        infos = [{"target_tokens": t, "tokens": t, "repeats": 1.0} for t in totals]
    else:
        budget = int(mix_tokens) if mix_tokens is not None else sum(totals)
        wsum = float(sum(weights))
        picks, infos = [], []
        for s, (l, w, t) in enumerate(zip(lengths, weights, totals)):
            target = w / wsum * budget
            if t == 0:
                raise DataError(f"data source {labels[s]} has no training tokens but weight {w}")
            full = int(target // t)
            rest = target - full * t
            perm = np.random.default_rng([seed, 0x6D6978, s]).permutation(len(l))
            cum = np.cumsum(l[perm])
            m = int(np.searchsorted(cum, rest, side="left")) + 1 if rest > 0 else 0
            m = min(m, len(l))
            idx = np.concatenate([np.tile(np.arange(len(l), dtype=np.int64), full), perm[:m].astype(np.int64)])
            got = full * t + (int(cum[m - 1]) if m else 0)
            picks.append(idx)
            infos.append({"target_tokens": int(round(target)), "tokens": got, "repeats": round(got / t, 4)})
    grand = sum(i["tokens"] for i in infos) or 1
    for info, w in zip(infos, weights or [None] * len(infos)):
        info["share"] = round(info["tokens"] / grand, 6)
        if w is not None:
            info["weight_share"] = round(w / sum(weights), 6)
    return picks, infos


# ------------------------------------------------------------------------------------------ the build


class _Build:
    """Lazily read sources into Arrow files in a scratch folder (removed by ``close``)."""

    def __init__(self, data: DataConfig, seed: int, cache_root: Path, progress: bool):
        self.data, self.seed, self.progress = data, seed, progress
        self.cache_root = cache_root
        self._work: Path | None = None
        self._split: list[dict] | None = None

    @property
    def work(self) -> Path:
        if self._work is None:
            self.cache_root.mkdir(parents=True, exist_ok=True)
            self._work = Path(tempfile.mkdtemp(prefix=".work-", dir=self.cache_root))
        return self._work

    def close(self) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def sources(self) -> list[dict]:
        """Per source: label, weight, read stats, ``train`` and ``val`` Datasets (column ``text``)."""
        if self._split is not None:
            return self._split
        out = []
        if self.data.sources:
            entries = list(self.data.sources)
        else:
            entries = [None]
        read = []
        for i, src in enumerate(entries):
            stats: dict = {}
            if src is None:
                label = "embedded-synthetic-stories"
                docs = _embedded_docs(self.data.embedded_docs, self.seed)
            else:
                label = src.label
                docs = iter_documents(src, stats)
            ds = _write_text_arrow(docs, self.work / f"docs-{i}.arrow", self.progress, f"read {label}")
            if len(ds) == 0:
                raise DataError(f"data source {label} has no documents (after skipping {stats.get('skipped', 0)} empty ones)")
            read.append((label, src, ds, stats))
        n_val = _val_counts([len(r[2]) for r in read], self.data)
        for i, ((label, src, ds, stats), nv) in enumerate(zip(read, n_val)):
            n = len(ds)
            rng = np.random.default_rng([self.seed, 0x76616C, i])
            val_idx = np.sort(rng.choice(n, size=nv, replace=False)) if nv else np.zeros(0, dtype=np.int64)
            mask = np.ones(n, dtype=bool)
            mask[val_idx] = False
            train_idx = np.flatnonzero(mask)
            out.append({
                "label": label,
                "weight": None if src is None else src.weight,
                "docs_read": n,
                "docs_skipped": int(stats.get("skipped", 0)),
                "train": ds.select(train_idx) if nv else ds,
                "val": ds.select(val_idx),
            })
        self._split = out
        return out

    def tokenizer_texts(self, limit: int | None) -> tuple[Iterator[list[str]], int]:
        """Training documents for the tokenizer: at most ``limit``, spread over sources by size."""
        srcs = self.sources()
        sizes = [len(s["train"]) for s in srcs]
        total = sum(sizes)
        takes = sizes if limit is None or limit >= total else [max(1, -(-limit * n // total)) for n in sizes]
        takes = [min(t, n) for t, n in zip(takes, sizes)]

        def gen() -> Iterator[list[str]]:
            for s, k in zip(srcs, takes):
                for batch in s["train"].select(range(k)).iter(batch_size=1000):
                    yield batch["text"]

        return gen(), sum(takes)


def _fingerprint_inputs(data: DataConfig, seq_len: int, seed: int) -> dict:
    if data.sources:
        sources = [source_fingerprint(s, data.source_hash) for s in data.sources]
    else:
        sources = [{"embedded": data.embedded_docs, "generator": SYNTHETIC_VERSION}]
    return {
        "format": FORMAT_VERSION,
        "sources": sources,
        "seq_len": int(seq_len),
        "seed": int(seed),
        "val_fraction": float(data.val_fraction),
        "val_docs": data.val_docs,
        "shuffle_docs": bool(data.shuffle_docs),
        "mix_tokens": data.mix_tokens,
    }


def _normalize(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _open_shards(shard_dir: Path, fingerprint: str | None = None, inputs: dict | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    mpath = shard_dir / MANIFEST
    if not mpath.is_file():
        raise DataError(
            f"shard folder {shard_dir} exists but has no {MANIFEST}: it was not written by a finished "
            f"`linreg prepare-data`; delete it and prepare again"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{mpath}: unreadable manifest ({exc}); delete {shard_dir} and prepare again") from None
    if fingerprint is not None and (manifest.get("fingerprint") != fingerprint or manifest.get("inputs") != _normalize(inputs)):
        raise DataError(
            f"refusing to use {shard_dir}: its manifest was made from different inputs (fingerprint "
            f"{manifest.get('fingerprint')!r}, expected {fingerprint!r}). Delete the folder or use another cache_dir."
        )
    arrays = []
    for split in ("train", "val"):
        info = manifest[split]
        path = shard_dir / info["file"]
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read shard ({exc}); delete {shard_dir} and prepare again") from None
        if list(arr.shape) != info["shape"] or str(arr.dtype) != manifest["dtype"]:
            raise DataError(
                f"{path}: shape {list(arr.shape)} / dtype {arr.dtype} differ from the manifest "
                f"({info['shape']} / {manifest['dtype']}); delete {shard_dir} and prepare again"
            )
        arrays.append(arr)
    return manifest, arrays[0], arrays[1]


def load_prepared(shard_dir: str | os.PathLike) -> PreparedData:
    """Open an existing shard folder (e.g. for evaluation) with the tokenizer its manifest names."""
    from linreg.data.tokenizer import load_tokenizer

    shard_dir = Path(shard_dir)
    manifest, train, val = _open_shards(shard_dir)
    tok_dir = Path(manifest["tokenizer_dir"])
    tok = load_tokenizer(tok_dir)
    return PreparedData(tok, tok_dir, train, val, manifest["fingerprint"], shard_dir,
                        {**manifest["stats"], "reused": True}, manifest)


def prepare_data(
    data: DataConfig,
    tokenizer: TokenizerConfig,
    seq_len: int,
    cache_root: Path | str | None,
    seed: int,
    num_proc: int = 1,
    progress: bool = True,
) -> PreparedData:
    """Prepare (or reuse) the packed token blocks of ``data`` for ``seq_len`` and ``seed``.

    ``cache_root`` None: :func:`linreg.data.config.resolve_cache_dir` (``data.cache_dir`` or the
    default). Returns memory-mapped ``train`` [N, seq_len] and ``val`` [M, seq_len] arrays.
    """
    from linreg.data.tokenizer import resolve_tokenizer

    t0 = time.perf_counter()
    data.validate("data")
    tokenizer.validate("tokenizer")
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    if num_proc < 1:
        raise DataError(f"num_proc must be >= 1, got {num_proc}")
    cache_root = Path(cache_root).expanduser() if cache_root is not None else resolve_cache_dir(data)
    inputs = _fingerprint_inputs(data, seq_len, seed)
    build = _Build(data, seed, cache_root, progress)
    try:
        with _progress_bars(progress):
            train_key = {k: inputs[k] for k in ("format", "sources", "seed", "val_fraction", "val_docs")}
            tok, tok_dir, tok_hash = resolve_tokenizer(
                tokenizer, cache_root, train_key, lambda: build.tokenizer_texts(tokenizer.train_docs), progress
            )
            inputs["tokenizer"] = tok_hash
            fingerprint = _hash_json(inputs)
            shard_dir = cache_root / "shards" / fingerprint
            if shard_dir.exists():
                manifest, train, val = _open_shards(shard_dir, fingerprint, inputs)
                stats = {**manifest["stats"], "reused": True, "seconds": round(time.perf_counter() - t0, 3)}
                log.info("reusing prepared data %s", shard_dir)
                return PreparedData(tok, tok_dir, train, val, fingerprint, shard_dir, stats, manifest)
            manifest = _build_shards(build, tok, tok_dir, tok_hash, inputs, fingerprint, shard_dir, seq_len, seed,
                                     num_proc)
    finally:
        build.close()
    manifest, train, val = _open_shards(shard_dir, fingerprint, inputs)
    stats = {**manifest["stats"], "reused": False, "seconds": round(time.perf_counter() - t0, 3)}
    return PreparedData(tok, tok_dir, train, val, fingerprint, shard_dir, stats, manifest)


def _build_shards(build: _Build, tok: Any, tok_dir: Path, tok_hash: str, inputs: dict, fingerprint: str,
                  shard_dir: Path, seq_len: int, seed: int, num_proc: int) -> dict:
    import pyarrow as pa

    t0 = time.perf_counter()
    data = build.data
    srcs = build.sources()
    eos = tok.eos_token_id
    vocab = len(tok)
    dtype = _token_dtype(vocab)
    work = build.work
    tables = {"train": [], "val": []}
    for i, s in enumerate(srcs):
        for split in ("train", "val"):
            ds = s[split]
            if len(ds) == 0:
                tables[split].append(None)
                continue
            out = _tokenize(ds, tok, eos, num_proc, work / f"tok-{i}-{split}.arrow", f"tokenize {s['label']} ({split})")
            tables[split].append(out.data.table)
    t_tok = time.perf_counter() - t0

    empty = pa.table({"input_ids": pa.array([], pa.list_(pa.int32()))})
    train_tables = [t if t is not None else empty for t in tables["train"]]
    lengths = [_lengths(t) for t in train_tables]
    weights = [s["weight"] for s in srcs]
    weights = None if any(w is None for w in weights) else weights
    picks, mix = _mix(lengths, weights, data.mix_tokens, seed, [s["label"] for s in srcs])
    offsets = np.cumsum([0] + [t.num_rows for t in train_tables])
    order = np.concatenate([p + off for p, off in zip(picks, offsets[:-1])]) if picks else np.zeros(0, np.int64)
    if data.shuffle_docs:
        order = order[np.random.default_rng([seed, 0x6F7264]).permutation(len(order))]
    all_train = pa.concat_tables([t.select(["input_ids"]) for t in train_tables])
    all_len = np.concatenate(lengths)

    val_tables = [t for t in tables["val"] if t is not None]
    all_val = pa.concat_tables([t.select(["input_ids"]) for t in val_tables]) if val_tables else empty
    val_len = _lengths(all_val)

    total_train = int(all_len[order].sum()) if len(order) else 0
    if total_train < seq_len:
        raise DataError(
            f"only {total_train} training tokens, fewer than one block of seq_len={seq_len}; add data or lower seq_len"
        )
    wants_val = (data.val_docs or 0) > 0 or (data.val_docs is None and data.val_fraction > 0)
    if wants_val and int(val_len.sum()) < seq_len:
        raise DataError(
            f"the validation split holds {int(val_len.sum())} tokens, fewer than one block of seq_len={seq_len}; "
            f"raise data.val_fraction / data.val_docs, or set val_fraction: 0 (and val_docs: null) to train "
            f"without validation"
        )

    shard_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = shard_dir.parent / f".tmp-{fingerprint}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tr = _pack(all_train, order, all_len, seq_len, dtype, tmp / "train.npy", vocab)
        va = _pack(all_val, np.arange(all_val.num_rows), val_len, seq_len, dtype, tmp / "val.npy", vocab)
        per_source = []
        for s, info, ln, vt in zip(srcs, mix, lengths, tables["val"]):
            per_source.append({
                "name": s["label"],
                "docs_read": s["docs_read"],
                "docs_skipped": s["docs_skipped"],
                "train_docs": len(s["train"]),
                "val_docs": len(s["val"]),
                "train_tokens_available": int(ln.sum()),
                "val_tokens": int(_lengths(vt).sum()) if vt is not None else 0,
                **info,
            })
        stats = {
            "sources": per_source,
            "train_blocks": tr["blocks"],
            "val_blocks": va["blocks"],
            "train_tokens": tr["tokens"],
            "val_tokens": va["tokens"],
            "train_dropped_tokens": tr["dropped_tokens"],
            "val_dropped_tokens": va["dropped_tokens"],
            "train_docs_packed": tr["docs"],
            "vocab_size": vocab,
            "dtype": dtype.name,
            "num_proc": num_proc,
            "tokenize_seconds": round(t_tok, 3),
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        manifest = {
            "fingerprint": fingerprint,
            "inputs": _normalize(inputs),
            "seq_len": seq_len,
            "dtype": dtype.name,
            "vocab_size": vocab,
            "eos_token_id": int(eos),
            "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.pad_token_id,
            "tokenizer_dir": str(Path(tok_dir).resolve()),
            "tokenizer_hash": tok_hash,
            "train": {"file": "train.npy", "shape": [tr["blocks"], seq_len]},
            "val": {"file": "val.npy", "shape": [va["blocks"], seq_len]},
            "stats": stats,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        try:
            os.rename(tmp, shard_dir)
        except OSError:
            if not (shard_dir / MANIFEST).is_file():
                raise
            log.info("another process finished %s first; using its shards", shard_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


# ------------------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linreg prepare-data",
        description=(
            "Tokenize and pack a recipe's corpus (data: and tokenizer: sections) into memory-mapped blocks of "
            "train.seq_len tokens under <cache_dir>/shards/<fingerprint>/. Running it again with unchanged "
            "inputs reuses the shards; the trainer calls the same code, so running this first only moves the "
            "work out of the training job."
        ),
    )
    p.add_argument("--recipe", required=True, help="recipe YAML file (its data:, tokenizer: and train: sections are used)")
    p.add_argument("--num-proc", type=int, default=None,
                   help="tokenization worker processes (default: the recipe's data.num_proc)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, VALUE parsed as YAML (repeatable), e.g. --set data.val_fraction=0.02")
    p.add_argument("--cache-dir", default=None,
                   help="cache root for tokenizers and shards (default: data.cache_dir, else $LINREG_DATA_CACHE, "
                        "else ~/.cache/linreg/data)")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.add_argument("--json", action="store_true", help="print the manifest statistics as JSON instead of a summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from linreg.config import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        num_proc = args.num_proc if args.num_proc is not None else recipe.data.num_proc
        cache = Path(args.cache_dir) if args.cache_dir else resolve_cache_dir(recipe.data)
        prepared = prepare_data(recipe.data, recipe.tokenizer, recipe.train.seq_len, cache, recipe.train.seed,
                                num_proc=num_proc, progress=not args.no_progress)
    except LinregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s = prepared.stats
    if args.json:
        print(json.dumps({"fingerprint": prepared.fingerprint, "shard_dir": str(prepared.shard_dir),
                          "tokenizer_dir": str(prepared.tokenizer_dir), **s}, indent=2))
        return 0
    print(f"{'reused' if s['reused'] else 'prepared'} {prepared.shard_dir}")
    print(f"  tokenizer     {prepared.tokenizer_dir} (vocab {s['vocab_size']}, {s['dtype']})")
    print(f"  train         {s['train_blocks']} blocks x {prepared.seq_len} tokens = {s['train_tokens']:,} tokens")
    print(f"  val           {s['val_blocks']} blocks x {prepared.seq_len} tokens = {s['val_tokens']:,} tokens")
    for src in s["sources"]:
        share = f"{100 * src['share']:.1f}%"
        if "weight_share" in src:
            share += f" (weight {100 * src['weight_share']:.1f}%)"
        print(f"  source        {src['name']}: {src['train_docs']} train / {src['val_docs']} val docs, "
              f"{src['tokens']:,} train tokens used = {share}, repeats {src['repeats']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
