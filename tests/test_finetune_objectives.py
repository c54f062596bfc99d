"""The classification and reward objectives on tiny models, in this process (one rank, no DeepSpeed):
batched, padded evaluation and training loss against a direct one-example-at-a-time computation in
float64, and the tracking batches."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from linreg.finetune.tasks import synthetic_rows
from tests.finetune_helpers import REPO, train_tokenizer, write_jsonl

pytestmark = pytest.mark.slow  # builds Transformers models (seconds on a loaded CPU)

TINY = ["model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=2",
        "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2", "train.micro_batch_size=3",
        "train.seq_len=40", "track.blocks=7"]


def _objective(tmp_path: Path, recipe: str, sets: list[str]):
    from linreg.config import load_recipe
    from linreg.train.objectives import RunContext, objective_class

    r = load_recipe(REPO / "recipes" / recipe, TINY + sets + [f"output_dir={tmp_path / 'run'}"])
    r.run_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(recipe=r, run_dir=r.run_dir, rank=0, world_size=1, device=torch.device("cpu"),
                     barrier=lambda: None, log=print)
    obj = objective_class(r.task.kind)(ctx)
    obj.prepare()
    model = obj.build_model()
    return obj, model


def test_classification_cb_three_classes_matches_direct_computation(tmp_path):
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    words = ["it rained", "the dog ran", "Tom was home", "the sky is blue", "we ate cake", "a long story about"]
    rows = [{"premise": " ".join(rng.choice(words, rng.integers(1, 6))), "hypothesis": str(rng.choice(words)),
             "label": ["entailment", "contradiction", "neutral"][i % 3]} for i in range(23)]
    path = write_jsonl(tmp_path / "cb.jsonl", rows)
    tok = train_tokenizer([r["premise"] + " " + r["hypothesis"] for r in rows] + ["question: passage:"],
                          tmp_path / "tok", vocab_size=300)
    obj, model = _objective(tmp_path, "finetune-tiny-classification.yaml", [
        "task.options={dataset: cb, train_file: %s, validation_file: %s}" % (path, path), f"tokenizer.path={tok}"])
    assert obj.data.label_names == ["entailment", "contradiction", "neutral"]
    assert model.config.num_labels == 3 and model.config.pad_token_id == obj.tokenizer.pad_token_id
    got = obj.evaluate(model)

    model.eval()
    preds, nll = [], []
    with torch.no_grad():
        for ids, y in zip(obj.val_ids, obj.val_labels):  # one example at a time: no padding at all
            logits = model(input_ids=torch.tensor(ids, dtype=torch.long)[None]).logits[0].double()
            preds.append(int(logits.argmax()))
            nll.append(float(torch.logsumexp(logits, 0) - logits[y]))
    y = obj.val_labels
    assert got["val/accuracy"] == pytest.approx(accuracy_score(y, preds), abs=1e-12)
    assert got["val/f1"] == pytest.approx(f1_score(y, preds, average="macro", labels=[0, 1, 2], zero_division=0),
                                          abs=1e-12)
    assert got["val/loss"] == pytest.approx(float(np.mean(nll)), rel=1e-5)
    # the training loss of a padded micro batch equals the mean of the per-example losses
    idx = np.array([3, 0, 7])
    batch = obj.collate(idx)
    assert batch["input_ids"].shape[0] == 3 and (batch["attention_mask"].sum(1).numpy() == [len(obj.train_ids[i]) for i in idx]).all()
    total, parts = obj.loss(model, batch, None)
    with torch.no_grad():
        ref = np.mean([float(torch.nn.functional.cross_entropy(
            model(input_ids=torch.tensor(obj.train_ids[i], dtype=torch.long)[None]).logits.double(),
            torch.tensor([obj.train_labels[i]]))) for i in idx])
    assert total.item() == pytest.approx(ref, rel=1e-5)
    # tracking: the first track.blocks validation sequences, padding masked out, the same list every call
    tb = obj.tracking_batches()
    assert sum(int(b["attention_mask"].sum()) for b in tb) == sum(len(s) for s in obj.val_ids[:7])
    assert obj.tracking_batches() is tb


def test_reward_matches_direct_computation_with_eos_padding(tmp_path):
    pairs = synthetic_rows("reward", 30, 3)
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    tok = train_tokenizer([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], tmp_path / "tok",
                          vocab_size=300, pad=False)
    obj, model = _objective(tmp_path, "finetune-tiny-reward.yaml", [
        "task.options={dataset: jsonl, train_file: %s, val_fraction: 0.4}" % path, f"tokenizer.path={tok}"])
    assert obj.tokenizer.pad_token == "</s>" and model.config.num_labels == 1  # no pad token: pads with EOS
    assert obj.tokenizer.truncation_side == "left"
    got = obj.evaluate(model)

    model.eval()

    def reward(ids) -> float:
        with torch.no_grad():
            return float(model(input_ids=torch.tensor(ids, dtype=torch.long)[None]).logits[0, 0].double())

    rc = [reward(s) for s in obj.val_chosen]
    rr = [reward(s) for s in obj.val_rejected]
    d = [a - b for a, b in zip(rc, rr)]
    assert len(d) == 12
    assert got["val/loss"] == pytest.approx(np.mean([math.log1p(math.exp(-x)) for x in d]), rel=1e-5)
    assert got["val/accuracy"] == pytest.approx(np.mean([x > 0 for x in d]), abs=1e-12)
    assert got["val/margin"] == pytest.approx(np.mean(d), rel=1e-4, abs=1e-6)
    idx = np.array([1, 4])
    total, parts = obj.loss(model, obj.collate(idx), None)
    dt = [reward(obj.train_chosen[i]) - reward(obj.train_rejected[i]) for i in idx]
    assert total.item() == pytest.approx(np.mean([math.log1p(math.exp(-x)) for x in dt]), rel=1e-5)
    assert parts["train/accuracy"].item() == pytest.approx(np.mean([x > 0 for x in dt]))
    tb = obj.tracking_batches()  # chosen and rejected of the first pairs, interleaved
    expect = [obj.val_chosen[0], obj.val_rejected[0], obj.val_chosen[1], obj.val_rejected[1]]
    first = tb[0]["input_ids"][:, :].numpy()
    for row, seq in zip(first, expect):
        assert (row[:len(seq)] == seq).all()
