"""Judge (evals.judge): the real openai client against a loopback OpenAI-compatible server."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from evals import judge
from evals.loopback import GradingServer
from linreg.errors import DataError

KEY = "sk-test-Zq7XKEYNEVERSHOWN42"


def _rec(model, i, directives):
    return {"model": model, "prompt_id": f"p{i}", "sample": 0,
            "beginning": f"Once upon a time, a cat number {i} went to",
            "completion": f" the park and played. {directives}"}


# baseline: one good after two 429s, one good after a 500 (whose body quotes the auth header),
# one malformed once (parse retry fixes it), one malformed always (unparsed, left out of the means)
BASELINE = [("[[grades 7 5 8 6 C]] [[429 x2]]"), ("[[grades 9 7 6 8 D]] [[500 x1]]"),
            ("[[grades 5 5 5 5 B]] [[malformed once]]"), ("[[grades 3 3 3 3 A]] [[malformed always]]")]
# +mse: one that times out once, one plain
MSE = [("[[grades 8 8 8 8 E]] [[slow 5 x1]]"), ("[[grades 6 4 6 4 C]]")]
EXPECTED_REQUESTS = (3 + 2 + 2 + 2) + (2 + 1)


@pytest.fixture()
def completions_file(tmp_path):
    rows = [_rec("baseline", i, d) for i, d in enumerate(BASELINE)] + [_rec("+mse", i, d) for i, d in enumerate(MSE)]
    f = tmp_path / "completions.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _scan_for_key(paths, *texts):
    for t in texts:
        assert KEY not in t
    n = 0
    for root in paths:
        for p in Path(root).rglob("*"):
            if p.is_file():
                n += 1
                assert KEY.encode() not in p.read_bytes(), f"API key leaked into {p}"
    return n


def test_grading_end_to_end_retries_cache_and_no_key_leak(tmp_path, completions_file, monkeypatch, caplog, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cache, out = tmp_path / "cache", tmp_path / "out"
    caplog.set_level(logging.DEBUG)
    with GradingServer(api_key=KEY, echo_auth_in_errors=True) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.url)
        argv = ["--completions", str(completions_file), "--judge-model", "loopback-gpt", "--cache-dir", str(cache),
                "-o", str(out), "--concurrency", "4", "--timeout", "2.0", "--backoff-base", "0.01",
                "--no-progress", "-vv"]
        assert judge.main(argv) == 0
        # retries really happened: the server saw every attempt
        assert srv.n_requests == EXPECTED_REQUESTS
        assert srv.statuses[429] == 2 and srv.statuses[500] == 1
        res = json.loads((out / "judge_results.json").read_text())
        u = res["usage"]
        assert u["requests_sent"] == EXPECTED_REQUESTS
        assert u["retries"] == 4  # two 429s, one 500, one timeout
        assert u["errors_by_status"] == {"429": 2, "500": 1, "timeout": 1}
        assert u["parse_retries"] == 2 and u["unparsed"] == 1
        assert u["cache_hits"] == 0
        assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
        models = {m["label"]: m for m in res["models"]}
        b, m = models["baseline"], models["+mse"]
        assert (b["n_records"], b["n_parsed"], b["n_unparsed"]) == (4, 3, 1)
        # means over parsed records only, standard error = sample std / sqrt(n)
        for cat, vals in {"grammar": [7, 9, 5], "creativity": [5, 7, 5], "consistency": [8, 6, 5], "plot": [6, 8, 5]}.items():
            mean = sum(vals) / 3
            sem = math.sqrt(sum((v - mean) ** 2 for v in vals) / 2 / 3)
            assert b["scores"][cat]["mean"] == pytest.approx(mean)
            assert b["scores"][cat]["sem"] == pytest.approx(sem)
            assert b["scores"][cat]["n"] == 3
        assert b["scores"]["overall"]["mean"] == pytest.approx((6.5 + 7.5 + 5.0) / 3)
        assert b["age_groups"] == {"A": 0, "B": 1, "C": 1, "D": 1, "E": 0, "F": 0}
        assert m["scores"]["grammar"]["mean"] == pytest.approx(7.0)
        assert m["scores"]["plot"]["mean"] == pytest.approx(6.0) and m["n_unparsed"] == 0
        records = [json.loads(line) for line in (out / "judge_records.jsonl").read_text().splitlines()]
        assert len(records) == 6
        unparsed = [r for r in records if not r["parsed"]]
        assert len(unparsed) == 1 and unparsed[0]["attempts"] == 2 and unparsed[0]["grades"] is None
        md = (out / "judge_results.md").read_text()
        assert "| baseline | 7.00 ± 1.15 |" in md and "Consistency" in md
        tokens_first = u["prompt_tokens"]
        # the server also counted the reply that arrived after the client's timeout
        assert 0 < tokens_first < srv.usage["prompt_tokens"]

        # rerun: everything comes from the cache, nothing is sent
        out2 = tmp_path / "out2"
        assert judge.main([str(out2) if a == str(out) else a for a in argv]) == 0
        assert srv.n_requests == EXPECTED_REQUESTS
        res2 = json.loads((out2 / "judge_results.json").read_text())
        assert res2["usage"]["requests_sent"] == 0 and res2["usage"]["cache_hits"] == 8
        assert res2["usage"]["cached_prompt_tokens"] == tokens_first and res2["usage"]["prompt_tokens"] == 0
        assert res2["models"] == res["models"]

    captured = capsys.readouterr()
    n_files = _scan_for_key([out, out2, cache], caplog.text, captured.out, captured.err,
                            "\n".join(str(r.msg) for r in caplog.records))
    assert "[REDACTED]" in caplog.text  # the 500 body quoting the Authorization header was scrubbed
    assert n_files >= 6 + 8  # outputs + cache entries were really scanned
    assert any("HTTP Request" in r.getMessage() or "Request options" in r.getMessage() for r in caplog.records)


def test_refused_request_is_a_clean_error_without_key(tmp_path, completions_file, capsys):
    with GradingServer(api_key="another-key-entirely") as srv:
        rc = judge.main(["--completions", str(completions_file), "--base-url", srv.url, "--api-key", KEY,
                         "--no-cache", "-o", str(tmp_path / "o"), "--no-progress", "--backoff-base", "0.01"])
        assert rc == 2
        assert srv.n_requests <= 6  # 401 is not retried
    err = capsys.readouterr().err
    assert "HTTP 401" in err and KEY not in err


def test_missing_key_and_bad_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"beginning": "a", "completion": "b"}) + "\n")
    assert judge.main(["--completions", str(f), "--no-cache", "-o", str(tmp_path / "o"), "-q"]) == 2
    assert "no API key" in capsys.readouterr().err
    assert judge.main(["-q"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"beginning": "a"}) + "\n")
    with pytest.raises(DataError, match="completion"):
        judge.load_completions(bad)


def test_parse_grades_variants():
    ok = judge.parse_grades('Sure!\n```json\n{"assessment": "Good {story}.", "grammar": 8, "creativity": "7/10", '
                            '"consistency": 6.5, "plot": 9, "age_group": "D: 8-9"}\n```')
    assert ok == {"grammar": 8.0, "creativity": 7.0, "consistency": 6.5, "plot": 9.0, "age_group": "D",
                  "assessment": "Good {story}."}
    lines = judge.parse_grades("Grammar: 8/10\nCreativity: 6/10\nConsistency - 7\nPlot: 5\nAge group: B")
    assert lines["plot"] == 5.0 and lines["age_group"] == "B"
    assert judge.parse_grades('{"grammar": 8, "creativity": 7, "consistency": 6}') is None
    assert judge.parse_grades('{"grammar": 11, "creativity": 7, "consistency": 6, "plot": 5}') is None
    assert judge.parse_grades("I liked it!") is None
    assert judge.parse_grades("") is None


def test_parse_grades_nesting_out_of_10_age_ranges_and_letters():
    """Reply shapes seen from real graders: grades one level down, "N out of 10", age ranges and
    "Age group: C"; still refusing replies with a missing or out-of-range grade."""
    want = {"grammar": 8.0, "creativity": 7.0, "consistency": 6.0, "plot": 9.0}

    def grades(r):
        return {c: r[c] for c in judge.CATEGORIES}

    nested = judge.parse_grades('{"assessment": "Fine.", "grades": {"grammar": 8, "creativity": 7, '
                                '"consistency": 6, "plot": 9}, "age_group": "C"}')
    assert grades(nested) == want and nested["age_group"] == "C" and nested["assessment"] == "Fine."
    nested_age = judge.parse_grades('{"scores": {"Grammar": 8, "Creativity": 7, "Consistency": 6, "Plot": 9, '
                                    '"Age group": "D"}}')
    assert grades(nested_age) == want and nested_age["age_group"] == "D"
    out_of = judge.parse_grades('{"grammar": "8 out of 10", "creativity": "7/10", "consistency": 6, '
                                '"plot": "9 out of 10", "age_group": "6-7"}')
    assert grades(out_of) == want and out_of["age_group"] == "C"
    lines = judge.parse_grades("Grammar: 8 out of 10\nCreativity: 7 out of 10\nConsistency: 6/10\n"
                               "Plot score: 9\nAge group: 10-12")
    assert grades(lines) == want and lines["age_group"] == "E"
    for age, letter in [("Age group: C", "C"), ("6-7", "C"), ("6 to 7 years", "C"), ("(B)", "B"), ("b", "B"),
                        ("F: 13-16", "F"), ("3 or under", "A"), (9, "D"), ("about 11 years old", "E"),
                        ("8-10", None), ("17", None), ("unknown", None)]:
        r = judge.parse_grades(json.dumps({"grammar": 8, "creativity": 7, "consistency": 6, "plot": 9,
                                           "age_group": age}))
        assert r["age_group"] == letter, age
    # a JSON object without the grades (an echoed example, a note) does not hide the lines after it
    mixed = judge.parse_grades('Note {"format": "json"} follows.\nGrammar: 8\nCreativity: 7\nConsistency: 6\n'
                               'Plot: 9\nAge group: B')
    assert grades(mixed) == want and mixed["age_group"] == "B"
    assert grades(judge.parse_grades('{"note": 1} {"grammar": 8, "creativity": 7, "consistency": 6, "plot": 9}')) \
        == want
    # still refused: a missing category, an out-of-range grade (also nested or "out of 10"), a JSON grade
    # that is out of range even if lines elsewhere look fine
    assert judge.parse_grades('{"grades": {"grammar": 8, "creativity": 7, "consistency": 6}}') is None
    assert judge.parse_grades('{"grades": {"grammar": 12, "creativity": 7, "consistency": 6, "plot": 9}}') is None
    assert judge.parse_grades('{"grammar": "11 out of 10", "creativity": 7, "consistency": 6, "plot": 9}') is None
    assert judge.parse_grades('{"grammar": "7 out of 5", "creativity": 7, "consistency": 6, "plot": 9}') is None
    assert judge.parse_grades("Grammar: 8\nCreativity: 7\nConsistency: 6\nPlot: 14 out of 10") is None
    assert judge.parse_grades('Grammar: 8\nCreativity: 7\nConsistency: 6\nPlot: 9\n'
                              '{"grammar": 18, "creativity": 7, "consistency": 6, "plot": 9}') is None


def test_prompt_and_beginnings_resources(tmp_path):
    p = judge.load_judge_prompt()
    assert p.version == "1" and "***" in p.user
    msgs = p.messages("Tom went to the", " park. The end.")
    assert msgs[0]["role"] == "system" and "Tom went to the*** park. The end." in msgs[1]["content"]
    begs = judge.load_beginnings()
    assert len(begs) >= 30 and len({b["id"] for b in begs}) == len(begs)
    assert all(not b["text"].rstrip().endswith((".", "!", "?")) for b in begs)  # stop mid-sentence
    txt = tmp_path / "b.txt"
    txt.write_text("One day, a\n\nThe dog ran to\n")
    assert [b["text"] for b in judge.load_beginnings(txt)] == ["One day, a", "The dog ran to"]
    bad = tmp_path / "prompt.txt"
    bad.write_text("version: 9\n=== user ===\nno placeholders here\n")
    with pytest.raises(DataError, match="placeholder"):
        judge.load_judge_prompt(bad)


def test_cache_key_depends_on_model_messages_params():
    base = {"model": "a", "messages": [{"role": "user", "content": "x"}], "params": {"temperature": 0}}
    k = judge.request_key(base)
    assert k == judge.request_key(json.loads(json.dumps(base)))
    assert k != judge.request_key({**base, "model": "b"})
    assert k != judge.request_key({**base, "params": {"temperature": 1}})
    assert k != judge.request_key({**base, "messages": [{"role": "user", "content": "y"}]})


def test_cache_is_per_server(tmp_path):
    """The same request to two servers (same model name) is sent to both and cached twice; URLs that differ
    only in credentials, query, case or a trailing slash are one server; no URL is written to the cache."""
    cache = tmp_path / "cache"
    recs = [_rec("m", 0, "[[grades 7 5 8 6 C]]")]
    with GradingServer() as a, GradingServer() as b:
        cfg = judge.JudgeConfig(model="same-name", api_key=KEY, cache_dir=str(cache))
        ga, sa = judge.grade_records(recs, judge.JudgeConfig(**{**vars(cfg), "base_url": a.url}), progress=False)
        gb, sb = judge.grade_records(recs, judge.JudgeConfig(**{**vars(cfg), "base_url": b.url}), progress=False)
        assert a.n_requests == 1 and b.n_requests == 1
        assert sa.cache_hits == 0 and sb.cache_hits == 0 and sb.requests_sent == 1
        assert len(list(cache.rglob("*.json"))) == 2
        same_a = a.url.replace("http://127.0.0.1", "http://someone:secret@127.0.0.1") + "/?token=zz#x"
        gc, sc = judge.grade_records(recs, judge.JudgeConfig(**{**vars(cfg), "base_url": same_a}), progress=False)
        assert sc.cache_hits == 1 and a.n_requests == 1 and gc[0]["grades"] == ga[0]["grades"]
        assert len(list(cache.rglob("*.json"))) == 2
        for f in cache.rglob("*.json"):
            text = f.read_text()
            assert "127.0.0.1" not in text and "secret" not in text and "token=" not in text
    assert judge.normalize_base_url("HTTPS://u:p@API.example.com:443/v1/?k=1") == "https://api.example.com/v1"
    assert judge.normalize_base_url(None) == judge.normalize_base_url("https://api.openai.com/v1/")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.eval_helpers import build_tiny_lm

    return build_tiny_lm(tmp_path_factory.mktemp("judge_model") / "baseline", layers=2)


def test_batched_left_padded_generation_matches_one_by_one(tiny_model):
    from evals.common import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_model), dtype="float32", device="cpu")
    begs = [{"id": "a", "text": "Once upon a time there was a"}, {"id": "b", "text": "Tom"},
            {"id": "c", "text": "The cat sat on the mat and"}]
    batched = judge.generate_completions(model, tok, begs, max_new_tokens=6, temperature=0, batch_size=3,
                                         progress=False)
    single = judge.generate_completions(model, tok, begs, max_new_tokens=6, temperature=0, batch_size=1,
                                        progress=False)
    assert [r["completion"] for r in batched] == [r["completion"] for r in single]
    assert tok.padding_side == "right"  # restored
    sampled = judge.generate_completions(model, tok, begs, n_per_prompt=2, max_new_tokens=4, batch_size=4,
                                         progress=False)
    assert [(r["prompt_id"], r["sample"]) for r in sampled] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]


def test_missing_key_stops_before_generating(tmp_path, tiny_model, monkeypatch, capsys):
    """Without an API key the command fails before loading a model or generating (no completions.jsonl);
    --generate-only needs no key."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model), "--limit-prompts", "2", "--max-new-tokens", "3", "--no-cache", "-o", str(out),
            "--no-progress", "-q"]
    assert judge.main(argv) == 2
    assert "no API key" in capsys.readouterr().err
    assert not (out / "completions.jsonl").exists()
    assert judge.main(argv + ["--generate-only"]) == 0
    assert len((out / "completions.jsonl").read_text().splitlines()) == 2


def test_cli_generates_and_grades(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"s{i}", "text": t}) + "\n"
                               for i, t in enumerate(["Once upon a time, a dog", "Lily saw a big"])))
    out = tmp_path / "out"
    with GradingServer(latency=0.01) as srv:
        rc = judge.main(["--model", str(tiny_model), "--label", "baseline", "--prompts", str(prompts),
                         "--n-per-prompt", "2", "--max-new-tokens", "5", "--base-url", srv.url,
                         "--cache-dir", str(tmp_path / "cache"), "-o", str(out), "--no-progress", "-q"])
        assert rc == 0 and srv.n_requests >= 4
    gen = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert len(gen) == 4 and {g["model"] for g in gen} == {"baseline"}
    res = json.loads((out / "judge_results.json").read_text())
    assert res["models"][0]["n_records"] == 4 and res["generation"]["n_per_prompt"] == 2
    assert "api_key" not in res["judge"]
    _scan_for_key([out, tmp_path / "cache"])
