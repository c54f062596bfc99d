"""Data preparation for linreg recipes: sources -> tokenizer -> packed, memory-mapped token blocks.

Public API (see ``docs/data.md``)::

    DataConfig, SourceConfig, TokenizerConfig        # recipe sections data: / tokenizer:
    prepare_data(data, tokenizer, seq_len, cache_root, seed, num_proc=1, progress=True) -> PreparedData
    synthetic_stories(n_docs, seed) -> list[str]
    global_batch_indices(n_blocks, global_batch, step, seed) -> np.ndarray
    rank_slice(indices, rank, world_size) -> np.ndarray
    BlockSampler

Heavy modules (datasets, transformers) are imported lazily, so importing the config classes is cheap.
"""

from __future__ import annotations

from typing import Any

from linreg.data.config import DataConfig, SourceConfig, TokenizerConfig, default_cache_dir, resolve_cache_dir
from linreg.data.synthetic import synthetic_stories

_LAZY = {
    "prepare_data": "linreg.data.prepare",
    "PreparedData": "linreg.data.prepare",
    "load_prepared": "linreg.data.prepare",
    "load_tokenizer": "linreg.data.tokenizer",
    "iter_documents": "linreg.data.sources",
    "global_batch_indices": "linreg.data.loader",
    "rank_slice": "linreg.data.loader",
    "micro_batches": "linreg.data.loader",
    "read_batch": "linreg.data.loader",
    "BlockSampler": "linreg.data.loader",
}

__all__ = [
    "DataConfig",
    "SourceConfig",
    "TokenizerConfig",
    "default_cache_dir",
    "resolve_cache_dir",
    "synthetic_stories",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'linreg.data' has no attribute {name!r}")
