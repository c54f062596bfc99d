"""Comparison table (evals.compare) over superglue, judge and probe result files."""

from __future__ import annotations

import json

import pytest

from evals import compare


def _sglue(labels_scores):
    return {"kind": "superglue", "version": 1,
            "columns": ["boolq", "cb_acc", "cb_f1", "copa", "multirc", "record_f1", "record_em", "rte", "wic",
                        "xstorycloze_en", "mean"],
            "models": [{"label": lab, "scores": {"boolq": s, "cb_acc": s, "cb_f1": s / 2, "copa": s, "multirc": s,
                                                 "record_f1": s, "record_em": s, "rte": s, "wic": s,
                                                 "xstorycloze_en": s, "mean": s},
                        "stderr": {"boolq": 0.01}} for lab, s in labels_scores]}


def _judge(labels_means):
    return {"kind": "judge", "judge": {"model": "gpt-4o"},
            "models": [{"label": lab, "scores": {c: {"mean": v, "sem": 0.1, "n": 10}
                                                 for c in ("grammar", "creativity", "consistency", "plot", "overall")}}
                       for lab, v in labels_means]}


def _probe(labels_acc):
    return {"kind": "probe", "task": {"name": "xstorycloze-en"},
            "models": [{"label": lab, "probes": {"last": {"best_accuracy": a, "mean_accuracy": a - 0.1, "layers": []}}}
                       for lab, a in labels_acc]}


@pytest.fixture()
def files(tmp_path):
    out = {}
    for name, obj in {"sglue": _sglue([("run_a", 0.5), ("+cosine", 0.6), ("+mse", 0.55)]),
                      "judge": _judge([("baseline", 6.0), ("+cosine", 6.5), ("+mse", 7.0)]),
                      "probe": _probe([("baseline", 0.7), ("+mse", 0.8)])}.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(obj))
        out[name] = p
    return out


def test_side_by_side_table(files, tmp_path, capsys):
    md_path, js = tmp_path / "t.md", tmp_path / "t.json"
    rc = compare.main([str(files["sglue"]), str(files["judge"]), str(files["probe"]), "--rename", "run_a=baseline",
                       "--baseline", "baseline", "--models", "baseline,+cosine,+mse", "-o", str(md_path),
                       "--json", str(js), "--digits", "2"])
    assert rc == 0
    md = md_path.read_text()
    lines = md.splitlines()
    assert lines[0] == "| metric | baseline | +cosine | +mse |"
    boolq = next(line for line in lines if line.startswith("| SuperGLUE: BoolQ |"))
    assert boolq == "| SuperGLUE: BoolQ | 0.50 | **0.60 (+0.10)** | 0.55 (+0.05) |"
    grammar = next(line for line in lines if "judge: Grammar" in line)
    assert grammar == "| gpt-4o judge: Grammar | 6.00 | 6.50 (+0.50) | **7.00 (+1.00)** |"
    probe = next(line for line in lines if "best layer acc" in line)
    assert probe.endswith("| 0.70 | – | **0.80 (+0.10)** |")
    for col in ("CB acc", "CB F1", "ReCoRD F1", "ReCoRD EM", "RTE", "WiC", "xStoryCloze-en", "Mean"):
        assert f"SuperGLUE: {col} |" in md
    merged = json.loads(js.read_text())
    assert merged["models"] == ["baseline", "+cosine", "+mse"]
    assert merged["metrics"]["SuperGLUE: BoolQ"]["+cosine"]["value"] == 0.6
    assert capsys.readouterr().out == md


def test_transpose_stderr_and_metric_filter(files, capsys):
    assert compare.main([str(files["judge"]), "--transpose", "--stderr", "--no-bold", "--metrics", "grammar,plot"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| model | gpt-4o judge: Grammar | gpt-4o judge: Plot |"
    assert out[2] == "| baseline | 6.000 ± 0.100 | 6.000 ± 0.100 |"


def test_errors(files, tmp_path, capsys):
    assert compare.main([str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert compare.main([str(bad)]) == 2
    assert "not a linreg evaluation result" in capsys.readouterr().err
    assert compare.main([str(files["judge"]), "--baseline", "nobody"]) == 2
    assert "baseline 'nobody'" in capsys.readouterr().err
    clash = tmp_path / "judge2.json"
    clash.write_text(json.dumps(_judge([("baseline", 1.0)])))
    assert compare.main([str(files["judge"]), str(clash)]) == 2
    assert "two different values" in capsys.readouterr().err
