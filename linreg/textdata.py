"""Text in, packed token blocks out: the data side of ``linreg analyze`` and ``linreg prune``.

``--data`` names a local file, glob or folder (``.txt`` split into paragraphs, ``.jsonl``/``.json``/
``.parquet`` with a text field; read lazily by ``linreg.data.sources``) or a Hugging Face hub data set
(``hf:NAME`` or ``owner/name`` when no such local path exists; read with ``streaming=True``, so only what is
needed is downloaded). Documents are tokenized with the model's own tokenizer (its usual special tokens, e.g.
Llama's BOS; EOS appended when the tokenizer has one and did not add it), concatenated and cut into blocks of
``seq_len`` tokens. Reading stops as soon as enough blocks exist; the incomplete last block is dropped.
Only token ids are kept (4 bytes a token), never hidden states.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from linreg.errors import DataError

__all__ = ["source_for", "iter_texts", "token_blocks", "split_blocks"]

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def source_for(data: str, *, split: str = "train", text_field: str = "text", hf_config: str | None = None,
               txt_split: str = "paragraph"):
    """A ``linreg.data.SourceConfig`` for ``--data``: a local path, or a hub data set."""
    from linreg.data.config import SourceConfig

    text = str(data)
    if text.startswith("hf:"):
        return SourceConfig(hf=text[3:], split=split, text_field=text_field, hf_config=hf_config, streaming=True)
    p = Path(text).expanduser()
    if p.exists() or any(ch in text for ch in "*?["):
        return SourceConfig(path=str(p), text_field=text_field, txt_split=txt_split)
    if p.suffix.lower() in {".txt", ".jsonl", ".json", ".parquet", ".gz", ".md", ".text", ".ndjson"} or text.startswith(
            (".", "/", "~")):
        raise DataError(f"--data {text}: file not found (resolved to {p.absolute()})")
    if _HUB_NAME.match(text):
        return SourceConfig(hf=text, split=split, text_field=text_field, hf_config=hf_config, streaming=True)
    raise DataError(f"--data {text}: neither an existing file/folder nor a hub data set name (owner/name or hf:NAME)")


def iter_texts(data: str, **kwargs: Any) -> Iterator[str]:
    from linreg.data.sources import iter_documents

    src = source_for(data, **kwargs)
    src.validate("--data")
    yield from iter_documents(src)


def token_blocks(data: str, tokenizer: Any, seq_len: int, n_tokens: int, *, progress: bool = False,
                 desc: str = "tokenize", **source_kwargs: Any) -> np.ndarray:
    """Up to ``ceil(n_tokens / seq_len)`` packed blocks ``[N, seq_len]`` (int64) of ``data``.

    Fewer blocks come back when the data runs out (the caller decides whether that is enough)."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    if n_tokens <= 0:
        raise DataError(f"the token budget must be positive, got {n_tokens}")
    want = -(-int(n_tokens) // int(seq_len))
    eos = getattr(tokenizer, "eos_token_id", None)
    out = np.empty((want, seq_len), dtype=np.int64)
    filled = 0
    buf: list[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=want * seq_len, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True, leave=False)
    docs = iter_texts(data, **source_kwargs)
    batch: list[str] = []

    def flush(texts: list[str]) -> None:
        nonlocal filled
        enc = tokenizer(texts, add_special_tokens=True)["input_ids"]
        for ids in enc:
            ids = list(ids)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            buf.extend(ids)
        while len(buf) >= seq_len and filled < want:
            out[filled] = buf[:seq_len]
            del buf[:seq_len]
            filled += 1
            if bar is not None:
                bar.update(seq_len)

    try:
        for doc in docs:
            batch.append(doc)
            if len(batch) >= 64:
                flush(batch)
                batch = []
                if filled >= want:
                    break
        if batch and filled < want:
            flush(batch)
    finally:
        if bar is not None:
            bar.close()
    return out[:filled]


def split_blocks(blocks: np.ndarray, first_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``ceil(first_tokens / seq_len)`` blocks, and the rest."""
    k = -(-int(first_tokens) // int(seq_len))
    return blocks[:k], blocks[k:]
