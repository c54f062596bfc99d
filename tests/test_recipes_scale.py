"""The paper's 150M / 650M recipes: parameter counts, and one real optimizer step of the 150M model on CPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from linreg.config import load_recipe
from linreg.model import count_parameters, flops_per_token, mistral_config
from tests.train_helpers import losses, run_pretrain

REPO = Path(__file__).resolve().parents[1]
SCALE = sorted((REPO / "recipes").glob("mistral-*.yaml"))


@pytest.mark.parametrize("path", SCALE, ids=lambda p: p.name)
def test_parameter_count_matches_name(path):
    recipe = load_recipe(path)
    nominal = int(re.search(r"mistral-(\d+)m", path.name).group(1)) * 1e6
    cfg = mistral_config(recipe.model.config, vocab_size=recipe.tokenizer.vocab_size, seq_len=recipe.train.seq_len)
    assert cfg.vocab_size == recipe.model.config["vocab_size"] == 32000  # pinned: the count is the recipe's
    n = count_parameters(cfg)  # meta device: nothing allocated
    assert abs(n["total"] - nominal) / nominal < 0.05, n
    # independent count from the architecture's formula
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * f + 2 * d
    expected = L * per_layer + 2 * cfg.vocab_size * d + d
    assert n["total"] == expected
    assert flops_per_token(cfg, recipe.train.seq_len) > 6 * n["non_embedding"]


def _real_size(path: Path) -> bool:
    return not (path.name.startswith("tiny") or "-tiny-" in path.name or path.stem.endswith("-tiny"))


REAL_SIZE = [p for p in sorted((REPO / "recipes").glob("*.yaml")) if _real_size(p)]


@pytest.mark.parametrize("path", REAL_SIZE, ids=lambda p: p.name)
def test_real_size_recipes_fit_eight_ranks(path):
    """The documented `deepspeed --num_gpus 8 ...` commands: the global batch splits into micro batches over
    8 ranks (the loop's own check)."""
    from linreg.dsconfig import batch_geometry

    r = load_recipe(path)
    accum = batch_geometry(r.train.global_batch_size, r.train.micro_batch_size, 8)
    assert accum * r.train.micro_batch_size * 8 == r.train.global_batch_size


def test_real_size_recipe_list_is_not_empty():
    names = {p.name for p in REAL_SIZE}
    assert {"mistral-150m.yaml", "mistral-650m.yaml", "finetune-boolq.yaml", "finetune-cb.yaml",
            "finetune-multirc.yaml", "finetune-hh-reward.yaml"} <= names
    assert not any(n.startswith("tiny") or "-tiny" in n for n in names)


@pytest.mark.slow
def test_one_step_of_the_150m_model_on_cpu(tmp_path):
    out = tmp_path / "m150"
    sets = [
        "model.config.vocab_size=32000",  # the recipe's size, whatever the small test tokenizer gets
        "model.activation_checkpointing=true",
        "data.sources=[]", "data.num_proc=1", "data.embedded_docs=300", "data.val_docs=20", "tokenizer.vocab_size=600",
        "train.steps=1", "train.seq_len=32", "train.global_batch_size=2", "train.micro_batch_size=2",
        "train.log_every=1", "train.eval_every=1", "train.eval_blocks=2",
        "track.blocks=32", "checkpoint.save_every=1000", "checkpoint.export_hf=false",
    ]
    proc = run_pretrain(out, sets, tmp_path / "cache", recipe="recipes/mistral-150m.yaml", timeout=900)
    assert re.search(r"model: 149\.\d\dM parameters", proc.stdout), proc.stdout[-2000:]
    assert 9.0 < losses(out)[1] < 12.0  # about ln(32000) = 10.4 at initialization
    assert (out / "checkpoints" / "step_1" / "COMPLETE").is_file()
