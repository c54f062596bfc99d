"""Tokenizers for data preparation: load one (folder, hub name, sentencepiece ``.model``) or train a
byte-level BPE with ``tokenizers``; always end up with a ``PreTrainedTokenizerFast`` saved in a local
folder that ``AutoTokenizer.from_pretrained`` loads.

Trained tokenizers get ids 0..3 for unk, bos, eos, pad (Mistral's order for the first three), a
byte-level pre-tokenizer without prefix space and the byte-level decoder, so ``decode(encode(text))``
returns ``text`` exactly. No post-processor: calling the tokenizer adds no BOS/EOS; data preparation
appends EOS after every document itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from linreg.data.config import TokenizerConfig
from linreg.errors import DataError

__all__ = ["load_tokenizer", "train_bpe", "tokenizer_hash", "resolve_tokenizer", "TOKENIZER_MARKER"]

TOKENIZER_MARKER = "linreg_tokenizer.json"  # written last into cached tokenizer folders
_BPE_VERSION = 1  # bump when train_bpe would produce a different tokenizer from the same input


def _check_fast(tok: Any, where: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tok, PreTrainedTokenizerFast):
        raise DataError(f"tokenizer {where}: got {type(tok).__name__}, need a fast (tokenizers-backed) tokenizer")
    if tok.eos_token_id is None:
        raise DataError(
            f"tokenizer {where}: has no EOS token; data preparation separates documents with EOS. "
            f"Add one (tokenizer.add_special_tokens({{'eos_token': ...}}) and save_pretrained) or train a tokenizer."
        )
    return tok


def load_tokenizer(path: str | os.PathLike, revision: str | None = None) -> Any:
    """A ``PreTrainedTokenizerFast`` from a local folder or a hub name (no conversion, no caching)."""
    from transformers import AutoTokenizer

    p = Path(os.path.expanduser(str(path)))
    try:
        if p.is_dir():
            tok = AutoTokenizer.from_pretrained(str(p))
        else:
            tok = AutoTokenizer.from_pretrained(str(path), revision=revision)
    except DataError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/hub errors
        raise DataError(f"could not load tokenizer {path}: {type(exc).__name__}: {exc}") from exc
    return _check_fast(tok, str(path))


def tokenizer_hash(tok: Any) -> str:
    """Hash of everything that decides token ids: the serialized backend pipeline (normalizer,
    pre-tokenizer, model, added tokens) and the special token ids. Independent of file layout."""
    h = hashlib.blake2b(digest_size=16)
    h.update(tok.backend_tokenizer.to_str().encode())
    specials = {
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "pad": tok.pad_token_id,
        "unk": tok.unk_token_id,
        "len": len(tok),
    }
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


def train_bpe(texts: Iterable[Any], cfg: TokenizerConfig, length: int | None = None, progress: bool = False) -> Any:
    """Train a byte-level BPE on ``texts`` (strings or batches of strings) -> ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [cfg.unk_token, cfg.bos_token, cfg.eos_token, cfg.pad_token]
    backend = Tokenizer(models.BPE(unk_token=cfg.unk_token))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    if backend.get_vocab_size() <= len(specials):
        raise DataError("tokenizer training saw no text (the training documents are empty)")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=cfg.unk_token,
        bos_token=cfg.bos_token,
        eos_token=cfg.eos_token,
        pad_token=cfg.pad_token,
    )


def _key_hash(key: dict) -> str:
    return hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=10).hexdigest()


def _file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _cached(folder: Path, build: Callable[[], Any], info: dict) -> Any:
    """Load the tokenizer saved in ``folder`` (complete: has the marker), or build, save atomically, load."""
    from transformers import AutoTokenizer

    if (folder / TOKENIZER_MARKER).is_file():
        return _check_fast(AutoTokenizer.from_pretrained(str(folder)), str(folder))
    if folder.exists():
        raise DataError(
            f"tokenizer cache folder {folder} exists but is incomplete (no {TOKENIZER_MARKER}); delete it and retry"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tok = build()
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tok.save_pretrained(str(tmp))
        (tmp / TOKENIZER_MARKER).write_text(json.dumps({**info, "hash": tokenizer_hash(tok)}, indent=2, default=str))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / TOKENIZER_MARKER).is_file():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # reload from disk so every caller (builder or reuser) gets the identical object
    return _check_fast(AutoTokenizer.from_pretrained(str(folder)), str(folder))


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith((".model", ".json")) or os.sep + os.sep in text


def resolve_tokenizer(
    cfg: TokenizerConfig,
    cache_root: Path,
    train_key: dict,
    train_texts: Callable[[], tuple[Iterable[Any], int | None]],
    progress: bool = False,
) -> tuple[Any, Path, str]:
    """-> (tokenizer, tokenizer_dir, hash).

    ``cfg.path`` a folder: used in place. A sentencepiece ``.model`` file: converted once into
    ``cache_root/tokenizers/spm-<file hash>``. A hub name: downloaded once into
    ``cache_root/tokenizers/hub-<name, revision>`` (pin ``revision``; a moving branch is not re-checked).
    ``cfg.path`` null: a byte-level BPE is trained on ``train_texts()`` (called only when the cache
    misses) into ``cache_root/tokenizers/bpe-<hash of cfg and train_key>``.
    """
    tok_root = Path(cache_root) / "tokenizers"
    if cfg.path is None:
        key = {"kind": "bpe", "version": _BPE_VERSION, "cfg": _cfg_dict(cfg), "data": train_key}
        folder = tok_root / f"bpe-{_key_hash(key)}"

        def build() -> Any:
            texts, length = train_texts()
            return train_bpe(texts, cfg, length=length, progress=progress)

        tok = _cached(folder, build, key)
        return tok, folder, tokenizer_hash(tok)

    text = os.path.expanduser(cfg.path)
    p = Path(text)
    if p.is_dir():
        tok = load_tokenizer(p)
        return tok, p.resolve(), tokenizer_hash(tok)
    if p.is_file():
        if p.suffix != ".model":
            raise DataError(
                f"tokenizer.path {cfg.path}: a file must be a sentencepiece .model; for a Hugging Face tokenizer "
                f"give its folder (with tokenizer.json / tokenizer_config.json)"
            )
        digest = _file_hash(p)
        folder = tok_root / f"spm-{digest[:20]}"

        def build_spm() -> Any:
            from transformers import AutoTokenizer

            with tempfile.TemporaryDirectory() as d:
                shutil.copyfile(p, Path(d) / "tokenizer.model")
                try:
                    tok = AutoTokenizer.from_pretrained(d)
                except Exception as exc:
                    raise DataError(f"could not convert sentencepiece model {p}: {type(exc).__name__}: {exc}") from exc
                return _check_fast(tok, str(p))

        tok = _cached(folder, build_spm, {"kind": "sentencepiece", "file": str(p.resolve()), "sha": digest})
        return tok, folder, tokenizer_hash(tok)
    if _looks_like_path(cfg.path):
        raise DataError(f"tokenizer not found: {cfg.path} (resolved to {p.absolute()})")
    key = {"kind": "hub", "name": cfg.path, "revision": cfg.revision}
    safe = cfg.path.replace("/", "--")
    folder = tok_root / f"hub-{safe}-{_key_hash(key)}"
    tok = _cached(folder, lambda: load_tokenizer(cfg.path, revision=cfg.revision), key)
    return tok, folder, tokenizer_hash(tok)


def _cfg_dict(cfg: TokenizerConfig) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("path", "revision")}
