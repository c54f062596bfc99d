"""The pretraining objective without the loop: validation loss of a partial last micro batch, and the
regularizer term added to the LM loss, against direct float64 computations written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.tiny_models import REPO

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # builds a model, prepares data


def test_lm_objective_validation_and_regularized_loss(tmp_path):
    from linreg.config import load_recipe
    from linreg.hidden import BlockCapture
    from linreg.regularizers import build_regularizer
    from linreg.train.objectives import LMObjective, RunContext

    sets = ["data.embedded_docs=300", "data.val_docs=30", f"data.cache_dir={tmp_path / 'cache'}",
            "tokenizer.vocab_size=400", "train.seq_len=32", "train.micro_batch_size=4", "train.eval_blocks=9",
            "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=3",
            f"output_dir={tmp_path / 'run'}"]
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", sets)
    ctx = RunContext(recipe=recipe, run_dir=tmp_path / "run", rank=0, world_size=1, device=torch.device("cpu"),
                     barrier=lambda: None, log=lambda msg: None)
    obj = LMObjective(ctx)
    obj.prepare()
    model = obj.build_model()
    assert len(obj.data.val) >= 9
    got = obj.evaluate(model)
    assert model.training  # evaluate restores the mode it found

    model.eval()
    nll = []
    with torch.no_grad():
        for i in range(9):
            ids = torch.tensor(np.asarray(obj.data.val[i]), dtype=torch.long)[None]
            logp = torch.log_softmax(model(input_ids=ids).logits.double()[:, :-1], -1)
            nll.append(float(-logp.gather(-1, ids[:, 1:, None]).mean()))
    assert set(got) == {"val/loss", "val/perplexity"}
    assert got["val/loss"] == pytest.approx(float(np.mean(nll)), rel=1e-6)
    assert got["val/perplexity"] == pytest.approx(math.exp(float(np.mean(nll))), rel=1e-6)

    model.train()
    batch = obj.collate(np.arange(4))
    reg = build_regularizer("mse", weight=0.5)
    total, parts = obj.loss(model, batch, reg)
    assert set(parts) == {"loss/lm", "loss/regularizer"}
    with torch.no_grad(), BlockCapture(model) as cap:
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        hs = [s.double() for s in cap.states]
    want_reg = 0.5 * torch.stack([((b - a) ** 2).mean() for a, b in zip(hs[:-1], hs[1:])]).mean()
    assert float(parts["loss/regularizer"]) == pytest.approx(float(want_reg), rel=1e-5)
    assert float(total) == pytest.approx(float(out.loss) + float(want_reg), rel=1e-5)
    _, plain = obj.loss(model, batch, None)
    assert set(plain) == {"loss/lm"}
