"""Linear probing (evals.linear_probe): probe function, data formats, batched features, CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evals import linear_probe as lp
from linreg.errors import ConfigError, DataError


def _synthetic(n=400, layers=4, d=16, signal_layer=2, seed=0):
    """Label linearly encoded (along one direction) in one layer only; other layers are noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    feats = rng.normal(size=(layers, n, d))
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    feats[signal_layer] += np.outer(2.0 * y - 1.0, direction) * 3.0
    return feats.astype(np.float32), y


def test_probe_finds_the_encoding_layer_and_control_is_at_chance():
    feats, y = _synthetic()
    res = lp.probe_layers(feats, y, test_size=0.3, seed=0)
    accs = [r["accuracy"] for r in res["layers"]]
    assert res["best_layer"] == 2
    assert accs[2] >= 0.95
    for layer in (0, 1, 3):
        assert accs[layer] < 0.7, accs
    for r in res["layers"]:
        assert abs(r["control_accuracy"] - 0.5) < 0.15, r
    assert res["n_train"] + res["n_test"] == len(y)
    assert 0.4 < res["chance"] < 0.65


def test_split_keeps_groups_together():
    groups = np.repeat(np.arange(50), 2)
    tr, te = lp.split_indices(groups, 0.3, seed=1)
    assert set(groups[tr]).isdisjoint(groups[te])
    assert len(tr) + len(te) == 100
    assert len(set(groups[te])) == 15
    with pytest.raises(ConfigError):
        lp.split_indices(groups, 1.5)


def _xsc_rows(n, style="hub"):
    rows = []
    for i in range(n):
        right = 1 + i % 2
        if style == "hub":
            rows.append({"story_id": str(i), "input_sentence_1": f"Tom had a dog {i}.", "input_sentence_2": "It ran.",
                         "input_sentence_3": "It was fast.", "input_sentence_4": "Tom smiled.",
                         "sentence_quiz1": "He was happy yes" if right == 1 else "He was sad no",
                         "sentence_quiz2": "He was happy yes" if right == 2 else "He was sad no",
                         "answer_right_ending": right})
        else:
            rows.append({"InputStoryid": str(i), "InputSentence1": "A.", "InputSentence2": "B.",
                         "InputSentence3": "C.", "InputSentence4": "D.", "RandomFifthSentenceQuiz1": "E1.",
                         "RandomFifthSentenceQuiz2": "E2.", "AnswerRightEnding": str(right)})
    return rows


def test_xstorycloze_formats(tmp_path):
    hub = lp.xstorycloze_examples(_xsc_rows(3))
    assert len(hub) == 6 and hub.groups.tolist() == [0, 0, 1, 1, 2, 2]
    assert hub.labels.tolist() == [1, 0, 0, 1, 1, 0]
    assert hub.texts[0] == "Tom had a dog 0. It ran. It was fast. Tom smiled. He was happy yes"
    sc = lp.xstorycloze_examples(_xsc_rows(2, "storycloze"))
    assert sc.texts[1] == "A. B. C. D. E2." and sc.labels.tolist() == [1, 0, 0, 1]
    # JSONL file, auto-detected
    f = tmp_path / "xsc.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in _xsc_rows(4)) + "\n")
    data = lp.load_probe_data(data=str(f))
    assert data.name == "xstorycloze-en" and len(data) == 8
    assert len(lp.load_probe_data(data=str(f), limit=2)) == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**_xsc_rows(1)[0], "answer_right_ending": 3}) + "\n")
    with pytest.raises(DataError, match="not 1 or 2"):
        lp.load_probe_data(data=str(bad))


def test_classification_rows_and_errors(tmp_path):
    rows = [{"sentence": f"s{i}", "y": ["neg", "pos"][i % 2]} for i in range(6)]
    data = lp.classification_examples(rows, text_field="sentence", label_field="y")
    assert data.label_names == ["neg", "pos"] and data.labels.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(DataError, match="no field 'text'"):
        lp.classification_examples(rows)
    with pytest.raises(DataError, match="single value"):
        lp.classification_examples([{"text": "a", "label": 1}, {"text": "b", "label": 1}])
    with pytest.raises(ConfigError):
        lp.load_probe_data(data="x.jsonl", hub="y")
    csvf = tmp_path / "d.csv"
    csvf.write_text("text,label\nhello,1\nbye,0\n")
    assert lp.load_probe_data(data=str(csvf)).label_names == ["0", "1"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from tests.eval_helpers import build_tiny_lm

    root = tmp_path_factory.mktemp("probe_models")
    return [build_tiny_lm(root / "baseline", layers=2, seed=0), build_tiny_lm(root / "cosine", layers=3, seed=1)]


@pytest.mark.parametrize("arch", ["mistral", "gpt2"])  # rotary and absolute position embeddings
def test_batched_features_match_unbatched_float64_reference(arch, tiny_models, tmp_path):
    import torch

    from evals.common import load_model_and_tokenizer
    from tests.eval_helpers import build_tiny_lm

    path = tiny_models[0] if arch == "mistral" else build_tiny_lm(tmp_path / "gpt2", arch="gpt2", layers=2)
    model, tok = load_model_and_tokenizer(str(path), dtype="float32", device="cpu")
    texts = ["Once upon a time", "The cat sat on the mat and looked at the ball.", "Tom", "Lily and Ben went"]
    feats = lp.extract_features(model, tok, texts, batch_size=3, progress=False)
    # a tokenizer set to left padding gives the same features (each text unpadded at positions 0..n-1)
    tok.padding_side = "left"
    feats_left = lp.extract_features(model, tok, texts, batch_size=4, progress=False)
    assert tok.padding_side == "left"  # restored
    model64 = model.to(torch.float64)
    for i, text in enumerate(texts):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            hs = model64(**enc, output_hidden_states=True).hidden_states
        ref_last = np.stack([h[0, -1].numpy() for h in hs])
        ref_mean = np.stack([h[0].mean(0).numpy() for h in hs])
        for f in (feats, feats_left):
            np.testing.assert_allclose(f["last"][:, i], ref_last, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(f["mean"][:, i], ref_mean, rtol=1e-4, atol=1e-4)


def test_cli_end_to_end_on_tiny_mistral(tmp_path, tiny_models):
    """The label is the last word (yes/no): layer 0's last-token feature is its embedding, so it is
    linearly separable there by construction; the shuffled control must stay near chance."""
    rows = _xsc_rows(80)
    f = tmp_path / "xstorycloze_en.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    rc = lp.main(["--model", str(tiny_models[0]), "--model", str(tiny_models[1]), "--label", "baseline",
                  "--label", "+cosine", "--data", str(f), "-o", str(out), "--batch-size", "32",
                  "--no-progress", "-q"])
    assert rc == 0
    res = json.loads((out / "probe_results.json").read_text())
    assert res["kind"] == "probe" and res["task"]["n_examples"] == 160
    assert [m["label"] for m in res["models"]] == ["baseline", "+cosine"]
    for m, n_layers in zip(res["models"], (2, 3)):
        assert m["n_layers"] == n_layers
        last = m["probes"]["last"]["layers"]
        assert len(last) == n_layers + 1
        assert last[0]["accuracy"] >= 0.95
        assert abs(last[0]["control_accuracy"] - 0.5) <= 0.2
        assert set(m["probes"]) == {"last", "mean"}
    md = (out / "probe_results.md").read_text()
    assert "| layer | baseline | +cosine |" in md
    png = (out / "probe_accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_errors(tmp_path, capsys):
    assert lp.main(["--model", str(tmp_path / "nope"), "--data", "x.jsonl", "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lp.main(["--help"])
    assert "--pooling" in capsys.readouterr().out
