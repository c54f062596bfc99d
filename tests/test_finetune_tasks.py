"""Fine-tuning data readers, error reporting with file and line, task metrics and the pairwise reward loss
against independent float64 references, and the linearity-change table on hand-written run folders."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from linreg.errors import ConfigError, DataError
from linreg.finetune.tasks import FinetuneOptions, load_task_data, read_jsonl, synthetic_rows
from tests.finetune_helpers import write_jsonl


def opts(**kw) -> FinetuneOptions:
    o = FinetuneOptions(**kw)
    o.validate()
    return o


# -- readers ---------------------------------------------------------------------------------------


def test_superglue_formats_from_local_jsonl(tmp_path):
    boolq = [{"question": "is the sky blue", "passage": "The sky is blue by day.", "idx": 0, "label": 1},
             {"question": "is grass red", "passage": "Grass is green.", "idx": 1, "label": False}]
    d = load_task_data(opts(dataset="boolq", train_file=str(write_jsonl(tmp_path / "b.jsonl", boolq)),
                            validation_file=str(tmp_path / "b.jsonl")), "classification")
    assert d.train[0].text == "question: is the sky blue\npassage: The sky is blue by day."
    assert [e.label for e in d.train] == [1, 0]
    assert d.label_names == ["False", "True"] and d.name == "boolq"

    multirc = [{"paragraph": "Tom has a dog.", "question": "What does Tom have?", "answer": "a dog", "label": 1}]
    d = load_task_data(opts(dataset="multirc", train_file=str(write_jsonl(tmp_path / "m.jsonl", multirc)),
                            validation_file=str(tmp_path / "m.jsonl")), "classification")
    assert d.train[0].text == "question: What does Tom have?\nanswer: a dog\npassage: Tom has a dog."

    cb = [{"premise": "It rained.", "hypothesis": "The ground is wet.", "label": "entailment"},
          {"premise": "It rained.", "hypothesis": "It was dry.", "label": "Contradiction"},
          {"premise": "It rained.", "hypothesis": "Tom was home.", "label": 2}]
    d = load_task_data(opts(dataset="cb", train_file=str(write_jsonl(tmp_path / "c.jsonl", cb)),
                            validation_file=str(tmp_path / "c.jsonl")), "classification")
    assert d.train[0].text == "question: The ground is wet.\npassage: It rained."
    assert [e.label for e in d.train] == [0, 1, 2] and d.num_labels == 3


def test_generic_jsonl_string_labels_and_val_fraction(tmp_path):
    rows = [{"text": f"t{i}", "label": ["neg", "pos", "mid"][i % 3]} for i in range(30)]
    path = write_jsonl(tmp_path / "own.jsonl", rows)
    a = load_task_data(opts(train_file=str(path), val_fraction=0.2), "classification")
    b = load_task_data(opts(train_file=str(path), val_fraction=0.2), "classification")
    assert a.label_names == ["mid", "neg", "pos"]  # sorted class names of the training split
    assert len(a.validation) == 6 and len(a.train) == 24 and a.name == "own"
    assert a.validation == b.validation  # fixed hold-out: the same for every train.seed
    assert {e.text for e in a.train}.isdisjoint({e.text for e in a.validation})

    pairs = [{"prompt_id": i, "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    d = load_task_data(opts(train_file=str(write_jsonl(tmp_path / "p.jsonl", pairs)), val_fraction=0.3), "reward")
    assert len(d.train) == 7 and len(d.validation) == 3 and d.train[0].chosen.startswith("good")


def test_malformed_line_reported_with_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1\n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        load_task_data(opts(train_file=str(path), val_fraction=0.5), "classification")
    path.write_text('{"text": "a", "label": 0}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object"):
        list(read_jsonl(path))


def test_missing_field_reported_with_file_and_line(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1},
                                               {"txt": "c", "label": 1}])
    with pytest.raises(DataError, match=rf"{val}:3: missing field 'text' \(fields present: label, txt\)"):
        load_task_data(opts(train_file=str(train), validation_file=str(val)), "classification")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "x", "rejected": "y"}, {"chosen": "x"}])
    with pytest.raises(DataError, match=rf"{pairs}:2: missing field 'rejected'"):
        load_task_data(opts(train_file=str(pairs), val_fraction=0.5), "reward")
    boolq = write_jsonl(tmp_path / "boolq.jsonl", [{"question": "q", "label": 1}])
    with pytest.raises(DataError, match=rf"{boolq}:1: missing field 'passage'"):
        load_task_data(opts(dataset="boolq", train_file=str(boolq), validation_file=str(boolq)), "classification")


def test_bad_values_reported_with_file_and_line(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    bad = write_jsonl(tmp_path / "v.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 5}])
    with pytest.raises(DataError, match=rf"{bad}:2: label 5 out of range for 2 classes"):
        load_task_data(opts(train_file=str(train), validation_file=str(bad)), "classification")
    bad = write_jsonl(tmp_path / "v2.jsonl", [{"text": "  ", "label": 0}])
    with pytest.raises(DataError, match=rf"{bad}:1: field 'text' is empty"):
        load_task_data(opts(train_file=str(train), validation_file=str(bad)), "classification")
    cb = write_jsonl(tmp_path / "cb.jsonl", [{"premise": "p", "hypothesis": "h", "label": "maybe"}])
    with pytest.raises(DataError, match=rf"{cb}:1: unknown label 'maybe'"):
        load_task_data(opts(dataset="cb", train_file=str(cb), validation_file=str(cb)), "classification")
    test_split = write_jsonl(tmp_path / "test.jsonl", [{"text": "a", "label": -1}])
    with pytest.raises(DataError, match=rf"{test_split}:1: .*negative labels"):
        load_task_data(opts(train_file=str(test_split), validation_file=str(test_split)), "classification")
    with pytest.raises(DataError, match="data file not found"):
        load_task_data(opts(train_file=str(tmp_path / "nope.jsonl"), val_fraction=0.1), "classification")


def test_option_errors(tmp_path):
    with pytest.raises(ConfigError, match="validation_file or val_fraction"):
        opts(train_file="x.jsonl")
    # the hub data sets (and synthetic) read from a local train_file need a local validation split too
    train = write_jsonl(tmp_path / "bq.jsonl", [{"question": "q", "passage": "p", "label": 1},
                                                {"question": "q2", "passage": "p2", "label": 0}])
    for dataset in ("boolq", "multirc", "cb", "hh-helpful", "synthetic"):
        with pytest.raises(ConfigError, match=rf"train_file \(dataset '{dataset}'\) needs validation_file or "
                                              rf"val_fraction"):
            opts(dataset=dataset, train_file=str(train))
    data = load_task_data(opts(dataset="boolq", train_file=str(train), val_fraction=0.5), "classification")
    assert len(data.train) == 1 and len(data.validation) == 1
    with pytest.raises(ConfigError, match="needs a local JSONL"):
        opts(dataset="jsonl")
    with pytest.raises(ConfigError, match="reward data set; task.kind is 'classification'"):
        load_task_data(opts(dataset="hh-helpful"), "classification")
    from linreg.config import from_dict

    with pytest.raises(ConfigError, match="unknown recipe key 'task.options.train_fil'"):
        from_dict(FinetuneOptions, {"train_fil": "x"}, "task.options")


def test_synthetic_rows_are_deterministic():
    assert synthetic_rows("classification", 20, 0) == synthetic_rows("classification", 20, 0)
    rows = synthetic_rows("classification", 200, 0)
    assert 0.35 < np.mean([r["label"] for r in rows]) < 0.65
    pairs = synthetic_rows("reward", 5, 1)
    assert all(p["chosen"] != p["rejected"] and "Assistant:" in p["chosen"] for p in pairs)


# -- metrics and the pairwise loss against independent references -------------------------------------


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    from linreg.finetune.objectives import classification_metrics

    rng = np.random.default_rng(0)
    for n_cls in (2, 3):
        y = rng.integers(0, n_cls, 200)
        p = np.where(rng.random(200) < 0.6, y, rng.integers(0, n_cls, 200))
        conf = np.zeros((n_cls, n_cls))
        np.add.at(conf, (y, p), 1)
        m = classification_metrics(conf)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-12)
        assert m["f1_macro"] == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)
        expect = f1_score(y, p) if n_cls == 2 else f1_score(y, p, average="macro")
        assert m["f1"] == pytest.approx(expect, abs=1e-12)
    # a class never true nor predicted counts as F1 0 in the macro mean (sklearn zero_division=0)
    y, p = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    conf = np.zeros((3, 3))
    np.add.at(conf, (y, p), 1)
    assert classification_metrics(conf)["f1_macro"] == pytest.approx(
        f1_score(y, p, labels=[0, 1, 2], average="macro", zero_division=0), abs=1e-12)


def test_pairwise_loss_and_accuracy_on_known_rewards():
    import torch

    from linreg.finetune.objectives import pair_accuracy, pairwise_loss

    rc = [2.0, -1.0, 0.5, 30.0, -40.0, 1.25]
    rr = [1.0, 0.0, 0.5, -30.0, 40.0, -0.75]

    def ref_nll(d: float) -> float:  # -log sigmoid(d), float64, written out
        return -math.log(1.0 / (1.0 + math.exp(-d))) if d > -30 else -d + math.log1p(math.exp(d))

    expect = sum(ref_nll(a - b) for a, b in zip(rc, rr)) / len(rc)
    got = pairwise_loss(torch.tensor(rc, dtype=torch.float64), torch.tensor(rr, dtype=torch.float64))
    assert got.item() == pytest.approx(expect, rel=1e-12)
    assert math.isfinite(pairwise_loss(torch.tensor([-40.0]), torch.tensor([40.0])).item())  # no overflow
    # ranked right: 2>1, 30>-30, 1.25>-0.75; wrong: -1<0, -40<40, and the tie 0.5=0.5
    assert pair_accuracy(torch.tensor(rc), torch.tensor(rr)).item() == pytest.approx(3 / 6)
    # gradient: d/dr_c of -log sigmoid(r_c - r_r) = -(1 - sigmoid(d)) / n = -1 / ((1 + exp(d)) n)
    a = torch.tensor(rc, dtype=torch.float64, requires_grad=True)
    pairwise_loss(a, torch.tensor(rr, dtype=torch.float64)).backward()
    ref = [-1 / (1 + math.exp(x - y)) / len(rc) for x, y in zip(rc, rr)]
    assert a.grad.tolist() == pytest.approx(ref, rel=1e-9)


# -- the table --------------------------------------------------------------------------------------


def _fake_run(folder, model, task, seed, before, after, val_acc, *, steps=20, finished=True):
    """A run folder as the loop and finish_run leave it: tracked at 0, steps/2 and steps."""
    folder.mkdir(parents=True)
    (folder / "finetune.json").write_text(json.dumps({"model": model, "task": task, "kind": "classification",
                                                      "seed": seed, "finished": finished, "final_step": steps}))
    lines = []
    for step, vals in ((0, before), (steps // 2, [0.5] * len(before)), (steps, after)):
        layers = [{"linearity": v, "linearity_wo_residual": v / 2, "contribution_norm": 1.0, "cosine": 0.5}
                  for v in vals]
        lines.append(json.dumps({"step": step, "n_tokens": 500, "baseline": 0.1, "layers": layers}))
    (folder / "linearity.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 10, "val/accuracy": 0.1}) + "\n"
                                          + json.dumps({"step": 20, "val/accuracy": val_acc, "val/f1": 0.5}) + "\n")


def test_table_means_and_stds_over_seeds(tmp_path, capsys):
    from linreg.finetune.table import main

    sweep = tmp_path / "sweep"
    _fake_run(sweep / "seed_1", "m", "boolq", 1, [0.8, 0.9], [0.9, 0.96], 0.7)
    _fake_run(sweep / "seed_2", "m", "boolq", 2, [0.82, 0.88], [0.95, 0.97], 0.8)
    _fake_run(tmp_path / "other", "m", "cb", 1, [0.7, 0.7], [0.6, 0.7], 0.5)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "linearity.jsonl").write_text(json.dumps({"step": 0, "layers": []}) + "\n")
    from linreg.cli import main as linreg_cli

    assert linreg_cli(["finetune-table", str(sweep), str(tmp_path / "other"), str(tmp_path / "unfinished"),
                       "--out", str(tmp_path / "t")]) == 0
    out, err = capsys.readouterr()
    assert "skipping" in err and "unfinished" in err
    rows = json.loads((tmp_path / "t" / "finetune_table.json").read_text())["rows"]
    assert [(r["model"], r["task"], r["seeds"]) for r in rows] == [("m", "boolq", [1, 2]), ("m", "cb", [1])]
    deltas = [(0.9 + 0.96) / 2 - (0.8 + 0.9) / 2, (0.95 + 0.97) / 2 - (0.82 + 0.88) / 2]
    lin = rows[0]["linearity"]
    assert lin["delta"]["mean"] == pytest.approx(statistics.fmean(deltas), abs=1e-12)
    assert lin["delta"]["std"] == pytest.approx(statistics.stdev(deltas), abs=1e-12)
    assert lin["before"]["values"] == pytest.approx([0.85, 0.85])
    assert rows[0]["linearity_wo_residual"]["delta"]["mean"] == pytest.approx(statistics.fmean(deltas) / 2)
    assert lin["layers_after"] == pytest.approx([0.925, 0.965])
    assert rows[0]["val"]["val/accuracy"]["mean"] == pytest.approx(0.75)  # the last logged value per run
    assert rows[1]["linearity"]["delta"]["std"] is None  # one seed: no spread
    md = (tmp_path / "t" / "finetune_table.md").read_text()
    assert md == out.rstrip("\n") + "\n" or md.strip() in out
    assert f"| m | boolq | 2 | 20 | 0.8500 ± 0.0000 | 0.9450 ± 0.0212 | +{statistics.fmean(deltas):.4f} ± " in md
    assert (tmp_path / "t" / "finetune_table.png").stat().st_size > 1000
    assert main([str(tmp_path / "unfinished"), "--strict"]) == 2
    assert "only the step-0 line" in capsys.readouterr().err
    assert main([str(tmp_path / "empty-nonexistent")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--strict" in capsys.readouterr().out


def test_table_refuses_seeds_measured_on_different_tokens(tmp_path):
    from linreg.errors import DataError
    from linreg.finetune.table import find_runs, read_run, summarize

    _fake_run(tmp_path / "seed_1", "m", "boolq", 1, [0.8, 0.9], [0.9, 0.96], 0.7)
    _fake_run(tmp_path / "seed_2", "m", "boolq", 2, [0.82, 0.88], [0.95, 0.97], 0.8)
    log = tmp_path / "seed_2" / "linearity.jsonl"
    log.write_text(log.read_text().replace('"n_tokens": 500', '"n_tokens": 640'))
    with pytest.raises(DataError, match=r"different numbers of held-out tokens \[500, 640\]"):
        summarize([read_run(p) for p in find_runs([tmp_path])])


def test_table_skips_unfinished_runs(tmp_path, capsys):
    """A run stopped mid-way (finetune.json finished false; a pretraining run whose last tracked step is not
    its train.steps) is left out with a warning, not averaged with the finished seeds; --strict refuses it."""
    from linreg.finetune.table import main, write_table

    sweep = tmp_path / "sweep"
    _fake_run(sweep / "seed_1", "m", "boolq", 1, [0.8, 0.9], [0.9, 0.96], 0.7)
    _fake_run(sweep / "seed_2", "m", "boolq", 2, [0.82, 0.88], [0.95, 0.97], 0.8)
    # seed 3 stopped by SIGTERM at step 10: its tracked lines end at step 10 (0, 5, 10)
    _fake_run(sweep / "seed_3", "m", "boolq", 3, [0.6, 0.6], [0.1, 0.1], 0.1, steps=10, finished=False)
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "recipe.yaml").write_text("name: tiny\ntask:\n  kind: lm\ntrain:\n  steps: 100\n  seed: 1\n")
    layers = [{"linearity": 0.5, "linearity_wo_residual": 0.2}]
    (pre / "linearity.jsonl").write_text("".join(json.dumps({"step": s, "n_tokens": 9, "layers": layers}) + "\n"
                                                 for s in (0, 50)))
    res = write_table([sweep, pre], tmp_path / "t", plot=False)
    err = capsys.readouterr().err
    assert f"skipping {sweep / 'seed_3'}" in err and "unfinished run (finetune.json: finished false, stopped at " \
        "step 10)" in err
    assert f"skipping {pre}" in err and "ends at step 50, the recipe has train.steps=100" in err
    (row,) = res["rows"]
    assert row["seeds"] == [1, 2] and row["steps"] == [20]
    assert row["linearity"]["before"]["values"] == pytest.approx([0.85, 0.85])  # seed 3 not averaged in
    assert len(res["skipped"]) == 2
    assert main([str(sweep), "--strict", "--no-plot", "--out", str(tmp_path / "t2")]) == 2
    assert "unfinished run" in capsys.readouterr().err
    # the same pretraining run once it reached train.steps is summarized
    (pre / "linearity.jsonl").write_text((pre / "linearity.jsonl").read_text().replace('"step": 50', '"step": 100'))
    assert write_table([pre], tmp_path / "t3", plot=False)["rows"][0]["task"] == "pretraining"


def test_table_json_is_strict_when_a_seed_lacks_a_metric(tmp_path):
    """A seed without val/f1 (and a block whose linearity is NaN) gives null in the JSON, never NaN."""
    from linreg.finetune.table import write_table

    _fake_run(tmp_path / "seed_1", "m", "boolq", 1, [0.8, float("nan")], [0.9, 0.96], 0.7)
    _fake_run(tmp_path / "seed_2", "m", "boolq", 2, [0.82, 0.88], [0.95, 0.97], 0.8)
    metrics = tmp_path / "seed_2" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace(', "val/f1": 0.5', ""))
    write_table([tmp_path], tmp_path / "t", plot=False)
    text = (tmp_path / "t" / "finetune_table.json").read_text()

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name} in the table")

    (row,) = json.loads(text, parse_constant=refuse)["rows"]
    assert row["val"]["val/f1"]["values"] == [0.5, None] and row["val"]["val/f1"]["mean"] == 0.5
    assert row["linearity"]["layers_before"] == [pytest.approx(0.81), None]
    assert row["linearity"]["before"]["values"] == pytest.approx([0.8, 0.85])  # NaN blocks left out of means


def test_finish_run_marks_only_completed_runs_finished(tmp_path):
    """finish_run / run_completed on the training loop's RunResult: a run stopped by a signal (or short of
    train.steps) stays unfinished and the line says how to continue; a completed one is marked finished."""
    from types import SimpleNamespace

    from linreg.finetune.sweep import finish_run, run_completed
    from linreg.train.loop import RunResult

    run = tmp_path / "seed_1"
    _fake_run(run, "m", "boolq", 1, [0.8, 0.9], [0.9, 0.96], 0.7, finished=False)
    recipe = SimpleNamespace(run_dir=run, train=SimpleNamespace(steps=20))
    for result in (RunResult(run, final_step=10, interrupted=True), RunResult(run, final_step=20, interrupted=True),
                   RunResult(run, final_step=12)):
        assert not run_completed(recipe, result)
        line = finish_run(recipe, result)
        assert f"after step {result.final_step} of 20" in line and "--resume auto" in line
        info = json.loads((run / "finetune.json").read_text())
        assert info["finished"] is False and info["final_step"] == result.final_step and "val" not in info
    done = RunResult(run, final_step=20)
    assert run_completed(recipe, done)
    line = finish_run(recipe, done)
    info = json.loads((run / "finetune.json").read_text())
    assert info["finished"] is True and info["final_step"] == 20 and info["val"]["val/accuracy"] == 0.7
    assert "linearity (mean over blocks) 0.8500 -> 0.9300" in line


def test_table_refuses_runs_of_different_lengths(tmp_path):
    from linreg.errors import DataError
    from linreg.finetune.table import find_runs, read_run, summarize

    _fake_run(tmp_path / "seed_1", "m", "boolq", 1, [0.8, 0.9], [0.9, 0.96], 0.7, steps=20)
    _fake_run(tmp_path / "seed_2", "m", "boolq", 2, [0.82, 0.88], [0.95, 0.97], 0.8, steps=40)
    with pytest.raises(DataError, match=r"runs end at different steps \[20, 40\]"):
        summarize([read_run(p) for p in find_runs([tmp_path])])


@pytest.mark.slow  # imports `datasets` (seconds)
def test_hub_code_path_on_a_local_dataset_folder(tmp_path, monkeypatch):
    """The `datasets.load_dataset` route of the hub data sets, on local folders laid out like the hub repos
    (aps/super_glue: one configuration per task, declared in the README; Anthropic/hh-rlhf: data_dir
    subsets with train/test files)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    sg = tmp_path / "super_glue"
    write_jsonl(sg / "boolq" / "train.jsonl", [{"question": "q1", "passage": "p1", "idx": 0, "label": 1},
                                               {"question": "q2", "passage": "p2", "idx": 1, "label": 0}])
    write_jsonl(sg / "boolq" / "validation.jsonl", [{"question": "q3", "passage": "p3", "idx": 0, "label": -1}])
    write_jsonl(sg / "cb" / "train.jsonl", [{"premise": "a", "hypothesis": "b", "idx": 0, "label": 2}])
    write_jsonl(sg / "cb" / "validation.jsonl", [{"premise": "c", "hypothesis": "d", "idx": 0, "label": 0}])
    (sg / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
        f"  - split: validation\n    path: {c}/validation.jsonl\n" for c in ("boolq", "cb")) + "---\n")
    d = load_task_data(opts(dataset="cb", hf=str(sg)), "classification")
    assert d.train[0].text == "question: b\npassage: a" and d.train[0].label == 2
    assert d.sources["validation"] == f"hf:{sg}/cb:validation"
    with pytest.raises(DataError, match=rf"{sg}/boolq:validation row 0: .*negative labels"):
        load_task_data(opts(dataset="boolq", hf=str(sg)), "classification")

    hh = tmp_path / "hh"
    for sub in ("helpful-base", "helpful-online"):
        write_jsonl(hh / sub / "train.jsonl", [{"chosen": f"{sub} good {i}", "rejected": f"{sub} bad {i}"}
                                               for i in range(3)])
        write_jsonl(hh / sub / "test.jsonl", [{"chosen": f"{sub} good", "rejected": f"{sub} bad"}])
    d = load_task_data(opts(dataset="hh-helpful", hf=str(hh), hf_data_dirs=["helpful-base", "helpful-online"]),
                       "reward")
    assert len(d.train) == 6 and len(d.validation) == 2  # HH validates on its test split
    assert d.validation[1].chosen == "helpful-online good"
    d = load_task_data(opts(dataset="hh-helpful", hf=str(hh)), "reward")  # default subset: helpful-base
    assert len(d.train) == 3
    with pytest.raises(DataError, match="could not load .* Offline\\? Point task.options.train_file"):
        load_task_data(opts(dataset="hh-helpful", hf=str(tmp_path / "missing")), "reward")
