"""Pruning on tiny GPT-2, OPT, Llama and Mistral models: scores against float64 references, exact linear blocks,
surgery (removal and linear replacement) with KV-cache generation, saving and loading, the CLI and the sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from linreg.hidden import BlockCapture, find_blocks
from linreg.pruning import LinearBlock, load_pruned, remove_blocks, replace_blocks, save_pruned
from linreg.pruning.cli import main as prune_main
from linreg.pruning.perplexity import perplexity
from linreg.pruning.prune import prune_model
from linreg.pruning.select import block_scores, block_statistics, rank_blocks
from linreg.pruning.surgery import identity_block, provenance, swap_blocks
from linreg.textdata import token_blocks
from tests.tiny_models import save_model, tiny_model, train_tokenizer, write_text

ARCHS = ["gpt2", "opt", "llama", "mistral"]
SEQ = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    text = write_text(root / "stories.txt", n_docs=250)
    tok = train_tokenizer([text.read_text()])
    blocks = token_blocks(str(text), tok, SEQ, 2048)
    return {"root": root, "text": text, "tok": tok, "cal": blocks[:32], "ev": blocks[32:48]}


def batches(blocks, size=8):
    return [{"input_ids": torch.from_numpy(blocks[i:i + size])} for i in range(0, len(blocks), size)]


class HandLinear(nn.Module):
    """A block made exactly affine by hand (not a LinearBlock, so pruning treats it as an ordinary block)."""

    def __init__(self, d: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.eye(d) + 0.2 * torch.randn(d, d, generator=g))
        self.b = nn.Parameter(0.1 * torch.randn(d, generator=g))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states @ self.w + self.b


def states_of(model, blocks):
    out = None
    with torch.no_grad(), BlockCapture(model) as cap:
        for b in batches(blocks):
            model(**b)
            flat = [s.reshape(-1, s.shape[-1]).double() for s in cap.states]
            out = flat if out is None else [torch.cat([a, c]) for a, c in zip(out, flat)]
    return out


# ----------------------------------------------------------------------------------------------------- scores


def test_scores_match_float64_reference(world):
    model = tiny_model("llama", seed=3)
    stats = block_statistics(model, batches(world["cal"]), full=True)
    cheap = block_statistics(model, batches(world["cal"]), full=False)
    for i in range(4):
        assert cheap.cosine(i) == pytest.approx(stats.cosine(i), rel=1e-6)
        assert cheap.angular(i) == stats.angular(i)
    states = states_of(model, world["cal"])
    for method in ("cosine", "angular", "linearity"):
        scores = block_scores(stats, method)
        for i in range(4):
            x, y = states[i].numpy(), states[i + 1].numpy()
            cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            if method == "cosine":
                assert scores[i] == pytest.approx(1 - cos.mean(), rel=1e-9)
            elif method == "angular":
                assert scores[i] == pytest.approx((np.arccos(np.clip(cos, -1, 1)) / np.pi).mean(), rel=1e-5)
            else:
                xc, yc = x - x.mean(0), y - y.mean(0)
                a, *_ = np.linalg.lstsq(xc, yc, rcond=1e-6)
                assert scores[i] == pytest.approx(1 - np.linalg.norm(xc @ a - yc) ** 2 / np.linalg.norm(yc) ** 2,
                                                  abs=2e-7)
        order = rank_blocks(scores, method)
        vals = [scores[p] for p in order]
        assert vals == (sorted(vals, reverse=True) if method == "linearity" else sorted(vals))


@pytest.mark.parametrize("arch", ["gpt2", "mistral"])
def test_exactly_linear_block_scores_one_ranks_first_and_is_replaced_exactly(world, arch):
    model = tiny_model(arch, seed=1)
    blocks = find_blocks(model)
    blocks[2] = HandLinear(32, seed=5)
    ids = torch.from_numpy(world["ev"][:4])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    stats = block_statistics(model, batches(world["cal"]))
    scores = block_scores(stats, "linearity")
    assert scores[2] == pytest.approx(1.0, abs=1e-9)
    assert max(v for p, v in scores.items() if p != 2) < 0.9999
    assert rank_blocks(scores, "linearity")[0] == 2
    report = prune_model(model, batches(world["cal"]), 1, select="linearity", replace="linear")
    assert report["chosen"] == [2] and report["replaced"] == [2]
    assert report["fit_r2"]["2"] == pytest.approx(1.0, abs=1e-9)
    new = find_blocks(model)[2]
    assert isinstance(new, LinearBlock)
    w, b = new.affine()
    hand = HandLinear(32, seed=5)
    torch.testing.assert_close(w, hand.w.detach().double(), rtol=0, atol=2e-5)
    torch.testing.assert_close(b, hand.b.detach().double(), rtol=0, atol=2e-5)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_real_decoder_layer_made_linear_by_zeroing_outputs(world):
    """A Mistral layer with o_proj = down_proj = 0 is the identity: linearity 1, ranked first, removal exact."""
    model = tiny_model("mistral", seed=2)
    layer = find_blocks(model)[1]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    stats = block_statistics(model, batches(world["cal"]), full=True)
    scores = block_scores(stats, "linearity")
    assert scores[1] == pytest.approx(1.0, abs=1e-12)
    assert rank_blocks(scores, "linearity")[0] == 1
    assert rank_blocks(block_scores(stats, "cosine"), "cosine")[0] == 1
    assert rank_blocks(block_scores(stats, "angular"), "angular")[0] == 1
    ids = torch.from_numpy(world["ev"][:4])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    prune_model(model, batches(world["cal"]), 1, select="linearity")
    assert model.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- surgery


def _generate(model, ids, cache: bool):
    return model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=cache, pad_token_id=3)


@pytest.mark.parametrize("arch", ARCHS)
def test_removal_saves_loads_and_generates_with_cache(world, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch, seed=4)
    ids = torch.from_numpy(world["ev"][:2, :10])
    with torch.no_grad():  # reference: the same blocks swapped for identities in the original model
        with swap_blocks(model, {0: identity_block(model, 0), 2: identity_block(model, 2)}):
            ref = model(input_ids=ids).logits
    remove_blocks(model, [0, 2])
    assert model.config.num_hidden_layers == 2 and len(find_blocks(model)) == 2
    idx = sorted({m.layer_idx for b in find_blocks(model) for m in b.modules()
                  if isinstance(getattr(m, "layer_idx", None), int)})
    assert idx == [0, 1]
    assert provenance(model)["kept_layers"] == [1, 3] and provenance(model)["removed"] == [0, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    save_pruned(model, tmp_path / "m", tokenizer=world["tok"])
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == arch and "auto_map" not in cfg
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()  # the plain class
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    g = _generate(loaded, ids[:1], cache=True)
    assert g.shape[1] == 16
    assert torch.equal(g, _generate(loaded, ids[:1], cache=False))
    assert json.loads((tmp_path / "m" / "linreg_pruning.json").read_text())["kept_layers"] == [1, 3]


def test_removal_fixes_per_layer_config_lists():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, use_sliding_window=True, sliding_window=8,
                      max_window_layers=2,
                      layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(4, 64, (1, 12))
    remove_blocks(model, [1])
    assert model.config.num_hidden_layers == 3
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert model.config.max_window_layers == 1
    with torch.no_grad():
        g1 = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
        g2 = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_linear_replacement_saves_loads_and_generates(world, arch, tmp_path):
    model = tiny_model(arch, seed=6)
    stats = block_statistics(model, batches(world["cal"]), positions=[0, 2])
    replace_blocks(model, {0: stats.fit(0), 2: stats.fit(2)})  # block 0 too: its cache slot is layer 0's
    ids = torch.from_numpy(world["ev"][:2, :10])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    g = _generate(model, ids[:1], cache=True)
    assert torch.equal(g, _generate(model, ids[:1], cache=False))
    save_pruned(model, tmp_path / "m", tokenizer=world["tok"])
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == f"linreg_pruned_{arch}" and cfg["linreg_pruning"]["linear_layers"] == [0, 2]
    loaded = load_pruned(tmp_path / "m").eval()
    assert [isinstance(b, LinearBlock) for b in find_blocks(loaded)] == [True, False, True, False]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(loaded, ids[:1], cache=True), g)
    assert provenance(loaded)["linear"] == [0, 2]
    # re-saving a loaded pruned model keeps it loadable
    save_pruned(loaded, tmp_path / "again")
    again = load_pruned(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_replaced_folder_with_trust_remote_code_offline_and_plain_load_refused(world, tmp_path):
    """Fresh process, no linreg import: the folder's own code loads it; plain loading refuses loudly."""
    model = tiny_model("mistral", seed=8)
    stats = block_statistics(model, batches(world["cal"]), positions=[1])
    replace_blocks(model, {1: stats.fit(1)})
    ids = torch.from_numpy(world["ev"][:1, :10])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    save_pruned(model, tmp_path / "m", tokenizer=world["tok"])
    np.save(tmp_path / "ids.npy", ids.numpy())
    torch.save(ref, tmp_path / "ref.pt")
    script = f"""
import sys, numpy as np, torch
sys.modules['linreg'] = None  # the folder must not need the package
from transformers import AutoModelForCausalLM, AutoTokenizer
d = {str(tmp_path / 'm')!r}
try:
    AutoModelForCausalLM.from_pretrained(d)
    print('PLAIN LOADED')
except ValueError as e:
    print('PLAIN REFUSED', 'trust_remote_code=True' in str(e))
m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
ids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r}))
ref = torch.load({str(tmp_path / 'ref.pt')!r})
print('CLASS', type(m).__name__)
print('CLOSE', torch.allclose(m(input_ids=ids).logits, ref, atol=1e-5))
g = m.generate(ids, max_new_tokens=4, do_sample=False)
print('GEN', g.shape[1])
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
print('TOK', len(tok))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1",
               PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PLAIN REFUSED True" in proc.stdout
    assert "CLASS LinregPrunedMistralForCausalLM" in proc.stdout
    assert "CLOSE True" in proc.stdout and "GEN 14" in proc.stdout and f"TOK {len(world['tok'])}" in proc.stdout


def test_iterative_removal_tracks_original_indices(world):
    model = tiny_model("opt", seed=9)
    report = prune_model(model, batches(world["cal"]), 2, select="cosine", iterative=True)
    assert len(report["rounds"]) == 2
    first, second = report["rounds"]
    assert len(first["scores"]) == 4 and len(second["scores"]) == 3
    assert str(first["chosen"][0]) not in second["scores"]
    assert report["kept_layers"] == [i for i in range(4) if i not in report["chosen"]]
    model2 = tiny_model("opt", seed=9)
    rep2 = prune_model(model2, batches(world["cal"]), 2, select="last")
    assert rep2["chosen"] == [2, 1] and rep2["kept_layers"] == [0, 3]  # the final block stays
    model3 = tiny_model("opt", seed=9)
    rep3 = prune_model(model3, batches(world["cal"]), 0, select="given", given=[3, 1], replace="linear",
                       iterative=True)
    assert rep3["chosen"] == [3, 1] and rep3["replaced"] == [1, 3]


def test_perplexity_matches_the_models_own_loss(world):
    model = tiny_model("gpt2", seed=10)
    ev = world["ev"][:6]
    got = perplexity(model, ev, batch_size=4, progress=False)
    with torch.no_grad():
        loss = model(input_ids=torch.from_numpy(ev), labels=torch.from_numpy(ev)).loss.double()
    assert got["tokens"] == 6 * (SEQ - 1)
    assert got["nll"] == pytest.approx(float(loss), rel=1e-5)
    assert got["perplexity"] == pytest.approx(float(torch.exp(loss)), rel=1e-5)


# -------------------------------------------------------------------------------------------------------- CLI


def test_prune_cli_single_cut(world, tmp_path):
    src = save_model(tiny_model("mistral", seed=11), world["tok"], tmp_path / "src")
    common = ["--model", str(src), "--data", str(world["text"]), "--max-tokens", "1024", "--eval-tokens", "512",
              "--seq-len", str(SEQ), "--no-progress"]
    assert prune_main(common + ["--remove", "2", "--select", "angular", "--out", str(tmp_path / "r")]) == 0
    rep = json.loads((tmp_path / "r" / "prune.json").read_text())
    assert rep["score"] == "angular_distance" and len(rep["removed"]) == 2 and rep["replaced"] == []
    assert set(rep["perplexity"]) == {"original", "pruned"}
    assert rep["num_hidden_layers"] == {"before": 4, "after": 2}
    from transformers import AutoModelForCausalLM

    from linreg.textdata import token_blocks

    blocks = token_blocks(str(world["text"]), world["tok"], SEQ, 1024 + 512)
    ev = blocks[1024 // SEQ:]
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    assert perplexity(pruned, ev, progress=False)["perplexity"] == pytest.approx(rep["perplexity"]["pruned"], rel=1e-5)
    original = AutoModelForCausalLM.from_pretrained(src)
    assert perplexity(original, ev, progress=False)["perplexity"] == pytest.approx(rep["perplexity"]["original"],
                                                                                  rel=1e-5)

    assert prune_main(common + ["--select", "given", "--layers", "1,2", "--replace", "linear",
                                "--out", str(tmp_path / "l")]) == 0
    rep = json.loads((tmp_path / "l" / "prune.json").read_text())
    assert rep["replaced"] == [1, 2] and rep["removed"] == []
    assert set(rep["perplexity"]) == {"original", "removed", "linear"}
    lin = load_pruned(tmp_path / "l")
    assert perplexity(lin, ev, progress=False)["perplexity"] == pytest.approx(rep["perplexity"]["linear"], rel=1e-5)
    g = lin.generate(torch.from_numpy(ev[:1, :8]), max_new_tokens=4, do_sample=False)
    assert g.shape[1] == 12


def test_prune_cli_sweep_and_consistency_with_surgery(world, tmp_path):
    src = save_model(tiny_model("llama", seed=12), world["tok"], tmp_path / "src")
    out = tmp_path / "sweep"
    rc = prune_main(["--model", str(src), "--data", str(world["text"]), "--max-tokens", "1024", "--eval-tokens", "512",
                     "--seq-len", str(SEQ), "--no-progress", "--sweep", "0,1,3", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "sweep.json").read_text())
    assert sorted(res["removal"]) == sorted(res["linear"]) == ["0", "1", "3"]
    assert res["removal"]["0"] == res["linear"]["0"]
    assert (out / "pruning.png").stat().st_size > 0
    blocks = token_blocks(str(world["text"]), world["tok"], SEQ, 1024 + 512)
    cal, ev = blocks[:1024 // SEQ], blocks[1024 // SEQ:]
    for k in (1, 3):  # the identity-swap evaluation equals real surgery
        m = load_pruned(src)
        kept = list(range(4))
        remove_blocks(m, [kept.index(o) for o in res["order"][:k]])
        assert perplexity(m, ev, progress=False)["perplexity"] == pytest.approx(res["removal"][str(k)], rel=1e-5)
    m = load_pruned(src)
    report = prune_model(m, batches(cal), 3, select="linearity", replace="linear")
    assert sorted(report["chosen"]) == sorted(res["order"][:3])
    assert perplexity(m, ev, progress=False)["perplexity"] == pytest.approx(res["linear"]["3"], rel=1e-5)


def test_prune_cli_errors(world, tmp_path, capsys):
    src = save_model(tiny_model("gpt2", seed=13), world["tok"], tmp_path / "src")
    base = ["--model", str(src), "--data", str(world["text"]), "--seq-len", str(SEQ), "--no-progress",
            "--out", str(tmp_path / "o")]
    assert prune_main(base + ["--remove", "4"]) == 2
    assert "at least one must stay" in capsys.readouterr().err
    assert prune_main(base + ["--select", "given"]) == 2
    assert "needs --layers" in capsys.readouterr().err
    assert prune_main(base + ["--remove", "1", "--max-tokens", "16"]) == 2
    assert "need at least 34" in capsys.readouterr().err
    assert prune_main(base + ["--remove", "1", "--layers", "1"]) == 2
    assert "--layers only goes with --select given" in capsys.readouterr().err
