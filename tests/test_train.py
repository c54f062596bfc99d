"""The pretraining loop end to end, with real DeepSpeed engines (1 rank, and 2 CPU ranks over gloo)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.train_helpers import FAST, final_weights, losses, run_pretrain

pytestmark = pytest.mark.slow

STEPS = 24
BASE = FAST + [f"train.steps={STEPS}", "checkpoint.save_every=8", "checkpoint.keep_last=5"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    """24 uninterrupted steps on one rank: the reference for every other run."""
    out = tmp_path_factory.mktemp("straight")
    proc = run_pretrain(out, BASE, cache)
    return out, proc


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, cache, straight):
    out = tmp_path_factory.mktemp("two-ranks")
    proc = run_pretrain(out, BASE + ["train.deepspeed_config=ds_configs/zero2.json"], cache, ranks=2)
    return out, proc


def _assert_same_run(a, b, rtol=1e-4, wtol=(1e-3, 1e-5)):
    """Same losses at every step (relative ``rtol``) and the same final weights (``wtol`` = rtol, atol;
    (0, 0) for bitwise)."""
    la, lb = losses(a), losses(b)
    assert sorted(la) == list(range(1, STEPS + 1)) == sorted(lb)
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=rtol), f"step {s}: {la[s]} vs {lb[s]}"
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=wtol[0], atol=wtol[1], msg=lambda m: f"{k}: {m}")


EXACT = dict(rtol=1e-6, wtol=(1e-6, 1e-7))  # resume on the same rank count: the same computation


def test_loss_goes_down_and_outputs_exist(straight):
    out, proc = straight
    lm = losses(out, "loss/lm")
    first = sum(lm[s] for s in (1, 2, 3)) / 3
    last = sum(lm[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < first - 0.5, (first, last)
    assert "per-layer linearity" in proc.stdout and "Hugging Face export" in proc.stdout
    # exported model loads with the plain Transformers class and computes a finite loss
    from transformers import AutoTokenizer, MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(out / "hf")
    tok = AutoTokenizer.from_pretrained(out / "hf")
    ids = tok("Once upon a time there was a little dog.", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    for step in (8, 16, 24):
        assert (out / "checkpoints" / f"step_{step}" / "COMPLETE").is_file()


def test_logged_lr_is_the_one_each_step_used(straight):
    """train/lr at step s is the learning rate of optimizer step s (warmup's first step: lr / warmup)."""
    from linreg.config import load_recipe
    from linreg.train.loop import lr_lambda
    from tests.train_helpers import REPO

    o = load_recipe(REPO / "recipes" / "tiny.yaml", BASE).optimizer
    f = lr_lambda(o.schedule, o.warmup_steps, STEPS, o.min_lr_ratio)
    logged = losses(straight[0], "train/lr")
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step, lr in logged.items():
        assert lr == pytest.approx(o.lr * f(step - 1), rel=1e-9), step
    assert logged[1] == pytest.approx(o.lr / o.warmup_steps)


def test_start_below_an_earlier_runs_checkpoints_is_refused(straight, cache):
    """Rolling back to step 8 in a folder that holds steps 16 and 24 would mix two runs: refused, nothing written."""
    out, _ = straight
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    proc = run_pretrain(out, BASE, cache, resume=str(out / "checkpoints" / "step_8"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "newer than a start from step 8: step_16, step_24" in proc.stderr and "--output-dir" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == before


def test_tensorboard_holds_linearity_and_loss_parts(straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = straight
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for metric in ("linearity", "linearity_wo_residual", "contribution_norm", "cosine"):
        for layer in range(3):
            assert f"{metric}/layer_{layer:02d}" in tags
    for tag in ("loss/total", "loss/lm", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s",
                "val/loss", "val/perplexity"):
        assert tag in tags, tag
    assert "linearity/profile" in acc.Tags()["images"]
    # the JSONL twin agrees with TensorBoard, value by value
    tb = {e.step: e.value for e in acc.Scalars("loss/lm")}
    js = losses(out, "loss/lm")
    assert tb.keys() == js.keys()
    for s in tb:
        assert tb[s] == pytest.approx(js[s], rel=1e-6)
    lines = [json.loads(x) for x in (out / "linearity.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 8, 16, 24]
    tb_lin = {e.step: e.value for e in acc.Scalars("linearity/layer_01")}
    for rec in lines:
        assert tb_lin[rec["step"]] == pytest.approx(rec["layers"][1]["linearity"], rel=1e-6)
        for layer in rec["layers"]:
            assert 0.0 <= layer["linearity"] <= 1.0 + 1e-9


def _tracked(run_dir):
    return [json.loads(x) for x in (run_dir / "linearity.jsonl").read_text().splitlines()]


def test_two_ranks_zero2_match_one_rank(straight, two_ranks):
    _assert_same_run(straight[0], two_ranks[0])
    # tracking: each rank measures its half of the held-out blocks, the accumulators are all-reduced, so
    # both runs score the same 8 x 64 tokens
    one, two = _tracked(straight[0]), _tracked(two_ranks[0])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 8, 16, 24]
    for a, b in zip(one, two):
        assert a["n_tokens"] == b["n_tokens"] == 8 * 64
        for la, lb in zip(a["layers"], b["layers"]):
            for metric in ("linearity", "linearity_wo_residual", "contribution_norm", "cosine"):
                assert la[metric] == pytest.approx(lb[metric], rel=1e-4, abs=1e-6), (a["step"], metric)


def test_regularized_runs_log_their_parts_and_mfu_zero1_two_ranks(tmp_path, cache):
    """The cosine recipe through real engines: the regularizer term is in the step and logged apart from
    the LM loss; MFU is logged against a stated peak; ZeRO-1 on 2 ranks gives 1 rank's losses."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import MistralConfig

    from linreg.model import flops_per_token

    sets = FAST + ["train.steps=6", "checkpoint.save_every=6", "train.peak_tflops=0.5", "track.every=6"]
    one, two = tmp_path / "cos1", tmp_path / "cos2"
    run_pretrain(one, sets, cache, recipe="recipes/tiny-cosine.yaml")
    run_pretrain(two, sets + ["train.deepspeed_config=ds_configs/zero1.json"], cache, ranks=2,
                 recipe="recipes/tiny-cosine.yaml")
    total, lm, reg = losses(one), losses(one, "loss/lm"), losses(one, "loss/regularizer")
    assert sorted(reg) == list(range(1, 7))
    for step in reg:
        assert 0 < reg[step] <= 0.5 * 2  # weight x mean(1 - cos), cos in [-1, 1]
        assert total[step] == pytest.approx(lm[step] + reg[step], rel=1e-6)
    for key in ("loss/total", "loss/lm", "loss/regularizer"):
        a, b = losses(one, key), losses(two, key)
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=1e-4), (key, step)
    acc = EventAccumulator(str(one / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("loss/regularizer")}
    assert tb.keys() == reg.keys() and all(tb[k] == pytest.approx(reg[k], rel=1e-6) for k in tb)
    # MFU = training FLOPs per token x tokens/s / peak; FLOPs per token counted here from the Linear layers
    cfg = MistralConfig.from_pretrained(one / "hf")
    d, L, T = cfg.hidden_size, cfg.num_hidden_layers, 64
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    linear = L * (d * d + 2 * d * kv + d * d + 3 * d * cfg.intermediate_size) + d * cfg.vocab_size
    norms = (2 * L + 1) * d  # counted with the non-embedding parameters: 6 FLOPs per token each too
    assert flops_per_token(cfg, T) == pytest.approx(6 * (linear + norms) + 12 * L * T * d, rel=1e-12)
    mfu, tps = losses(one, "perf/mfu"), losses(one, "perf/tokens_per_s")
    assert mfu and mfu.keys() == tps.keys()
    for step in mfu:
        assert mfu[step] == pytest.approx(flops_per_token(cfg, T) * tps[step] / 0.5e12, rel=1e-6)
    assert "perf/mfu" in acc.Tags()["scalars"]


def test_two_ranks_zero3_match_one_rank(tmp_path, cache, straight):
    """ZeRO-3 partitions the parameters too: tracking, evaluation and the HF export gather them."""
    out = tmp_path / "zero3"
    run_pretrain(out, BASE + ["train.deepspeed_config=ds_configs/zero3.json"], cache, ranks=2)
    _assert_same_run(straight[0], out)


def test_resume_after_kill_is_exact(tmp_path, cache, straight):
    out = tmp_path / "killed"
    proc = run_pretrain(out, BASE, cache, env={"LINREG_FAULT_KILL_AFTER_STEP": "8"}, check=False)
    assert proc.returncode != 0  # SIGKILLed
    assert not (out / "hf").exists()
    proc = run_pretrain(out, BASE, cache)
    assert "resumed from step 8" in proc.stdout
    _assert_same_run(straight[0], out, **EXACT)


def test_kill_during_save_falls_back_to_previous_checkpoint(tmp_path, cache, straight):
    out = tmp_path / "killed-in-save"
    proc = run_pretrain(out, BASE, cache, env={"LINREG_FAULT_KILL_DURING_SAVE": "16"}, check=False)
    assert proc.returncode != 0
    half = out / "checkpoints" / "step_16"
    # killed inside DeepSpeed's save: the model states are on disk, the optimizer partition is not
    assert list(half.glob("*model_states.pt")) and not list(half.glob("*optim_states.pt"))
    assert not (half / "COMPLETE").exists()
    stray = half / "zero_pp_rank_5_mp_rank_00_optim_states.pt"  # what a run of another world size leaves
    stray.write_bytes(b"stale")
    proc = run_pretrain(out, BASE, cache)
    assert "step_16 is incomplete" in proc.stdout and "resumed from step 8" in proc.stdout
    assert "removing the earlier step_16 before saving over it" in proc.stdout
    assert not stray.exists() and (half / "COMPLETE").is_file()
    _assert_same_run(straight[0], out, **EXACT)


def test_resume_two_rank_checkpoint_on_one_rank(tmp_path, cache, straight, two_ranks):
    """Universal-checkpoint route: ZeRO-2 state written by 2 ranks, resumed by 1."""
    out = tmp_path / "universal"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(two_ranks[0] / "checkpoints" / "step_8", out / "checkpoints" / "step_8")
    shutil.copy(two_ranks[0] / "metrics.jsonl", out / "metrics.jsonl")
    proc = run_pretrain(out, BASE, cache)
    assert "written by 2 rank(s)" in proc.stdout and "resumed from step 8" in proc.stdout
    ref = losses(straight[0])
    got = losses(out)
    assert got[9] == pytest.approx(ref[9], rel=1e-4)
    _assert_same_run(straight[0], out)


def test_sigterm_saves_and_resumes_exactly(tmp_path, cache, straight):
    """Preemption: SIGTERM finishes the current step, saves a checkpoint there and exits 143."""
    import signal
    import subprocess
    import sys
    import time

    from tests.train_helpers import PRETRAIN, REPO, env_for

    out = tmp_path / "preempted"
    args = [sys.executable, str(PRETRAIN), "--recipe", str(REPO / "recipes/tiny.yaml"), "--output-dir", str(out)]
    for s in BASE:
        args += ["--set", s]
    proc = subprocess.Popen(args, cwd=REPO, env=env_for(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and max(losses(out), default=0) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by signal SIGTERM" in stdout
    saved = [s for s in ckpt_steps(out)]
    stopped_at = max(saved)
    assert stopped_at not in (8, 16, 24) and stopped_at >= 10
    proc2 = run_pretrain(out, BASE, cache)
    assert f"resumed from step {stopped_at}" in proc2.stdout
    _assert_same_run(straight[0], out, **EXACT)


def ckpt_steps(run_dir):
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")
                  if (p / "COMPLETE").is_file())


def test_nan_loss_stops_without_saving(tmp_path, cache):
    out = tmp_path / "nan"
    proc = run_pretrain(out, BASE, cache, env={"LINREG_FAULT_NAN_AT_STEP": "11"}, check=False)
    assert proc.returncode == 2
    assert "non-finite loss at step 11" in proc.stderr
    assert "checkpoints/step_8" in proc.stderr  # says where the last good state is
    steps = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert steps == [8]
    assert max(losses(out)) == 10  # what was logged before the NaN is kept


def test_bad_inputs_fail_before_compute(tmp_path, cache):
    proc = run_pretrain(tmp_path / "a", BASE + ["train.stepz=3"], cache, check=False)
    assert proc.returncode == 2 and "unknown recipe key 'train.stepz'" in proc.stderr
    assert not (tmp_path / "a").exists()
    proc = run_pretrain(tmp_path / "b", BASE + ["data.sources=[{path: /nonexistent/corpus.txt}]"], cache,
                        check=False)
    assert proc.returncode == 2 and "/nonexistent/corpus.txt" in proc.stderr
    proc = run_pretrain(tmp_path / "c", BASE + ["regularizer.name=cosinus"], cache, check=False)
    assert proc.returncode == 2 and "cosinus" in proc.stderr and "mse" in proc.stderr


def test_analyze_checkpoints_reproduces_training_tracking(straight, tmp_path, cache):
    """`linreg analyze --checkpoints` on a pretraining run, on the same held-out tokens that the run tracked,
    gives the values the run logged at those steps."""
    import subprocess
    import sys

    from tests.train_helpers import REPO, env_for

    out, _ = straight
    dest = tmp_path / "analysis"
    proc = subprocess.run([sys.executable, "-m", "linreg.cli", "analyze", "--checkpoints", str(out),
                           "--max-tokens", str(8 * 64), "--no-progress", "--out", str(dest)],
                          cwd=REPO, env=env_for(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    analysis = json.loads((dest / "linearity.json").read_text())
    logged = {rec["step"]: rec["layers"] for rec in
              (json.loads(x) for x in (out / "linearity.jsonl").read_text().splitlines())}
    steps = [c["step"] for c in analysis["checkpoints"]]
    assert steps == [8, 16, 24]
    for c in analysis["checkpoints"]:
        assert c["n_tokens"] == 8 * 64
        for got, want in zip(c["layers"], logged[c["step"]]):
            for metric in ("linearity", "linearity_wo_residual", "contribution_norm", "cosine"):
                assert got[metric] == pytest.approx(want[metric], rel=1e-5, abs=1e-7), (c["step"], metric)
    assert (dest / "linearity_dynamics.png").is_file()
