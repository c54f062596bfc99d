"""Recipe loading, overrides, DeepSpeed config filling, the schedule and checkpoint bookkeeping (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from linreg import checkpoint as ckpt
from linreg.config import apply_overrides, load_recipe, parse_override
from linreg.dsconfig import fill_ds_config, load_ds_config
from linreg.errors import CheckpointError, ConfigError
from linreg.train.loop import lr_lambda

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name
    assert (REPO / recipe.train.deepspeed_config).is_file()


def test_base_inheritance_and_overrides():
    r = load_recipe(REPO / "recipes" / "tiny-cosine.yaml", ["train.steps=7", "regularizer.layers=[0, 2]"])
    assert r.regularizer.name == "cosine" and r.regularizer.weight == 0.5
    assert r.regularizer.layers == [0, 2]
    assert r.train.steps == 7
    assert r.model.config["hidden_size"] == 128  # from the base file
    big = load_recipe(REPO / "recipes" / "mistral-650m-mse2.yaml")
    assert big.model.config["hidden_size"] == 1536 and big.regularizer.weight == 2.0
    assert big.train.seq_len == 512  # two levels of base


@pytest.mark.parametrize("override,needle", [
    ("train.stepz=3", "unknown recipe key 'train.stepz'"),
    ("train.steps=abc", "train.steps: expected an integer"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
    ("optimizer.betas=[0.9]", "optimizer.betas: expected two numbers"),
    ("data.sources=[{path: a.txt, hf: b}]", "data.sources[0]: give exactly one of"),
    ("modle.config={}", "unknown recipe key 'modle'"),
    ("model.config.hiden_size=64", "unknown recipe key 'model.config.hiden_size': not a MistralConfig argument; did you mean hidden_size"),
    ("regularizer.name=cosinus", "unknown regularizer 'cosinus'; available: none, cosine, mse, weight"),
    ("regularizer={name: cosine, weight: 0.5, options: {epz: 1}}", "epz"),
    ("track.every=0", "track.every: must be positive"),
    ("checkpoint.save_every=0", "checkpoint.save_every: must be positive"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last: must be >= 0"),
])
def test_bad_recipe_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_recipe(REPO / "recipes" / "tiny.yaml", [override])
    assert needle in str(err.value)


def test_override_parsing():
    assert parse_override("optimizer.lr=3e-4") == (["optimizer", "lr"], "3e-4")  # YAML 1.1: a string
    r = load_recipe(REPO / "recipes" / "tiny.yaml", ["optimizer.lr=3e-4"])
    assert r.optimizer.lr == pytest.approx(3e-4)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}
    with pytest.raises(ConfigError, match="must look like"):
        parse_override("train.steps")


def test_missing_base_and_loops(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="base recipe not found"):
        load_recipe(tmp_path / "c.yaml")


def test_ds_config_filled_from_recipe_and_conflicts_refused():
    raw = load_ds_config(REPO / "ds_configs" / "zero2.json")
    cfg = fill_ds_config(raw, global_batch=32, micro_batch=4, world_size=2, grad_clip=0.5, precision="bf16")
    assert cfg["train_batch_size"] == 32 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["gradient_clipping"] == 0.5
    raw2 = dict(raw, train_batch_size=64)
    with pytest.raises(ConfigError, match="train_batch_size=64 conflicts"):
        fill_ds_config(raw2, global_batch=32, micro_batch=4, world_size=2, grad_clip=1.0, precision="fp32")
    with pytest.raises(ConfigError, match="not divisible"):
        fill_ds_config(raw, global_batch=30, micro_batch=4, world_size=2, grad_clip=1.0, precision="fp32")
    with pytest.raises(ConfigError, match="optimizer"):
        fill_ds_config(dict(raw, optimizer={"type": "Adam"}), global_batch=8, micro_batch=4, world_size=1,
                       grad_clip=1.0, precision="fp32")


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_ds_configs_leave_recipe_values_auto(path):
    raw = json.loads(path.read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert raw[key] == "auto"


def test_schedule_warmup_then_cosine_to_floor():
    f = lr_lambda("cosine", warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)
    g = lr_lambda("linear", warmup=0, total=100, min_ratio=0.0)
    assert g(50) == pytest.approx(0.5)


def test_checkpoint_selection_skips_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step_{step}").mkdir(parents=True)
    ckpt.mark_complete(root / "step_2", 2)
    ckpt.mark_complete(root / "step_4", 4)
    said = []
    assert ckpt.latest_complete(root, log=said.append) == (4, root / "step_4")
    assert any("step_6 is incomplete" in s for s in said)
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.resolve_resume(str(root / "step_6"), root)
    assert ckpt.resolve_resume("none", root) is None
    ckpt.mark_complete(root / "step_6", 6)
    ckpt.remove_old(root, keep_last=2, log=lambda *_: None)
    assert [s for s, _, _ in ckpt.list_checkpoints(root)] == [4, 6]


class _Payload:
    """Pickles to a call that creates a file: what a tampered checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_reads_refuse_pickled_code(tmp_path, monkeypatch):
    import numpy as np
    import torch

    from linreg.analyze import load_checkpoint_state

    monkeypatch.delenv(ckpt.TRUST_ENV, raising=False)
    step = tmp_path / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    torch.save({"module": {"w": torch.ones(2)}, "extra": _Payload(marker)}, step / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=r"weights-only loader.*LINREG_TRUST_CHECKPOINTS=1"):
        load_checkpoint_state(step)
    assert not marker.exists()
    # what our own checkpoints hold loads: tensors, and the RNG state with its numpy array
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.arange(3.0)}, "rng": ckpt.rng_state()}, good)
    original = torch.load
    with ckpt.safe_torch_load():
        blob = torch.load(good)
    assert torch.load is original  # restored afterwards
    assert np.array_equal(blob["rng"]["numpy"][1], np.random.get_state()[1])
    # a user who trusts the file can opt in to full pickle
    monkeypatch.setenv(ckpt.TRUST_ENV, "1")
    with ckpt.safe_torch_load():
        torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)
    assert marker.exists()


def test_remove_old_drops_marker_first_and_universal_copies(tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
        ckpt.mark_complete(root / f"step_{step}", step)
    (root / "step_2_universal").mkdir()
    (root / "step_2_universal" / "COMPLETE").write_text("universal\n")
    (root / "step_6_universal").mkdir()
    real_rmtree = shutil.rmtree
    seen = []

    def rmtree(path, *args, **kwargs):  # records whether the marker was still there when deletion began
        seen.append((Path(path).name, (Path(path) / ckpt.MARKER).exists()))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    ckpt.remove_old(root, keep_last=2, log=lambda *_: None)
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_6", "step_6_universal"]
    assert ("step_2", False) in seen and ("step_2_universal", False) in seen
    assert not any(marker for _, marker in seen)


def test_fresh_start_or_rollback_below_later_checkpoints_is_refused(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (500, 1000, 1500):
        (root / f"step_{step}").mkdir(parents=True)
        ckpt.mark_complete(root / f"step_{step}", step)
    (root / "step_2000").mkdir()  # incomplete: never resumed from, does not block
    with pytest.raises(CheckpointError) as err:
        ckpt.refuse_newer_checkpoints(root, 0)
    msg = str(err.value)
    assert "step_500, step_1000, step_1500" in msg and "--output-dir" in msg and "fresh start" in msg
    start = ckpt.resolve_resume(str(root / "step_500"), root)
    with pytest.raises(CheckpointError) as err:
        ckpt.refuse_newer_checkpoints(root, start[0])
    assert "step_1000, step_1500" in str(err.value) and "step_500," not in str(err.value)
    # what --resume auto picks is never below a complete checkpoint
    auto = ckpt.resolve_resume("auto", root, log=lambda *_: None)
    assert auto == (1500, root / "step_1500")
    ckpt.refuse_newer_checkpoints(root, auto[0])
    ckpt.refuse_newer_checkpoints(tmp_path / "empty", 0)


def test_remove_checkpoint_takes_marker_first_and_its_universal_copy(tmp_path):
    root = tmp_path / "checkpoints"
    step = root / "step_16"
    step.mkdir(parents=True)
    (step / "zero_pp_rank_3_mp_rank_00_optim_states.pt").write_bytes(b"from a 4-rank run")
    ckpt.mark_complete(step, 16)
    (root / "step_16_universal.tmp").mkdir()
    (root / "step_16_universal").mkdir()
    ckpt.remove_checkpoint(step)
    assert list(root.iterdir()) == []


def test_cuda_rng_state_is_the_current_devices_and_old_lists_still_read():
    import torch

    one = torch.arange(8, dtype=torch.uint8)
    old = [torch.zeros(8, dtype=torch.uint8), one]  # the former all-devices list of a 2-GPU machine
    assert ckpt.cuda_state_for_device(old, 1) is one
    assert ckpt.cuda_state_for_device(old, 2) is None  # saved with fewer devices: nothing to restore
    assert ckpt.cuda_state_for_device(one, 5) is one  # the current format: this rank's device only
    state = ckpt.rng_state()
    if torch.cuda.is_available():
        assert isinstance(state["cuda"], torch.Tensor)
    else:
        assert "cuda" not in state
    ckpt.set_rng_state(dict(state, cuda=old))  # an old-format entry never fails


@pytest.mark.parametrize("env,count,want", [
    ({"LOCAL_RANK": "3"}, 8, 3),
    ({}, 8, 0),
    ({"LOCAL_RANK": "5"}, 0, None),  # CPU ranks
])
def test_local_device_index_follows_local_rank(env, count, want):
    from linreg.train.loop import local_device_index

    assert local_device_index(env, count) == want


def test_local_device_index_refuses_impossible_ranks():
    from linreg.train.loop import local_device_index

    with pytest.raises(ConfigError, match=r"LOCAL_RANK=2 but this process sees only 2 device\(s\) "
                                          r"\(CUDA_VISIBLE_DEVICES=0,1\)"):
        local_device_index({"LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "0,1"}, 2)
    with pytest.raises(ConfigError, match="LOCAL_RANK='x' is not an integer"):
        local_device_index({"LOCAL_RANK": "x"}, 2)


def test_local_device_is_the_cpu_here():
    import torch

    from linreg.train.loop import local_device

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert local_device() == torch.device("cpu")


def test_dist_timeout_from_environment():
    import datetime

    from linreg.train.loop import dist_timeout

    assert dist_timeout({}) == datetime.timedelta(minutes=120)
    assert dist_timeout({"DEEPSPEED_TIMEOUT": "30"}) == datetime.timedelta(minutes=30)
    assert dist_timeout({"LINREG_DIST_TIMEOUT_MIN": "7.5", "DEEPSPEED_TIMEOUT": "30"}) == \
        datetime.timedelta(minutes=7.5)
    for bad in ("0", "-3", "ten", "inf"):
        with pytest.raises(ConfigError, match="LINREG_DIST_TIMEOUT_MIN"):
            dist_timeout({"LINREG_DIST_TIMEOUT_MIN": bad})


@pytest.mark.parametrize("minutes", [None, "7"])
def test_process_group_gets_the_long_timeout(minutes):
    """The real process group (gloo, one rank) that init_distributed starts carries the timeout."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DEEPSPEED_TIMEOUT",
                                                            "LINREG_DIST_TIMEOUT_MIN")}
    if minutes:
        env["LINREG_DIST_TIMEOUT_MIN"] = minutes
    code = ("import torch, torch.distributed as dist\n"
            "from linreg.train.loop import init_distributed\n"
            "init_distributed()\n"
            "pg = dist.distributed_c10d._get_default_group()\n"
            "print('TIMEOUT', pg._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    seconds = float(p.stdout.split("TIMEOUT")[1].split()[0])
    assert seconds == 60 * (float(minutes) if minutes else 120)


def test_lm_recipe_with_init_from_defaults_to_its_tokenizer(tmp_path):
    r = load_recipe(REPO / "recipes" / "tiny.yaml", [f"model.init_from={tmp_path}"])
    assert r.tokenizer.path == str(tmp_path)
    other = tmp_path / "tok"
    r = load_recipe(REPO / "recipes" / "tiny.yaml", [f"model.init_from={tmp_path}", f"tokenizer.path={other}"])
    assert r.tokenizer.path == str(other)  # an explicit tokenizer stays
    assert load_recipe(REPO / "recipes" / "tiny.yaml").tokenizer.path is None  # no init_from: a BPE is trained


def _tiny_bpe(vocab: int):
    from linreg.data.config import TokenizerConfig
    from linreg.data.synthetic import synthetic_stories
    from linreg.data.tokenizer import train_bpe

    return train_bpe(synthetic_stories(300, 0), TokenizerConfig(vocab_size=vocab, min_frequency=1))


def test_lm_objective_refuses_a_tokenizer_larger_than_the_models_embedding(tmp_path):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from linreg.train.objectives import LMObjective, RunContext

    model_dir = tmp_path / "small-vocab"
    cfg = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    MistralForCausalLM(cfg).save_pretrained(model_dir)
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"model.init_from={model_dir}"])
    ctx = RunContext(recipe=recipe, run_dir=tmp_path / "run", rank=0, world_size=1, device=torch.device("cpu"),
                     barrier=lambda: None, log=lambda *_: None)
    obj = LMObjective(ctx)
    obj.tokenizer = _tiny_bpe(400)
    assert len(obj.tokenizer) > 300
    with pytest.raises(ConfigError, match=rf"has {len(obj.tokenizer)} tokens but model.init_from=.* embeds only 300"):
        obj.build_model()
    obj.tokenizer = _tiny_bpe(280)
    assert obj.build_model().get_input_embeddings().weight.shape[0] == 300


def test_flops_per_token_for_other_architectures_or_none():
    from transformers import GPT2Config, GPT2LMHeadModel

    from linreg.model import count_parameters, flops_per_token

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    d, L, V, P = 32, 2, 300, 64
    # independent count: GPT-2 block = 2 LayerNorms + c_attn (d x 3d + 3d) + c_proj (d x d + d) + MLP (d x 4d + 4d,
    # 4d x d + d); final LayerNorm; token (V x d, tied to the lm_head) and position (P x d) tables are embeddings
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    non_emb = L * block + 2 * d
    assert count_parameters(model) == {"total": non_emb + V * d + P * d, "embedding": V * d + P * d,
                                       "non_embedding": non_emb}
    T = 16
    want = 6 * (non_emb + V * d) + 12 * L * T * d
    assert flops_per_token(cfg, T) == pytest.approx(want, rel=1e-12)
    assert flops_per_token(cfg, T, counts=count_parameters(model)) == pytest.approx(want, rel=1e-12)

    class Unknown:  # a config that says nothing about its shape: no estimate, no crash
        model_type = "unknown"

    assert flops_per_token(Unknown(), T) is None


def test_dry_run_counts_with_the_loaded_tokenizers_vocabulary(tmp_path, capsys):
    from linreg.model import count_parameters, mistral_config
    from linreg.train.cli import main

    tok = _tiny_bpe(300)
    tok.save_pretrained(tmp_path / "tok")
    assert main(["--recipe", str(REPO / "recipes" / "tiny.yaml"), "--set", f"tokenizer.path={tmp_path / 'tok'}",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    r = load_recipe(REPO / "recipes" / "tiny.yaml")
    n = count_parameters(mistral_config(r.model.config, len(tok), r.train.seq_len))
    line = next(x for x in out.splitlines() if x.startswith("parameters:"))
    assert f"{n['total'] / 1e6:.1f}M total" in line and f"the {len(tok)} tokens of tokenizer.path" in line
    assert main(["--recipe", str(REPO / "recipes" / "tiny.yaml"), "--set", "tokenizer.path=some-org/some-tokenizer",
                 "--dry-run"]) == 0
    assert "assumes tokenizer.vocab_size=2048" in capsys.readouterr().out
