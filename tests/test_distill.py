"""Distillation through the real training loop (1 rank, ``python launch/distill.py``) on real text: a teacher
trained here on the shared TinyStories sample, 2 of its 4 blocks replaced by fitted linear maps, distilled;
then ``linreg analyze --checkpoints`` on the distillation run."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from linreg.hidden import BlockCapture
from linreg.pruning import load_pruned, save_pruned
from linreg.pruning.distill import layerwise_mse
from linreg.pruning.perplexity import perplexity
from linreg.pruning.prune import prune_model
from linreg.pruning.surgery import provenance
from tests.tiny_models import REPO, TINYSTORIES, pack, save_model, tiny_model, train_lm, train_tokenizer
from tests.train_helpers import env_for, losses

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
needs_text = pytest.mark.skipif(not TINYSTORIES.is_file(), reason=f"shared TinyStories sample not found at {TINYSTORIES}")
SEQ = 64


def held_out_mse(student, teacher, blocks) -> float:
    kept = provenance(student)["kept_layers"]
    pairs = [(j + 1, kept[j] + 1) for j in range(len(kept))]
    ids = torch.from_numpy(blocks)
    with torch.no_grad(), BlockCapture(teacher) as tc, BlockCapture(student) as sc:
        teacher(input_ids=ids)
        student(input_ids=ids)
        return float(layerwise_mse(list(sc.states), list(tc.states), pairs))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not TINYSTORIES.is_file():
        pytest.skip(f"shared TinyStories sample not found at {TINYSTORIES}")
    root = tmp_path_factory.mktemp("distill")
    paras = [p for p in TINYSTORIES.read_text().split("\n\n") if p.strip()]
    cut = int(len(paras) * 0.85)
    train_txt = root / "train.txt"
    train_txt.write_text("\n\n".join(paras[:cut]) + "\n")
    held_txt = "\n\n".join(paras[cut:])
    tok = train_tokenizer([train_txt.read_text()], vocab_size=384)
    train_blocks = pack(tok, train_txt.read_text(), SEQ)
    held = pack(tok, held_txt, SEQ)[:96]
    teacher = tiny_model("mistral", d=48, layers=4, vocab=384, seed=0)
    train_lm(teacher, train_blocks, steps=120, batch=8, lr=3e-3)
    save_model(teacher, tok, root / "teacher")
    student = copy.deepcopy(teacher)
    # a small calibration set (192 tokens for d = 48): the least-squares maps overfit it, which leaves the
    # distillation (thousands of tokens) something clear to win back
    cal = [{"input_ids": torch.from_numpy(train_blocks[:3])}]
    report = prune_model(student, cal, 2, select="linearity", replace="linear")
    save_pruned(student, root / "student", tokenizer=tok)
    before = {"mse": held_out_mse(student, teacher, held),
              "ppl": perplexity(student, held, progress=False)["perplexity"],
              "teacher_ppl": perplexity(teacher, held, progress=False)["perplexity"]}
    run = root / "run"
    sets = [f"task.options.teacher={root / 'teacher'}", f"task.options.student={root / 'student'}",
            f"data.sources=[{{path: {train_txt}}}]", "data.val_docs=40", f"train.seq_len={SEQ}", "train.steps=30",
            "train.log_every=1", "train.eval_every=15", "train.eval_blocks=8", "optimizer.lr=1e-3",
            "track.every=15", "track.blocks=4", "checkpoint.save_every=15", "checkpoint.keep_last=3"]
    cmd = [sys.executable, str(REPO / "launch" / "distill.py"), "--recipe", str(REPO / "recipes" / "distill-tiny.yaml"),
           "--output-dir", str(run), "--resume", "none"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=env_for(root / "cache"), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"distillation failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return {"root": root, "teacher": teacher, "student": student, "report": report, "held": held, "before": before,
            "run": run, "proc": proc, "tok": tok}


@needs_text
def test_distillation_lowers_layerwise_mse_and_perplexity(setup):
    before = setup["before"]
    assert before["ppl"] > before["teacher_ppl"]  # the cut costs something to win back
    distilled = load_pruned(setup["run"] / "hf").eval()
    after = {"mse": held_out_mse(distilled, setup["teacher"], setup["held"]),
             "ppl": perplexity(distilled, setup["held"], progress=False)["perplexity"]}
    print(f"held-out: teacher ppl {before['teacher_ppl']:.3f}; replaced ppl {before['ppl']:.3f} mse {before['mse']:.5f}; "
          f"distilled ppl {after['ppl']:.3f} mse {after['mse']:.5f}")
    assert after["mse"] < before["mse"]
    assert after["ppl"] < before["ppl"]
    # only the linear replacements trained
    s_state = setup["student"].state_dict()
    d_state = distilled.state_dict()
    replaced = setup["report"]["replaced"]
    changed = {k for k in s_state if not torch.equal(s_state[k], d_state[k])}
    assert changed and all(any(k.startswith(f"model.layers.{i}.") for i in replaced) for k in changed), changed
    mse_log = losses(setup["run"], "loss/mse")
    assert sorted(mse_log) == list(range(1, 31))
    val = losses(setup["run"], "val/mse")
    assert sorted(val) == [15, 30] and all(np.isfinite(list(val.values())))
    info = json.loads((setup["run"] / "hf" / "linreg_pruning.json").read_text())
    assert info["linear"] == replaced and info["distilled_from"].endswith("teacher")


@needs_text
def test_analyze_checkpoints_of_the_distillation_run(setup, tmp_path):
    from linreg.analyze import main

    run = setup["run"]
    text = str(setup["root"] / "train.txt")
    common = ["--data", text, "--seq-len", str(SEQ), "--max-tokens", "1024", "--no-progress"]
    assert main(["--checkpoints", str(run), "--out", str(tmp_path / "a"), *common]) == 0
    doc = json.loads((tmp_path / "a" / "linearity.json").read_text())
    assert [c["step"] for c in doc["checkpoints"]] == [15, 30]
    assert doc["architecture_from"] == str(run / "hf")
    for c in doc["checkpoints"]:
        for i in setup["report"]["replaced"]:
            assert c["layers"][i]["linearity"] == pytest.approx(1.0, abs=1e-9)
    assert (tmp_path / "a" / "linearity_dynamics.png").is_file()
    # the step-30 checkpoint holds the exported weights
    final = load_pruned(run / "hf")
    from linreg.analyze import load_checkpoint_state

    state = load_checkpoint_state(run / "checkpoints" / "step_30")
    for k, v in final.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    # without the export, the architecture comes from the recipe's student folder
    (run / "hf").rename(run / "hf_away")
    try:
        assert main(["--checkpoints", str(run), "--out", str(tmp_path / "b"), *common]) == 0
        doc_b = json.loads((tmp_path / "b" / "linearity.json").read_text())
        assert doc_b["architecture_from"].startswith("task.options.student")
        assert doc_b["checkpoints"][1]["layers"] == doc["checkpoints"][1]["layers"]
    finally:
        (run / "hf_away").rename(run / "hf")
    assert main(["--checkpoints", str(run), "--from-log", "--out", str(tmp_path / "c")]) == 0
    log = json.loads((tmp_path / "c" / "linearity.json").read_text())
    assert [c["step"] for c in log["checkpoints"]] == [0, 15, 30]


def test_objective_prunes_in_place_and_its_loss_matches_a_float64_reference(tmp_path, monkeypatch):
    """DistillObjective without the loop: real data preparation, the student cut from the teacher on calibration
    blocks, gradients only on the linear maps, and the loss against a float64 formula written here."""
    from linreg.config import load_recipe
    from linreg.errors import ConfigError
    from linreg.hidden import find_blocks
    from linreg.pruning.distill import DistillObjective
    from linreg.pruning.linear_block import LinearBlock
    from linreg.train.objectives import RunContext
    from tests.tiny_models import story_text

    tok = train_tokenizer([story_text(200)])
    save_model(tiny_model("llama", d=32, layers=4, vocab=320, seed=3), tok, tmp_path / "teacher")
    sets = [f"task.options.teacher={tmp_path / 'teacher'}", "task.options.remove=2", "task.options.select=cosine",
            "task.options.calibration_blocks=8", "task.options.lm_weight=0.5", "data.embedded_docs=300",
            "data.val_docs=20", f"data.cache_dir={tmp_path / 'cache'}", "train.seq_len=32", "train.micro_batch_size=4",
            "train.eval_blocks=10"]
    recipe = load_recipe(REPO / "recipes" / "distill-tiny.yaml", sets)
    ctx = RunContext(recipe=recipe, run_dir=tmp_path / "run", rank=0, world_size=1, device=torch.device("cpu"),
                     barrier=lambda: None, log=lambda msg: None)
    obj = DistillObjective(ctx)
    obj.prepare()
    assert recipe.tokenizer.path == str(tmp_path / "teacher")  # the teacher's vocabulary
    student = obj.build_model()
    obj.teacher.to(torch.device("cpu"))
    linear = [j for j, b in enumerate(find_blocks(student)) if isinstance(b, LinearBlock)]
    assert len(linear) == 2 and obj.prune_report["score"] == "block_influence"
    assert {n for n, p in student.named_parameters() if p.requires_grad} == {
        f"model.layers.{j}.{w}" for j in linear for w in ("weight", "bias")}
    batch = obj.collate(np.arange(4))
    total, parts = obj.loss(student, batch, None)
    total.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in student.parameters() if not p.requires_grad)
    # float64 reference of the loss
    ids = batch["input_ids"]
    with torch.no_grad(), BlockCapture(obj.teacher) as tc, BlockCapture(student) as sc:
        obj.teacher(input_ids=ids)
        logits = student(input_ids=ids).logits.double()
        t_states, s_states = list(tc.states), list(sc.states)
    kept = provenance(student)["kept_layers"]
    rel = [((s_states[j + 1].double() - t_states[kept[j] + 1].double()) ** 2).sum()
           / (t_states[kept[j] + 1].double() ** 2).sum() for j in range(len(kept))]
    mse = torch.stack(rel).mean()
    logp = torch.log_softmax(logits[:, :-1], -1)
    lm = -logp.gather(-1, ids[:, 1:, None]).mean()
    assert float(parts["loss/mse"].detach()) == pytest.approx(float(mse), rel=1e-5)
    assert float(parts["loss/lm"].detach()) == pytest.approx(float(lm), rel=1e-5)
    assert float(total.detach()) == pytest.approx(float(mse + 0.5 * lm), rel=1e-5)
    ev = obj.evaluate(student)
    assert set(ev) == {"val/loss", "val/perplexity", "val/mse"} and ev["val/mse"] > 0
    # validation against a one-block-at-a-time float64 reference (the last micro batch is a partial one)
    val = [torch.tensor(np.asarray(obj.data.val[i]), dtype=torch.long)[None]
           for i in range(min(recipe.train.eval_blocks, len(obj.data.val)))]
    assert len(val) % recipe.train.micro_batch_size != 0
    nll, rel_mse = [], []
    with torch.no_grad():
        for ids in val:
            with BlockCapture(obj.teacher) as tc, BlockCapture(student) as sc:
                obj.teacher(input_ids=ids)
                logits = student(input_ids=ids).logits.double()
            nll.append(float(-torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()))
            rel_mse.append(float(torch.stack([
                ((sc.states[j + 1].double() - tc.states[kept[j] + 1].double()) ** 2).sum()
                / (tc.states[kept[j] + 1].double() ** 2).sum() for j in range(len(kept))]).mean()))
    assert ev["val/loss"] == pytest.approx(float(np.mean(nll)), rel=1e-5)
    assert ev["val/perplexity"] == pytest.approx(math.exp(float(np.mean(nll))), rel=1e-5)
    assert ev["val/mse"] == pytest.approx(float(np.mean(rel_mse)), rel=1e-5)
    # a rank whose scores chose other blocks than rank 0's (a near tie) takes rank 0's and fits them itself
    import linreg.pruning.distill as distill_mod

    other = [i for i in range(4) if i not in obj.prune_report["chosen"]]
    monkeypatch.setattr(distill_mod, "rank0_choice", lambda chosen: list(other))
    student2 = obj.build_model()
    assert obj.prune_report["chosen"] == other and obj.prune_report["chosen_by_rank0"]
    assert obj.prune_report["score"] == "block_influence"
    assert [j for j, b in enumerate(find_blocks(student2)) if isinstance(b, LinearBlock)] == sorted(other)
    bad = load_recipe(REPO / "recipes" / "distill-tiny.yaml", sets + ["task.options.mse_wieght=1"])
    with pytest.raises(ConfigError, match="mse_wieght"):
        DistillObjective(RunContext(recipe=bad, run_dir=tmp_path, rank=0, world_size=1, device=torch.device("cpu"),
                                    barrier=lambda: None, log=print))


def _rank0_choice_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from linreg.pruning.distill import rank0_choice

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        got = rank0_choice([rank, 10 + rank])  # every rank proposes its own blocks
        with open(f"{out}.{rank}", "w") as f:
            json.dump(got, f)
    finally:
        dist.destroy_process_group()


def test_rank0_choice_is_broadcast_to_every_rank(tmp_path):
    """Two gloo ranks propose different cuts; both end up with rank 0's."""
    import torch.multiprocessing as mp

    from linreg.pruning.distill import rank0_choice

    assert rank0_choice([3, 1]) == [3, 1]  # no process group: the list itself
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank0_choice_worker, args=(2, init, str(tmp_path / "got")), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"got.{r}").read_text()) for r in (0, 1)] == [[0, 10], [0, 10]]
