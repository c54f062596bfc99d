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
