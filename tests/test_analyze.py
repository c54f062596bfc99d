"""``linreg analyze`` on tiny GPT-2, OPT, Llama and Mistral models built from configs, checked against a float64
numpy reference computed from the block states captured directly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from linreg.analyze import analyze_model, main
from linreg.hidden import BlockCapture
from linreg.metrics import per_token_error
from linreg.textdata import token_blocks
from tests.tiny_models import final_norm, save_model, tiny_model, train_tokenizer, write_text

ARCHS = ["gpt2", "opt", "llama", "mistral"]
SEQ, TOKENS = 64, 1536


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    text = write_text(root / "stories.txt", n_docs=200)
    tok = train_tokenizer([text.read_text()])
    models = {}
    for k, arch in enumerate(ARCHS):
        models[arch] = save_model(tiny_model(arch, seed=k), tok, root / arch)
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(7)  # post-LN OPT (like opt-350m): no final norm after the last block
    post = OPTForCausalLM(OPTConfig(vocab_size=320, hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32,
                                    do_layer_norm_before=False, bos_token_id=1, eos_token_id=2, pad_token_id=3))
    models["opt-postln"] = save_model(post.eval(), tok, root / "opt-postln")
    return {"root": root, "text": text, "tok": tok, "models": models}


def ref_linearity(x: np.ndarray, y: np.ndarray) -> float:
    """Independent float64 reference: 1 - min_A ||X~ A - Y~||_F^2 with centered, Frobenius-normalized X~, Y~.

    Singular values of X~ below 1e-6 of the largest count as zero, the float32 resolution of the states and the
    cut-off of linreg.metrics (post-LN OPT states sum to zero over features: rank d - 1 up to float32 noise)."""
    x = x.astype(np.float64) - x.mean(0)
    y = y.astype(np.float64) - y.mean(0)
    x /= np.linalg.norm(x)
    y /= np.linalg.norm(y)
    a, *_ = np.linalg.lstsq(x, y, rcond=1e-6)
    return float(1.0 - np.linalg.norm(x @ a - y) ** 2)


def direct_states(model, blocks: np.ndarray):
    """Block-boundary states over all blocks (BlockCapture), plus output_hidden_states' last entry."""
    states, last_hs = None, []
    with torch.no_grad(), BlockCapture(model) as cap:
        for i in range(0, len(blocks), 8):
            out = model(input_ids=torch.from_numpy(blocks[i:i + 8]), output_hidden_states=True)
            flat = [s.reshape(-1, s.shape[-1]).double().numpy() for s in cap.states]
            states = flat if states is None else [np.concatenate([a, b]) for a, b in zip(states, flat)]
            last_hs.append(out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1]).double().numpy())
    return states, np.concatenate(last_hs)


@pytest.mark.parametrize("arch", ARCHS + ["opt-postln"])
def test_json_schema_and_values_match_direct_metrics(world, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    path = world["models"][arch]
    out = tmp_path / "out"
    rc = main(["--model", str(path), "--data", str(world["text"]), "--max-tokens", str(TOKENS), "--seq-len", str(SEQ),
               "--batch-size", "8", "--out", str(out), "--no-progress", "--error-layers", "0,-1",
               "--error-tokens", "256"])
    assert rc == 0
    doc = json.loads((out / "linearity.json").read_text())
    for key in ("model", "n_tokens", "baseline", "layers", "num_blocks", "hidden_size", "pairs", "error_distribution"):
        assert key in doc, key
    assert doc["accumulate_dtype"] == "float64"
    assert (out / "linearity.png").stat().st_size > 0 and (out / "errors.png").stat().st_size > 0
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    n_blocks = model.config.num_hidden_layers
    assert doc["num_blocks"] == n_blocks == len(doc["layers"])
    blocks = token_blocks(str(world["text"]), world["tok"], SEQ, TOKENS)
    assert doc["n_tokens"] == blocks.size == TOKENS
    d = doc["hidden_size"]
    assert doc["baseline"] == pytest.approx(d / (TOKENS - 1), rel=1e-9)
    states, last_hs = direct_states(model, blocks)
    for i, layer in enumerate(doc["layers"]):
        assert set(layer) >= {"layer", "linearity", "linearity_wo_residual", "contribution_norm", "cosine"}
        assert layer["layer"] == i
        x, y = states[i], states[i + 1]
        assert layer["linearity"] == pytest.approx(ref_linearity(x, y), abs=2e-7)
        assert layer["linearity_wo_residual"] == pytest.approx(ref_linearity(x, y - x), abs=2e-7)
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        assert layer["cosine"] == pytest.approx(cos.mean(), rel=1e-9)
        assert layer["contribution_norm"] == pytest.approx(
            (np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1)).mean(), rel=1e-9)
        assert layer["angular_distance"] == pytest.approx((np.arccos(np.clip(cos, -1, 1)) / np.pi).mean(), rel=1e-5)
        # rank of the block input: full, except after a post-LN block (its outputs sum to zero over features)
        want_rank = d - 1 if arch == "opt-postln" and i > 0 else d
        assert (layer["rank"], layer["features"], layer["precision_cut"]) == (want_rank, d, 0)
    # the last pair ends at the last block's output, before any final norm
    norm_last = ref_linearity(states[-2], last_hs)
    if arch == "opt-postln":  # post-LN OPT has no final norm: both conventions coincide
        assert model.model.decoder.final_layer_norm is None
        np.testing.assert_allclose(last_hs, states[-1], rtol=0, atol=0)
    else:
        with torch.no_grad():
            normed = final_norm(model)(torch.from_numpy(states[-1]).float()).double().numpy()
        np.testing.assert_allclose(normed, last_hs, rtol=1e-5, atol=1e-5)
        assert not np.allclose(states[-1], last_hs, atol=1e-3)
        assert abs(doc["layers"][-1]["linearity"] - norm_last) > 1e-4
    assert doc["layers"][-1]["linearity"] == pytest.approx(ref_linearity(states[-2], states[-1]), abs=2e-7)
    err = {e["layer"]: e for e in doc["error_distribution"]["layers"]}
    assert sorted(err) == [0, n_blocks - 1] and err[0]["tokens"] == 256


def test_per_token_errors_match_metrics_per_token_error(world):
    """Second-pass errors (map fitted on all tokens) = n x metrics.per_token_error on the same tokens."""
    entry, errors = analyze_model(str(world["models"]["llama"]), str(world["text"]), max_tokens=TOKENS, seq_len=SEQ,
                                  batch_size=8, error_layers="1,2", error_tokens=TOKENS, progress=False)
    model = tiny_model("llama", seed=ARCHS.index("llama"))
    blocks = token_blocks(str(world["text"]), world["tok"], SEQ, TOKENS)
    states, _ = direct_states(model, blocks)
    for i in (1, 2):
        ref = per_token_error(torch.from_numpy(states[i]), torch.from_numpy(states[i + 1])).numpy() * TOKENS
        np.testing.assert_allclose(errors[i], ref, rtol=1e-6, atol=1e-9)
        assert errors[i].mean() == pytest.approx(1 - entry["layers"][i]["linearity"], rel=1e-6)


def test_several_models_overlaid(world, tmp_path):
    out = tmp_path / "multi"
    rc = main(["--model", str(world["models"]["gpt2"]), str(world["models"]["mistral"]), "--labels", "g", "m",
               "--data", str(world["text"]), "--max-tokens", "512", "--seq-len", str(SEQ), "--out", str(out),
               "--no-progress", "--error-layers", "none"])
    assert rc == 0
    doc = json.loads((out / "linearity.json").read_text())
    assert [m["label"] for m in doc["models"]] == ["g", "m"]
    assert [m["architecture"] for m in doc["models"]] == ["GPT2LMHeadModel", "MistralForCausalLM"]
    for label in ("g", "m"):
        sub = json.loads((out / label / "linearity.json").read_text())
        assert sub["label"] == label and len(sub["layers"]) == 4
    assert (out / "linearity.png").is_file() and not (out / "errors.png").exists()


def test_too_few_tokens_is_refused_with_the_needed_count(world, tmp_path, capsys):
    rc = main(["--model", str(world["models"]["mistral"]), "--data", str(world["text"]), "--max-tokens", "20",
               "--seq-len", "16", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "20 tokens for hidden size 32" in err and "need at least 34" in err
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.\n")
    rc = main(["--model", str(world["models"]["mistral"]), "--data", str(short), "--max-tokens", "4096",
               "--seq-len", "8", "--out", str(tmp_path / "y"), "--no-progress"])
    assert rc == 2
    assert "need at least 34" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bad_arguments(world, tmp_path, capsys):
    assert main(["--model", "m", "--checkpoints", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "exactly one of --model" in capsys.readouterr().err
    assert main(["--model", str(world["models"]["gpt2"]), "--data", str(tmp_path / "nope.txt"), "--max-tokens", "256",
                 "--out", str(tmp_path / "o")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["--model", str(world["models"]["gpt2"]), "--data", str(world["text"]), "--error-layers", "9",
                 "--max-tokens", "256", "--seq-len", "32", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_from_log_dynamics(tmp_path):
    """--checkpoints RUN_DIR --from-log plots the training-time linearity.jsonl (no model needed)."""
    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for step in (0, 10, 20):
        layers = [{"linearity": 0.9 + 0.001 * step + 0.01 * i, "linearity_wo_residual": 0.5, "contribution_norm": 0.1,
                   "cosine": 0.99, "n_tokens": 1000, "dim": 8, "baseline": 0.008} for i in range(3)]
        lines.append(json.dumps({"step": step, "n_tokens": 1000, "baseline": 0.008, "layers": layers}))
    (run / "linearity.jsonl").write_text("\n".join(lines) + "\n{\"step\": 30, \"lay")  # a line cut by a crash
    rc = main(["--checkpoints", str(run), "--from-log", "--out", str(tmp_path / "o")])
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "linearity.json").read_text())
    assert [c["step"] for c in doc["checkpoints"]] == [0, 10, 20]
    assert doc["checkpoints"][2]["layers"][1]["linearity"] == pytest.approx(0.93)
    assert doc["checkpoints"][1]["mean"]["linearity"] == pytest.approx(0.92)
    assert (tmp_path / "o" / "linearity_dynamics.png").is_file() and (tmp_path / "o" / "linearity.png").is_file()
    assert main(["--checkpoints", str(run), "--out", str(tmp_path / "p")]) == 2  # no checkpoints: says so


def test_context_and_vocabulary_are_checked_before_running(world, tmp_path, capsys):
    """--seq-len beyond a learned position table, or token ids beyond the embedding, are refused with the numbers
    (they would end in an IndexError, or a device-side assert on CUDA); rotary models have no such limit."""
    common = ["--data", str(world["text"]), "--max-tokens", "1200", "--out", str(tmp_path / "o"), "--no-progress",
              "--error-layers", "none"]
    for arch in ("gpt2", "opt"):
        assert main(["--model", str(world["models"][arch]), "--seq-len", "300", *common]) == 2
        err = capsys.readouterr().err
        assert "sequences of 300 tokens exceed the model's context of 256 positions" in err and "--seq-len 256" in err
    assert main(["--model", str(world["models"]["llama"]), "--seq-len", "300", *common]) == 0  # RoPE: runs
    capsys.readouterr()
    big = tmp_path / "tok400"
    from tests.tiny_models import train_tokenizer as train

    train([world["text"].read_text()], vocab_size=400).save_pretrained(big)
    assert main(["--model", str(world["models"]["gpt2"]), "--tokenizer", str(big), "--seq-len", str(SEQ),
                 *common[:-2], "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    import re

    assert int(re.search(r"produces token id (\d+)", err).group(1)) >= 320
    assert "input embedding has 320 rows" in err and "0..319" in err
    assert not (tmp_path / "p").exists()


def test_non_finite_hidden_states_are_reported_with_the_model(world, tmp_path, capsys):
    model = tiny_model("llama", seed=ARCHS.index("llama"))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = float("inf")  # what an fp16 overflow leaves behind
    path = save_model(model, world["tok"], tmp_path / "inf-llama")
    out = tmp_path / "o"
    rc = main(["--model", str(path), "--data", str(world["text"]), "--max-tokens", "512", "--seq-len", str(SEQ),
               "--out", str(out), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"error: {path}: block 0: non-finite hidden states (NaN or Inf) in x (the block input)" in err
    assert "--dtype bfloat16/float32" in err
    assert not (out / "linearity.json").exists()


def _fake_run(world, root):
    """A linreg run folder with two ZeRO-0 style checkpoints of a tiny Llama, and its export in hf/."""
    from linreg.checkpoint import mark_complete

    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text("task: {kind: lm}\n")
    models = {}
    for step, seed in ((2, 11), (4, 12)):
        m = tiny_model("llama", seed=seed)
        step_dir = run / "checkpoints" / f"step_{step}"
        step_dir.mkdir()
        torch.save({"module": m.state_dict()}, step_dir / "mp_rank_00_model_states.pt")
        mark_complete(step_dir, step)
        models[step] = m
    save_model(models[4], world["tok"], run / "hf")
    return run, models


def test_checkpoints_honour_accumulate_dtype_and_error_layers(world, tmp_path):
    from linreg.analyze import measure

    run, models = _fake_run(world, tmp_path)
    out = tmp_path / "dyn"
    common = ["--checkpoints", str(run), "--data", str(world["text"]), "--seq-len", str(SEQ), "--max-tokens",
              str(TOKENS), "--no-progress"]
    assert main([*common, "--accumulate-dtype", "float32", "--error-layers", "0,-1", "--error-tokens", "256",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "linearity.json").read_text())
    assert doc["accumulate_dtype"] == "float32" and [c["step"] for c in doc["checkpoints"]] == [2, 4]
    blocks = token_blocks(str(world["text"]), world["tok"], SEQ, TOKENS)
    for c in doc["checkpoints"]:
        model = models[c["step"]]
        f32, _ = measure(model, blocks, batch_size=8, error_layers=[], error_tokens=0,
                         accumulate_dtype=torch.float32, progress=False)
        f64, _ = measure(model, blocks, batch_size=8, error_layers=[], error_tokens=0, progress=False)
        got = [x["linearity_wo_residual"] for x in c["layers"]]
        assert got == pytest.approx([x["linearity_wo_residual"] for x in f32["layers"]], rel=1e-12, abs=0)
        # the two accumulation dtypes differ here, so the comparison above tells them apart
        assert max(abs(a["linearity_wo_residual"] - b["linearity_wo_residual"])
                   for a, b in zip(f32["layers"], f64["layers"])) > 1e-11
        err = {e["layer"]: e for e in c["error_distribution"]["layers"]}
        assert sorted(err) == [0, 3] and err[0]["tokens"] == 256
    assert (out / "errors.png").stat().st_size > 0
    # --from-log runs no model: these options are refused instead of ignored
    (run / "linearity.jsonl").write_text(json.dumps({"step": 2, "layers": []}) + "\n")
    for extra in (["--error-layers", "0"], ["--accumulate-dtype", "float32"]):
        assert main(["--checkpoints", str(run), "--from-log", *extra, "--out", str(tmp_path / "x")]) == 2
