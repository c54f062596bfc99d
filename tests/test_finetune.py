"""Fine-tuning end to end through the real entry point (`python launch/finetune.py`, the training loop with
a DeepSpeed engine): classification and reward recipes on tiny models and local JSONL written here, two
seeds each in one command, the linearity deltas and the table; bad data reported with file and line."""

from __future__ import annotations

import json
import statistics

import pytest

from linreg.finetune.tasks import synthetic_rows
from tests.finetune_helpers import read_jsonl, run_finetune, sets, train_tokenizer, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls-data")
    train = write_jsonl(d / "train.jsonl", synthetic_rows("classification", 400, 0))
    val = write_jsonl(d / "val.jsonl", synthetic_rows("classification", 48, 1))
    tok = train_tokenizer([r["text"] for r in read_jsonl(train)], d / "tokenizer", vocab_size=400)
    return {"train": train, "val": val, "tok": tok}


def _cls_args(data, out):
    return ["--recipe", "recipes/finetune-tiny-classification.yaml", "--output-dir", str(out),
            *sets("task.options.dataset=jsonl", f"task.options.train_file={data['train']}",
                  f"task.options.validation_file={data['val']}", "task.options.name=feelings",
                  f"tokenizer.path={data['tok']}", "train.steps=40", "track.every=20", "train.eval_every=20")]


@pytest.fixture(scope="module")
def cls_sweep(tmp_path_factory, cache, cls_data):
    out = tmp_path_factory.mktemp("cls-sweep")
    proc = run_finetune(_cls_args(cls_data, out) + ["--seeds", "1,2"], cache)
    return out, proc


def _metric(run_dir, key):
    return {r["step"]: r[key] for r in read_jsonl(run_dir / "metrics.jsonl") if key in r}


def _layer_mean(rec, metric):
    vals = [layer[metric] for layer in rec["layers"]]
    return sum(vals) / len(vals)


def _check_table(out, seeds, task, kind):
    """The table's numbers recomputed from each run's linearity.jsonl."""
    table = json.loads((out / "finetune_table.json").read_text())
    (row,) = table["rows"]
    assert row["task"] == task and row["kind"] == kind and row["seeds"] == seeds
    for metric in ("linearity", "linearity_wo_residual"):
        deltas = []
        for s in seeds:
            recs = read_jsonl(out / f"seed_{s}" / "linearity.jsonl")
            assert [r["step"] for r in recs] == [0, 20, 40]  # before, during, after
            deltas.append(_layer_mean(recs[-1], metric) - _layer_mean(recs[0], metric))
        assert row[metric]["delta"]["values"] == pytest.approx(deltas, abs=1e-12)
        assert row[metric]["delta"]["mean"] == pytest.approx(statistics.fmean(deltas), abs=1e-12)
        assert row[metric]["delta"]["std"] == pytest.approx(statistics.stdev(deltas), abs=1e-12)
    md = (out / "finetune_table.md").read_text()
    assert f"| {task} | 2 | 40 |" in md and "±" in md
    assert (out / "finetune_table.png").stat().st_size > 1000
    return row


def test_classification_two_seeds(cls_sweep):
    out, proc = cls_sweep
    for s in (1, 2):
        run = out / f"seed_{s}"
        lo = _metric(run, "loss/task")
        assert sorted(lo) == list(range(1, 41))
        first = statistics.fmean(lo[i] for i in (1, 2, 3, 4, 5))
        last = statistics.fmean(lo[i] for i in (36, 37, 38, 39, 40))
        assert last < first - 0.2, (s, first, last)  # task loss goes down
        acc = _metric(run, "val/accuracy")
        assert sorted(acc) == [20, 40] and 0.0 <= acc[40] <= 1.0 and set(_metric(run, "val/f1")) == {20, 40}
        info = json.loads((run / "finetune.json").read_text())
        assert info["finished"] and info["final_step"] == 40 and info["seed"] == s and info["task"] == "feelings"
        assert f"seed {s}:" in proc.stdout and "linearity (mean over blocks)" in proc.stdout
    row = _check_table(out, [1, 2], "feelings", "classification")
    assert row["model"] == "mistral-d64-L3 (random init)"
    assert "val/accuracy" in row["val"] and "val/f1" in row["val"]
    assert "| feelings |" in proc.stdout  # the table is printed at the end


def test_classification_export_loads(cls_sweep):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = cls_sweep
    model = AutoModelForSequenceClassification.from_pretrained(out / "seed_1" / "hf")
    tok = AutoTokenizer.from_pretrained(out / "seed_1" / "hf")
    assert model.config.num_labels == 2 and model.config.pad_token_id == tok.pad_token_id
    enc = tok(["question: is Tom happy?\npassage: Tom felt glad at the park."], return_tensors="pt")
    assert model(**enc).logits.shape == (1, 2)


def test_rerun_skips_finished_seeds_and_rewrites_table(cls_sweep, cls_data, cache):
    out, _ = cls_sweep
    before = (out / "finetune_table.json").read_text()
    (out / "finetune_table.json").unlink()
    proc = run_finetune(_cls_args(cls_data, out) + ["--seeds", "1,2"], cache)
    assert proc.stdout.count("already finished; skipped") == 2
    assert json.loads((out / "finetune_table.json").read_text())["rows"] == json.loads(before)["rows"]


def test_sigterm_stops_the_sweep_unfinished_and_the_rerun_resumes(tmp_path, cache, cls_data):
    """Preemption during a sweep: the loop saves and returns early; the seed stays unfinished, no further seed
    starts, no table is written, exit status 143; the rerun resumes that seed from its checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    from tests.finetune_helpers import FINETUNE
    from tests.train_helpers import REPO, env_for

    out = tmp_path / "preempted"
    run1 = out / "seed_1"
    proc = subprocess.Popen([sys.executable, str(FINETUNE), *_cls_args(cls_data, out), "--seeds", "1,2"], cwd=REPO,
                            env=env_for(cache, {"LINREG_TEST_STEP_DELAY": "0.3"}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run1 / "metrics.jsonl").is_file() and max(_metric(run1, "loss/task"), default=0) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stdout[-3000:] + stderr[-3000:]
    info = json.loads((run1 / "finetune.json").read_text())
    stopped = info["final_step"]
    assert info["finished"] is False and 3 <= stopped < 40
    assert "stopped by a signal after step" in stdout and "--resume auto" in stdout
    assert "seeds 2 not started" in stdout
    assert not (out / "seed_2").exists() and not (out / "finetune_table.json").exists()
    proc2 = run_finetune(_cls_args(cls_data, out) + ["--seeds", "1"], cache)
    assert f"resumed from step {stopped}" in proc2.stdout
    info = json.loads((run1 / "finetune.json").read_text())
    assert info["finished"] is True and info["final_step"] == 40
    assert json.loads((out / "finetune_table.json").read_text())["rows"][0]["seeds"] == [1]


def test_two_ranks_two_seeds_match_one_rank(tmp_path, cache, cls_data, cls_sweep):
    """Both seeds on 2 CPU ranks (ZeRO-2 over gloo, the process group reused by the second seed): the same
    losses, validation metrics (evaluation split over the ranks) and linearity (tracking tokens split over
    the ranks) as on one rank."""
    ref, _ = cls_sweep
    out = tmp_path / "two-ranks"
    run_finetune(_cls_args(cls_data, out) + ["--seeds", "1,2"], cache, ranks=2)
    for s in (1, 2):
        a, b = ref / f"seed_{s}", out / f"seed_{s}"
        la, lb = _metric(a, "loss/task"), _metric(b, "loss/task")
        assert la.keys() == lb.keys()
        for k in la:
            assert lb[k] == pytest.approx(la[k], rel=1e-4, abs=1e-5), (s, k)
        for key in ("val/accuracy", "val/f1", "val/loss"):
            va, vb = _metric(a, key), _metric(b, key)
            assert vb.keys() == va.keys() == {20, 40}
            for k in va:
                assert vb[k] == pytest.approx(va[k], rel=1e-4, abs=1e-6), (s, key, k)
        ra, rb = read_jsonl(a / "linearity.jsonl"), read_jsonl(b / "linearity.jsonl")
        for x, y in zip(ra, rb):
            assert x["step"] == y["step"] and x["n_tokens"] == y["n_tokens"]
            for lx, ly in zip(x["layers"], y["layers"]):
                assert ly["linearity"] == pytest.approx(lx["linearity"], abs=1e-5)
    assert (out / "finetune_table.json").is_file()


def test_reward_two_seeds(tmp_path, cache):
    pairs = synthetic_rows("reward", 300, 0)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    tok = train_tokenizer([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], tmp_path / "tok",
                          vocab_size=400)
    out = tmp_path / "sweep"
    proc = run_finetune(["--recipe", "recipes/finetune-tiny-reward.yaml", "--output-dir", str(out), "--seeds", "1,2",
                         *sets("task.options.dataset=jsonl", f"task.options.train_file={data}",
                               "task.options.val_fraction=0.2", f"tokenizer.path={tok}", "train.steps=40",
                               "track.every=20", "train.eval_every=20", "optimizer.lr=1e-3")], cache)
    for s in (1, 2):
        lo = _metric(out / f"seed_{s}", "loss/reward")
        assert lo[1] == pytest.approx(0.693, abs=0.15)  # log 2 at the start: rewards close to each other
        assert statistics.fmean(lo[i] for i in (36, 37, 38, 39, 40)) < 0.5 * statistics.fmean(lo[i] for i in (1, 2, 3))
        acc = _metric(out / f"seed_{s}", "val/accuracy")
        assert acc[40] >= 0.9
    row = _check_table(out, [1, 2], "pairs", "reward")
    assert "val/accuracy" in row["val"] and "val/margin" in row["val"]
    assert "| pairs |" in proc.stdout


def test_bad_jsonl_line_reported_by_the_launcher(tmp_path, cache, cls_data):
    bad = tmp_path / "bad.jsonl"
    lines = cls_data["train"].read_text().splitlines()[:5]
    lines[3] = lines[3].replace('"label"', '"labl"')
    bad.write_text("\n".join(lines) + "\n")
    args = _cls_args(cls_data, tmp_path / "out")
    args[args.index(f"task.options.train_file={cls_data['train']}")] = f"task.options.train_file={bad}"
    proc = run_finetune(args, cache, check=False)
    assert proc.returncode == 2
    assert f"error: {bad}:4: missing field 'label'" in proc.stderr
