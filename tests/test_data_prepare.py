"""prepare_data end to end: real tokenizers, real datasets.map, real .npy shards on disk.

TinyStories tests read ../shared/data/tinystories-sample.txt (skipped when absent, never copied into
the repository); the others use the embedded synthetic stories.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from linreg.data import DataConfig, SourceConfig, TokenizerConfig, prepare_data, synthetic_stories
from linreg.errors import DataError

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = REPO.parent / "shared" / "data" / "tinystories-sample.txt"


def _tinystories() -> Path:
    if not TINYSTORIES.is_file():
        pytest.skip(f"real TinyStories sample not found at {TINYSTORIES} (see ../shared/data/README.md)")
    return TINYSTORIES


def _paragraphs(path: Path) -> list[str]:
    """Independent reference for the .txt reader: blank-line separated paragraphs, stripped."""
    return [p.strip() for p in re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8")) if p.strip()]


def _pieces(tok, blocks: np.ndarray) -> list[str]:
    """Decode a block array as one stream and split it at EOS; the last (cut) piece is dropped."""
    text = tok.decode(np.asarray(blocks).reshape(-1).tolist())
    return text.split(tok.eos_token)[:-1]


@pytest.fixture(scope="module")
def synth_tok(tmp_path_factory) -> str:
    """A small byte-level BPE trained (by our own train_bpe) on synthetic stories, saved as a folder."""
    from linreg.data.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("tok") / "synth-bpe"
    tok = train_bpe(synthetic_stories(500, seed=99), TokenizerConfig(vocab_size=600))
    tok.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def ts_prepared(tmp_path_factory):
    """TinyStories with a tokenizer trained by prepare_data itself, no validation, no shuffling."""
    path = _tinystories()
    cache = tmp_path_factory.mktemp("cache-ts")
    data = DataConfig(sources=[SourceConfig(path=str(path))], val_fraction=0.0, shuffle_docs=False)
    tokc = TokenizerConfig(vocab_size=1000)
    return data, tokc, cache, prepare_data(data, tokc, 64, cache, seed=0, progress=False)


# --------------------------------------------------------------------------------------------- round trip


def test_tinystories_shards_decode_to_the_documents(ts_prepared):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _, _, _, prep = ts_prepared
    docs = _paragraphs(TINYSTORIES)
    assert isinstance(prep.train, np.memmap) and prep.train.dtype == np.uint16 and prep.train.shape[1] == 64
    assert prep.val.shape == (0, 64)
    # the saved tokenizer: a PreTrainedTokenizerFast folder with consistent special tokens
    tok = AutoTokenizer.from_pretrained(str(prep.tokenizer_dir))
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == 1000
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert tok("Once upon a time")["input_ids"][0] != tok.bos_token_id  # no automatic BOS
    # token level: the stream is exactly enc(doc_0) EOS enc(doc_1) EOS ... cut to whole blocks
    enc = tok(docs, add_special_tokens=False)["input_ids"]
    stream = np.concatenate([np.array(e + [tok.eos_token_id]) for e in enc])
    n = prep.train.size
    assert len(stream) - n < 64
    np.testing.assert_array_equal(np.asarray(prep.train).reshape(-1), stream[:n])
    # text level: decoding gives back the documents joined by EOS
    pieces = _pieces(tok, prep.train)
    assert pieces == docs[: len(pieces)] and len(pieces) == len(docs) - 1
    assert prep.stats["train_tokens"] == n and prep.stats["train_dropped_tokens"] == len(stream) - n
    manifest = json.loads((prep.shard_dir / "manifest.json").read_text())
    assert manifest["fingerprint"] == prep.fingerprint == prep.shard_dir.name
    assert manifest["train"]["shape"] == list(prep.train.shape)


def test_second_call_reuses_without_tokenizing(ts_prepared):
    import linreg.data.prepare as P

    data, tokc, cache, prep = ts_prepared
    calls = P.TOKENIZE_CALLS
    mtime = (prep.shard_dir / "train.npy").stat().st_mtime_ns
    again = prepare_data(data, tokc, 64, cache, seed=0, progress=False)
    assert P.TOKENIZE_CALLS == calls
    assert again.stats["reused"] is True and prep.stats["reused"] is False
    assert again.fingerprint == prep.fingerprint and again.shard_dir == prep.shard_dir
    assert (prep.shard_dir / "train.npy").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.train, prep.train)
    # other seq_len / seed: other shard sets, the first one untouched
    other = prepare_data(data, tokc, 32, cache, seed=0, progress=False)
    assert other.fingerprint != prep.fingerprint and other.train.shape[1] == 32
    assert P.TOKENIZE_CALLS == calls + 1  # one pass (no validation split), the tokenizer was reused


def test_num_proc_two_gives_identical_shards(ts_prepared, tmp_path):
    _, _, _, prep = ts_prepared
    data = DataConfig(sources=[SourceConfig(path=str(TINYSTORIES))], val_fraction=0.02)
    tokc = TokenizerConfig(path=str(prep.tokenizer_dir))
    one = prepare_data(data, tokc, 128, tmp_path / "c1", seed=5, num_proc=1, progress=False)
    two = prepare_data(data, tokc, 128, tmp_path / "c2", seed=5, num_proc=2, progress=False)
    assert two.stats["num_proc"] == 2 and not two.stats["reused"]
    assert one.fingerprint == two.fingerprint
    np.testing.assert_array_equal(one.train, two.train)
    np.testing.assert_array_equal(one.val, two.val)
    assert one.val.shape[0] > 0


# ------------------------------------------------------------------------------------- change detection


def _write_subset(path: Path, n: int) -> list[str]:
    docs = _paragraphs(_tinystories())[:n]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return docs


def test_editing_the_corpus_or_the_tokenizer_changes_the_fingerprint(ts_prepared, tmp_path):
    import shutil

    _, _, _, prep = ts_prepared
    corpus = tmp_path / "corpus.txt"
    _write_subset(corpus, 300)
    tok_copy = tmp_path / "tok"
    shutil.copytree(prep.tokenizer_dir, tok_copy)
    data = DataConfig(sources=[SourceConfig(path=str(corpus))], val_fraction=0.05)
    tokc = TokenizerConfig(path=str(tok_copy))
    cache = tmp_path / "cache"
    a = prepare_data(data, tokc, 64, cache, seed=0, progress=False)
    assert prepare_data(data, tokc, 64, cache, seed=0, progress=False).fingerprint == a.fingerprint

    with open(corpus, "a", encoding="utf-8") as fh:
        fh.write("\nA brand new story about a purple cat.\n")
    b = prepare_data(data, tokc, 64, cache, seed=0, progress=False)
    assert b.fingerprint != a.fingerprint and not b.stats["reused"]
    assert (a.shard_dir / "manifest.json").is_file()  # the old set is kept, never mixed in

    spec = json.loads((tok_copy / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (tok_copy / "tokenizer.json").write_text(json.dumps(spec))
    c = prepare_data(data, tokc, 64, cache, seed=0, progress=False)
    assert c.fingerprint != b.fingerprint and not c.stats["reused"]
    assert "Once" not in c.tokenizer.decode(np.asarray(c.train[:4]).reshape(-1).tolist())


def test_mismatched_or_incomplete_shard_folder_is_refused(synth_tok, tmp_path):
    data = DataConfig(embedded_docs=200, val_fraction=0.1)
    tokc = TokenizerConfig(path=synth_tok)
    prep = prepare_data(data, tokc, 32, tmp_path, seed=0, progress=False)
    mpath = prep.shard_dir / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["inputs"]["seq_len"] = 999
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="refusing to use"):
        prepare_data(data, tokc, 32, tmp_path, seed=0, progress=False)
    mpath.unlink()
    with pytest.raises(DataError, match="has no manifest.json"):
        prepare_data(data, tokc, 32, tmp_path, seed=0, progress=False)


def test_crash_while_writing_leaves_nothing_that_looks_complete(synth_tok, tmp_path, monkeypatch):
    import linreg.data.prepare as P

    data = DataConfig(embedded_docs=200, val_fraction=0.1)
    tokc = TokenizerConfig(path=synth_tok)
    real_pack = P._pack
    calls = []

    def failing_pack(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # train.npy written, crash while writing val.npy
            raise KeyboardInterrupt("simulated crash")
        return real_pack(*args, **kwargs)

    monkeypatch.setattr(P, "_pack", failing_pack)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(data, tokc, 32, tmp_path, seed=0, progress=False)
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".work-")]
    monkeypatch.setattr(P, "_pack", real_pack)
    prep = prepare_data(data, tokc, 32, tmp_path, seed=0, progress=False)
    assert prep.train.shape[0] > 0 and not prep.stats["reused"]


# ------------------------------------------------------------------------------------------------ mixing


def test_weighted_mix_from_jsonl_and_parquet(synth_tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    small = synthetic_stories(120, seed=1)  # source A, few tokens, weight 3 -> repeated
    big = synthetic_stories(600, seed=2)  # source B, many tokens, weight 1 -> subsampled
    assert not set(small) & set(big)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "i": i}) for i, d in enumerate(small)))
    pq.write_table(pa.table({"story": big}), tmp_path / "b.parquet")
    data = DataConfig(
        sources=[
            SourceConfig(path=str(tmp_path / "a.jsonl"), weight=3.0, name="A"),
            SourceConfig(path=str(tmp_path / "b.parquet"), text_field="story", weight=1.0, name="B"),
        ],
        val_fraction=0.05,
    )
    prep = prepare_data(data, TokenizerConfig(path=synth_tok), 64, tmp_path / "cache", seed=3, progress=False)
    tok = AutoTokenizer.from_pretrained(synth_tok)
    enc = lambda d: len(tok(d, add_special_tokens=False)["input_ids"]) + 1  # noqa: E731

    # independent expectation: budget = all training tokens of A and B; A gets 3/4 of it
    sa, sb = prep.stats["sources"]
    assert (sa["name"], sb["name"]) == ("A", "B")
    assert sa["val_docs"] == 6 and sb["val_docs"] == 30
    budget = sa["train_tokens_available"] + sb["train_tokens_available"]
    longest = max(enc(d) for d in small + big)
    assert abs(sa["tokens"] - 0.75 * budget) <= longest and abs(sb["tokens"] - 0.25 * budget) <= longest
    assert sa["repeats"] > 2.0 and sb["repeats"] < 0.5

    # the shards themselves: classify every decoded document by its source
    pieces = _pieces(tok, prep.train)
    sset, bset = set(small), set(big)
    assert all(p in sset or p in bset for p in pieces)
    ta = sum(enc(p) for p in pieces if p in sset)
    tb = sum(enc(p) for p in pieces if p in bset)
    assert abs(ta / (ta + tb) - 0.75) < 0.02
    assert len({p for p in pieces if p in sset}) > 0.9 * (len(small) - 6)  # all of A, several times

    # mix_tokens fixes the total
    data.mix_tokens = 20_000
    fixed = prepare_data(data, TokenizerConfig(path=synth_tok), 64, tmp_path / "cache", seed=3, progress=False)
    used = sum(s["tokens"] for s in fixed.stats["sources"])
    assert abs(used - 20_000) <= 2 * longest
    assert abs(fixed.stats["sources"][0]["share"] - 0.75) < 0.02


# ------------------------------------------------------------------------------ embedded corpus, val split


def test_embedded_corpus_and_validation_split(synth_tok, tmp_path):
    data = DataConfig(embedded_docs=400, val_fraction=0.1)
    tokc = TokenizerConfig(path=synth_tok)
    a = prepare_data(data, tokc, 32, tmp_path / "a", seed=0, progress=False)
    b = prepare_data(data, tokc, 32, tmp_path / "b", seed=0, progress=False)
    c = prepare_data(data, tokc, 32, tmp_path / "c", seed=1, progress=False)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert not np.array_equal(np.asarray(a.val[:3]), np.asarray(c.val[:3]))
    assert a.stats["sources"][0]["val_docs"] == 40 and a.stats["sources"][0]["train_docs"] == 360
    stories = synthetic_stories(400, seed=0)
    train_p, val_p = set(_pieces(a.tokenizer, a.train)), set(_pieces(a.tokenizer, a.val))
    assert train_p <= set(stories) and val_p <= set(stories)
    assert not train_p & val_p and len(val_p) >= 35 and len(train_p) >= 350


def test_too_little_data_is_a_clear_error(synth_tok, tmp_path):
    tokc = TokenizerConfig(path=synth_tok)
    with pytest.raises(DataError, match="validation split holds"):
        prepare_data(DataConfig(embedded_docs=20, val_docs=1), tokc, 512, tmp_path, seed=0, progress=False)
    with pytest.raises(DataError, match="fewer than one block"):
        prepare_data(DataConfig(embedded_docs=3, val_fraction=0.0), tokc, 4096, tmp_path, seed=0, progress=False)
    with pytest.raises(DataError, match="tokenizer not found"):
        prepare_data(DataConfig(embedded_docs=3), TokenizerConfig(path="./no/such/tok"), 8, tmp_path, 0, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".work-")]


def test_sentencepiece_model_file(tmp_path):
    import sentencepiece as spm

    lines = [s.replace("\n\n", " ") for s in synthetic_stories(300, seed=4)]
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
    )
    data = DataConfig(sources=[SourceConfig(path=str(corpus), txt_split="line")], val_fraction=0.0, shuffle_docs=False)
    prep = prepare_data(data, TokenizerConfig(path=str(tmp_path / "sp.model")), 32, tmp_path / "c", seed=0,
                        progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    stream = np.concatenate([np.array(sp.encode(line) + [sp.eos_id()]) for line in lines])
    np.testing.assert_array_equal(np.asarray(prep.train).reshape(-1), stream[: prep.train.size])
    assert (prep.tokenizer_dir / "tokenizer.json").is_file()  # converted once into the cache


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_prepare_data(synth_tok, tmp_path, capsys):
    from linreg.data.prepare import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\n"
        "data:\n  embedded_docs: 200\n  val_fraction: 0.1\n"
        f"tokenizer:\n  path: {synth_tok}\n"
        "train:\n  seq_len: 32\n  seed: 7\n"
    )
    args = ["--recipe", str(recipe), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert main(args) == 0
    assert "prepared" in capsys.readouterr().out
    assert main(args + ["--json", "--set", "train.seq_len=32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reused"] is True and out["train_blocks"] > 0
    assert main(args + ["--set", "data.val_fractio=0.2"]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--num-proc" in capsys.readouterr().out
