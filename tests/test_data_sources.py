"""Reading sources into documents, and the data/tokenizer recipe sections."""

from __future__ import annotations

import gzip
import json

import pytest

from linreg.config import from_dict
from linreg.data.config import DataConfig, SourceConfig, TokenizerConfig
from linreg.data.sources import iter_documents, resolve_files, source_fingerprint
from linreg.errors import ConfigError, DataError


def _docs(**kw) -> list[str]:
    return list(iter_documents(SourceConfig(**kw)))


def test_txt_paragraphs_lines_and_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("First story.\nSecond line.\n\n\n  Another one.  \n\nLast\n")
    assert _docs(path=str(p)) == ["First story.\nSecond line.", "Another one.", "Last"]
    assert _docs(path=str(p), txt_split="line") == ["First story.", "Second line.", "Another one.", "Last"]
    assert _docs(path=str(p), txt_split="file") == [p.read_text().strip()]
    assert _docs(path=str(p), max_docs=2) == ["First story.\nSecond line.", "Another one."]


def test_jsonl_json_gz_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"text": f"doc {i}", "id": i} for i in range(5)] + [{"text": "   ", "id": 5}, {"text": None, "id": 6}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    want = [f"doc {i}" for i in range(5)]
    stats: dict = {}
    assert list(iter_documents(SourceConfig(path=str(tmp_path / "a.jsonl")), stats)) == want
    assert stats == {"docs": 5, "skipped": 2}
    (tmp_path / "b.json").write_text(json.dumps(recs))
    assert _docs(path=str(tmp_path / "b.json")) == want
    (tmp_path / "c.json").write_text(json.dumps({"data": recs, "version": 1}))
    assert _docs(path=str(tmp_path / "c.json")) == want
    (tmp_path / "d.json").write_text("\n".join(json.dumps(r) for r in recs))  # JSON Lines named .json
    assert _docs(path=str(tmp_path / "d.json")) == want
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps({"body": r["text"]}) for r in recs[:5]))
    assert _docs(path=str(tmp_path / "e.jsonl.gz"), text_field="body") == want
    pq.write_table(pa.table({"id": list(range(7)), "content": [r["text"] for r in recs]}), tmp_path / "f.parquet",
                   row_group_size=2)
    assert _docs(path=str(tmp_path / "f.parquet"), text_field="content") == want


def test_glob_and_folder_are_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, text in [("b.txt", "B"), ("a.txt", "A"), ("sub/c.jsonl", json.dumps({"text": "C"}))]:
        (tmp_path / name).write_text(text)
    (tmp_path / ".hidden.txt").write_text("H")
    assert _docs(path=str(tmp_path)) == ["A", "B", "C"]
    assert _docs(path=str(tmp_path / "*.txt")) == ["A", "B"]
    assert _docs(path=str(tmp_path / "**" / "*.jsonl")) == ["C"]
    assert [p.name for p in resolve_files(tmp_path)] == ["a.txt", "b.txt", "c.jsonl"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "also ok"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:4: invalid JSON"):
        _docs(path=str(p))


def test_missing_field_lists_available_fields(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"story": "a", "id": 1}) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl:1: no field 'text'.*available fields: story, id"):
        _docs(path=str(p))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"story": ["a"]}), tmp_path / "y.parquet")
    with pytest.raises(DataError, match=r"y\.parquet: no column 'text'; available columns: story"):
        _docs(path=str(tmp_path / "y.parquet"))
    (tmp_path / "z.jsonl").write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match=r"z\.jsonl:1: field 'text' holds int"):
        _docs(path=str(tmp_path / "z.jsonl"))


def test_missing_and_unsupported_files(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=str(missing)):
        _docs(path=str(missing))
    with pytest.raises(DataError, match="matches no file"):
        _docs(path=str(tmp_path / "*.jsonl"))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        _docs(path=str(tmp_path / "a.csv"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: not valid UTF-8"):
        _docs(path=str(tmp_path / "latin.txt"))


def test_hub_loader_on_a_local_folder(tmp_path):
    """The real datasets.load_dataset path (streaming), pointed at a local folder instead of the hub."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("\n".join(json.dumps({"text": f"s{i}", "n": i}) for i in range(9)))
    src = dict(hf=str(tmp_path / "ds"), streaming=True)
    assert _docs(**src, max_docs=4) == ["s0", "s1", "s2", "s3"]
    with pytest.raises(DataError, match="no column 'story'"):
        _docs(**src, text_field="story")
    with pytest.raises(DataError, match="could not load hub data set"):
        _docs(hf=str(tmp_path / "ds"), split="nosuchsplit", streaming=True)


def test_fingerprint_stat_vs_content(tmp_path):
    import os

    p = tmp_path / "a.txt"
    p.write_text("one\n\ntwo\n")
    src = SourceConfig(path=str(p))
    stat0, cont0 = source_fingerprint(src, "stat"), source_fingerprint(src, "content")
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert source_fingerprint(src, "stat") != stat0
    assert source_fingerprint(src, "content") == cont0
    p.write_text("one\n\nTWO\n")
    assert source_fingerprint(src, "content") != cont0


def test_recipe_sections_validate():
    d = from_dict(DataConfig, {"sources": [{"path": "a.txt", "weight": 1}, {"hf": "x/y", "weight": 3}]}, "data")
    assert isinstance(d.sources[1], SourceConfig) and d.sources[1].weight == 3.0
    with pytest.raises(ConfigError, match="data.sources\\[0\\].pth"):
        from_dict(DataConfig, {"sources": [{"pth": "a.txt"}]}, "data")
    with pytest.raises(ConfigError, match=r"data.sources\[0\]: give exactly one of 'path'"):
        from_dict(DataConfig, {"sources": [{"path": "a", "hf": "b"}]}, "data")
    with pytest.raises(ConfigError, match="every source has a 'weight'"):
        from_dict(DataConfig, {"sources": [{"path": "a", "weight": 1}, {"path": "b"}]}, "data")
    with pytest.raises(ConfigError, match="val_fraction"):
        from_dict(DataConfig, {"val_fraction": 1.5}, "data")
    with pytest.raises(ConfigError, match="duplicate source names"):
        from_dict(DataConfig, {"sources": [{"path": "a"}, {"path": "a"}]}, "data")
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        from_dict(TokenizerConfig, {"vocab_size": 100}, "tokenizer")
    with pytest.raises(ConfigError, match="four distinct"):
        from_dict(TokenizerConfig, {"pad_token": "</s>"}, "tokenizer")
    assert from_dict(TokenizerConfig, {"path": "some/tokenizer"}, "tokenizer").path == "some/tokenizer"
