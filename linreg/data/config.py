"""Recipe sections ``data:`` and ``tokenizer:``.

Plain dataclasses with type hints and defaults; :func:`linreg.config.from_dict` builds them from YAML,
refuses unknown keys and wrong types, then calls ``validate(path)`` for the cross-field rules below.
See ``docs/data.md`` for the meaning of every field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from linreg.errors import ConfigError

__all__ = ["SourceConfig", "DataConfig", "TokenizerConfig", "default_cache_dir", "resolve_cache_dir"]


@dataclass
class SourceConfig:
    """One corpus: a local file / glob / folder (``path``) or a Hugging Face hub data set (``hf``)."""

    path: str | None = None  # .txt, .jsonl, .json, .parquet (optionally .gz for txt/jsonl/json), glob or folder
    hf: str | None = None  # hub data set name, e.g. roneneldan/TinyStories
    hf_config: str | None = None  # hub configuration (second argument of datasets.load_dataset)
    revision: str | None = None  # hub revision (branch, tag or commit) for reproducibility
    split: str = "train"  # hub split
    text_field: str = "text"  # column / JSON key holding the document text
    streaming: bool = False  # hub: read with streaming=True (no full download; needs max_docs for big sets)
    max_docs: int | None = None  # keep the first max_docs documents of this source (in reading order)
    weight: float | None = None  # share of training tokens from this source (see docs/data.md, "Mixing")
    name: str | None = None  # label in logs and stats; default: derived from path / hf
    txt_split: Literal["paragraph", "line", "file"] = "paragraph"  # .txt: what is one document

    def validate(self, path: str = "data.sources[?]") -> None:
        if (self.path is None) == (self.hf is None):
            raise ConfigError(f"{path}: give exactly one of 'path' (local files) or 'hf' (hub data set)")
        if self.max_docs is not None and self.max_docs <= 0:
            raise ConfigError(f"{path}.max_docs: must be positive, got {self.max_docs}")
        if self.weight is not None and not self.weight > 0:
            raise ConfigError(f"{path}.weight: must be positive, got {self.weight}")
        if not self.text_field:
            raise ConfigError(f"{path}.text_field: must not be empty")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.hf is not None:
            return self.hf + (f"/{self.hf_config}" if self.hf_config else "") + f":{self.split}"
        return str(self.path)


@dataclass
class DataConfig:
    """The training corpus. No sources: the embedded synthetic stories (offline smoke tests)."""

    sources: list[SourceConfig] = field(default_factory=list)
    embedded_docs: int = 20000  # number of synthetic stories when ``sources`` is empty
    val_fraction: float = 0.01  # share of each source's documents held out for validation
    val_docs: int | None = None  # or: this many held-out documents in all (overrides val_fraction)
    shuffle_docs: bool = True  # shuffle training documents (seeded) before packing them into blocks
    mix_tokens: int | None = None  # weighted mix: total training tokens (default: sum of the sources)
    num_proc: int = 1  # tokenization worker processes (the CLI's --num-proc overrides it)
    source_hash: Literal["stat", "content"] = "stat"  # identify local files by path+size+mtime, or by content
    cache_dir: str | None = None  # default: $LINREG_DATA_CACHE or ~/.cache/linreg/data

    def validate(self, path: str = "data") -> None:
        for i, src in enumerate(self.sources):
            src.validate(f"{path}.sources[{i}]")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            missing = [s.label for s in self.sources if s.weight is None]
            raise ConfigError(
                f"{path}.sources: either every source has a 'weight' or none has; missing for {', '.join(missing)}"
            )
        if self.embedded_docs <= 0:
            raise ConfigError(f"{path}.embedded_docs: must be positive, got {self.embedded_docs}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"{path}.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.val_docs is not None and self.val_docs < 0:
            raise ConfigError(f"{path}.val_docs: must be >= 0, got {self.val_docs}")
        if self.mix_tokens is not None:
            if self.mix_tokens <= 0:
                raise ConfigError(f"{path}.mix_tokens: must be positive, got {self.mix_tokens}")
            if not any(weighted):
                raise ConfigError(f"{path}.mix_tokens: only meaningful with per-source 'weight's")
        if self.num_proc < 1:
            raise ConfigError(f"{path}.num_proc: must be >= 1, got {self.num_proc}")
        names = [s.label for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{path}.sources: duplicate source names {dup}; set distinct 'name's")


@dataclass
class TokenizerConfig:
    """Load a tokenizer (``path``) or train a byte-level BPE on the training documents (``path: null``)."""

    path: str | None = None  # folder with a HF tokenizer, a hub name, or a sentencepiece .model file
    revision: str | None = None  # hub revision when ``path`` is a hub name
    vocab_size: int = 8192  # trained BPE: vocabulary size including the special tokens
    min_frequency: int = 2  # trained BPE: minimum pair count for a merge
    train_docs: int | None = 200000  # trained BPE: at most this many training documents are read
    unk_token: str = "<unk>"  # trained BPE special tokens get ids 0..3 in this order: unk, bos, eos, pad
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    pad_token: str = "<pad>"

    def validate(self, path: str = "tokenizer") -> None:
        if self.path is None:
            if self.vocab_size < 256 + 4 + 1:
                raise ConfigError(
                    f"{path}.vocab_size: a byte-level BPE needs more than 260 entries (256 bytes + 4 special), "
                    f"got {self.vocab_size}"
                )
            if self.vocab_size > 2**31 - 1:
                raise ConfigError(f"{path}.vocab_size: too large ({self.vocab_size})")
            if self.min_frequency < 1:
                raise ConfigError(f"{path}.min_frequency: must be >= 1, got {self.min_frequency}")
            if self.train_docs is not None and self.train_docs <= 0:
                raise ConfigError(f"{path}.train_docs: must be positive, got {self.train_docs}")
            specials = [self.unk_token, self.bos_token, self.eos_token, self.pad_token]
            if len(set(specials)) != 4 or not all(specials):
                raise ConfigError(f"{path}: unk/bos/eos/pad tokens must be four distinct non-empty strings, got {specials}")


def default_cache_dir() -> Path:
    """``$LINREG_DATA_CACHE``, else ``$XDG_CACHE_HOME/linreg/data``, else ``~/.cache/linreg/data``."""
    env = os.environ.get("LINREG_DATA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "linreg" / "data"


def resolve_cache_dir(data: DataConfig) -> Path:
    """The cache root for ``data``: its ``cache_dir`` (``~`` expanded) or :func:`default_cache_dir`."""
    return Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()
