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


def make_model(arch: str, seed: int = 0, layers: int = 4):
    """tiny_model plus GPT-NeoX (Pythia) and a Mixtral MoE: architectures whose checkpoint layout differs from
    their modules in Transformers 5 (``embed_out`` / per-expert weights are renamed on save and load)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=3, max_position_embeddings=256)
    torch.manual_seed(seed)
    if arch == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                                num_attention_heads=4, **common)).eval()
    if arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                                num_experts_per_tok=2, **common)).eval()
    return tiny_model(arch, seed=seed, layers=layers)


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
    for method in ("cosine", "angular1", "linearity"):
        scores = block_scores(stats, method)
        for i in range(4):
            x, y = states[i].numpy(), states[i + 1].numpy()
            cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            if method == "cosine":
                assert scores[i] == pytest.approx(1 - cos.mean(), rel=1e-9)
            elif method == "angular1":
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
    assert rank_blocks(block_scores(stats, "angular1"), "angular1")[0] == 1
    ids = torch.from_numpy(world["ev"][:4])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    prune_model(model, batches(world["cal"]), 1, select="linearity")
    assert model.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)


class Rotation(nn.Module):
    """A block that turns every hidden state by the same angle: 2x2 rotations by theta on each coordinate pair, so
    cos(x, y) = cos(theta) for every token, and consecutive blocks add their angles."""

    def __init__(self, d: int, theta: float):
        super().__init__()
        c, s = np.cos(theta), np.sin(theta)
        r = torch.zeros(d, d)
        for j in range(0, d, 2):
            r[j, j], r[j, j + 1], r[j + 1, j], r[j + 1, j + 1] = c, s, -s, c
        self.register_buffer("r", r)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states @ self.r


def test_angular_run_distances_match_float64_reference(world):
    """d(l, n) for every start and every n <= 4 against arccos of captured states in float64, padding excluded."""
    model = tiny_model("mistral", seed=3)
    ids = torch.from_numpy(world["cal"][:6])
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0
    mask[3, 5:] = 0
    data = [{"input_ids": ids[:4], "attention_mask": mask[:4]}, {"input_ids": ids[4:], "attention_mask": mask[4:]}]
    stats = block_statistics(model, data, full=False, span=4)
    states = None
    with torch.no_grad(), BlockCapture(model) as cap:
        for b in data:
            model(**b)
            keep = b["attention_mask"].bool()
            flat = [st[keep].double() for st in cap.states]
            states = flat if states is None else [torch.cat([a, c]) for a, c in zip(states, flat)]
    assert stats.n_tokens == int(mask.sum()) == states[0].shape[0]
    for n in range(1, 5):
        for l in range(4 - n + 1):
            x, y = states[l].numpy(), states[l + n].numpy()
            cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            ref = (np.arccos(np.clip(cos, -1, 1)) / np.pi).mean()
            assert stats.angular_run(l, n) == pytest.approx(ref, rel=1e-5), (l, n)
        assert sorted(stats.span_sum[n]) == list(range(4 - n + 1))
    for l in range(4):
        assert stats.angular_run(l, 1) == pytest.approx(stats.angular(l), rel=1e-12)


def test_angular_cuts_the_best_contiguous_run_not_the_individually_best_blocks(world, tmp_path):
    """Blocks turning every state by 0.6, 0.3, -0.3, 0.25, 0.7, 0.2 rad: d(l, n) = |sum of the run's angles| / pi.
    Two blocks: the best run is 1-2 (they cancel, d = 0); the two individually smallest are 5 and 3."""
    from linreg.errors import ConfigError
    from linreg.pruning.prune import sweep

    thetas = [0.6, 0.3, -0.3, 0.25, 0.7, 0.2]

    def rotations():
        model = tiny_model("llama", seed=0, layers=6)
        blocks = find_blocks(model)
        for i, t in enumerate(thetas):
            blocks[i] = Rotation(32, t)
        return model

    cal = batches(world["cal"][:8])
    stats = block_statistics(rotations(), cal, full=False, span=3)
    for n in (1, 2, 3):
        for l in range(6 - n + 1):
            assert stats.angular_run(l, n) == pytest.approx(abs(sum(thetas[l:l + n])) / np.pi, abs=2e-6)
    rep = prune_model(rotations(), cal, 2, select="angular")
    assert rep["chosen"] == [1, 2] and rep["removed"] == [1, 2] and rep["score"] == "angular_distance"
    assert rep["rounds"][0]["scores"]["1"] == pytest.approx(0.0, abs=2e-6)
    single = prune_model(rotations(), cal, 2, select="angular1")
    assert sorted(single["chosen"]) == [3, 5]
    rep3 = prune_model(rotations(), cal, 3, select="angular", replace="linear")
    assert rep3["chosen"] == [1, 2, 3] and rep3["replaced"] == [1, 2, 3]
    assert all(v == pytest.approx(1.0, abs=1e-9) for v in rep3["fit_r2"].values())  # rotations are linear
    # a sweep takes each K's own run: not nested
    res = sweep(rotations(), cal, [0, 1, 2, 3], lambda m: 0.0, select="angular")
    assert res["chosen"] == {"0": [], "1": [5], "2": [1, 2], "3": [1, 2, 3]} and "order" not in res
    assert res["angular_distance"]["2"]["1"] == pytest.approx(0.0, abs=2e-6)
    # runs never contain a block already replaced by a linear map
    model = rotations()
    prune_model(model, cal, 0, select="given", given=[1], replace="linear")
    assert prune_model(model, cal, 2, select="angular")["chosen"] == [2, 3]  # 1-2 (d = 0) has a linear block
    with pytest.raises(ConfigError, match="no iterative form"):
        prune_model(rotations(), cal, 2, select="angular", iterative=True)
    with pytest.raises(ConfigError, match="no iterative form"):
        sweep(rotations(), cal, [1, 2], lambda m: 0.0, select="angular", iterative=True)


def test_nothing_to_cut_and_bad_given_blocks(world):
    model = tiny_model("llama", seed=1)
    ids = torch.from_numpy(world["ev"][:2])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for kw in (dict(replace="linear"), dict(replace="linear", iterative=True), dict(replace="none"),
               dict(select="angular", replace="linear")):
        rep = prune_model(model, batches(world["cal"]), 0, **kw)
        assert rep["chosen"] == [] and rep["replaced"] == [] and rep["removed"] == []
    assert not any(isinstance(b, LinearBlock) for b in find_blocks(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
    from linreg.errors import ConfigError
    from linreg.pruning.prune import sweep

    with pytest.raises(ConfigError, match=r"--layers \[7\]: not blocks of this model"):
        sweep(model, batches(world["cal"]), [0, 1], lambda m: 0.0, select="given", given=[7])
    with pytest.raises(ConfigError, match=r"more than once"):
        prune_model(model, batches(world["cal"]), 0, select="given", given=[1, 1])
    with pytest.raises(ConfigError, match=r"only 3 can be cut"):
        sweep(model, batches(world["cal"]), [4], lambda m: 0.0)


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


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "mixtral"])
def test_linear_replacement_saves_loads_and_generates(world, arch, tmp_path):
    model = make_model(arch, seed=6)
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


@pytest.mark.parametrize("arch", ["mistral", "gpt2", "opt"])
def test_output_hidden_states_and_attentions_with_linear_blocks(world, arch, tmp_path):
    """Transformers records hidden states with hooks on its decoder-layer class; LinearBlocks (block 0 and 2
    here) take part too: L + 1 states, state i + 1 the output of block i (the last one after the final norm), for
    a model built by surgery and for the reloaded folder. Attention weights: None for the linear blocks."""
    from tests.tiny_models import final_norm

    model = tiny_model(arch, seed=7)
    stats = block_statistics(model, batches(world["cal"]), positions=[0, 2])
    replace_blocks(model, {0: stats.fit(0), 2: stats.fit(2)})
    save_pruned(model, tmp_path / "m")
    ids = torch.from_numpy(world["ev"][:2, :12])
    for m in (model, load_pruned(tmp_path / "m").eval()):
        m.set_attn_implementation("eager")
        n = m.config.num_hidden_layers
        with torch.no_grad(), BlockCapture(m) as cap:
            out = m(input_ids=ids, output_hidden_states=True, output_attentions=True)
            hooked = list(cap.states)
            last = final_norm(m)(hooked[n])
        assert len(out.hidden_states) == n + 1 == len(hooked)
        for i in range(n):
            torch.testing.assert_close(out.hidden_states[i], hooked[i], rtol=0, atol=0)
        torch.testing.assert_close(out.hidden_states[n], last, rtol=1e-6, atol=1e-6)
        assert len(out.attentions) == n
        assert [a is None for a in out.attentions] == [True, False, True, False]
        assert all(a.shape == (2, 4, 12, 12) for a in out.attentions if a is not None)
        with torch.no_grad():  # no duplicates or shifts across calls (hooks are installed once)
            again = m(input_ids=ids, output_hidden_states=True).hidden_states
            some = m(input_ids=ids, output_hidden_states=[0, 1, 3]).hidden_states  # selected states only
        assert len(again) == n + 1 and torch.equal(again[1], hooked[1])
        assert [h is not None for h in some] == [True, True, False, True, False]
        assert all(torch.equal(some[i], hooked[i]) for i in (0, 1, 3))


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
    for arch in ("gpt_neox", "mixtral"):  # checkpoint layouts that Transformers renames on load
        other = make_model(arch, seed=8)
        stats = block_statistics(other, batches(world["cal"]), positions=[0, 2])
        replace_blocks(other, {0: stats.fit(0), 2: stats.fit(2)})
        save_pruned(other, tmp_path / arch)
        with torch.no_grad():
            torch.save(other(input_ids=ids).logits, tmp_path / f"{arch}.pt")
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
ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
print('CLASS', type(m).__name__)
print('CLOSE', torch.allclose(m(input_ids=ids).logits, ref, atol=1e-5))
g = m.generate(ids, max_new_tokens=4, do_sample=False)
print('GEN', g.shape[1])
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
print('TOK', len(tok))
for arch in ('gpt_neox', 'mixtral'):
    m, info = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + arch, trust_remote_code=True,
                                                   output_loading_info=True)
    ref = torch.load({str(tmp_path)!r} + f'/{{arch}}.pt', weights_only=True)
    print('OTHER', arch, type(m).__name__, sorted(info['missing_keys']), sorted(info['unexpected_keys']),
          torch.allclose(m.eval()(input_ids=ids).logits, ref, atol=1e-5))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1",
               PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PLAIN REFUSED True" in proc.stdout
    assert "CLASS LinregPrunedMistralForCausalLM" in proc.stdout
    assert "CLOSE True" in proc.stdout and "GEN 14" in proc.stdout and f"TOK {len(world['tok'])}" in proc.stdout
    assert "OTHER gpt_neox LinregPrunedGPTNeoXForCausalLM [] [] True" in proc.stdout, proc.stdout
    assert "OTHER mixtral LinregPrunedMixtralForCausalLM [] [] True" in proc.stdout, proc.stdout


def test_load_pruned_refuses_checkpoints_that_do_not_match(world, tmp_path):
    """Missing or unused weights are an error naming them, not a model with random weights; a caller's
    output_loading_info=True still gets the info."""
    from safetensors.torch import load_file, save_file

    from linreg.errors import CheckpointError

    model = make_model("mistral", seed=3)
    stats = block_statistics(model, batches(world["cal"]), positions=[1])
    replace_blocks(model, {1: stats.fit(1)})
    save_pruned(model, tmp_path / "m")
    loaded, info = load_pruned(tmp_path / "m", output_loading_info=True)
    assert isinstance(loaded, nn.Module) and not info["missing_keys"] and not info["unexpected_keys"]
    assert provenance(loaded)["linear"] == [1]
    f = tmp_path / "m" / "model.safetensors"
    state = load_file(f)
    state["model.layers.1.extra.weight"] = state.pop("model.layers.2.mlp.up_proj.weight")
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.2\.mlp\.up_proj\.weight.*not used.*"
                                              r"model\.layers\.1\.extra\.weight"):
        load_pruned(tmp_path / "m")


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

    assert prune_main(common + ["--remove", "0", "--replace", "linear", "--out", str(tmp_path / "z")]) == 0
    rep = json.loads((tmp_path / "z" / "prune.json").read_text())
    assert rep["chosen"] == [] and rep["replaced"] == [] and rep["num_hidden_layers"] == {"before": 4, "after": 4}
    assert rep["perplexity"]["pruned"] == rep["perplexity"]["original"]


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
    assert prune_main(base + ["--select", "given", "--remove", "3", "--layers", "1,2"]) == 2
    assert "--remove 3 disagrees with the 2 blocks named by --layers" in capsys.readouterr().err
    assert prune_main(base + ["--select", "given", "--layers", "1,7", "--sweep", "0,1"]) == 2
    assert "--layers [7]: not blocks of this model" in capsys.readouterr().err
    assert prune_main(base + ["--select", "angular", "--iterative", "--remove", "2"]) == 2
    assert "no iterative form" in capsys.readouterr().err
    assert prune_main(base + ["--remove", "1", "--sweep", "2"]) == 2
    assert "not both" in capsys.readouterr().err


def test_sweep_title_uses_the_short_model_label():
    from linreg.pruning.cli import sweep_title

    assert sweep_title({"model": "runs/tiny/hf", "score": "linearity"}) == "tiny/hf: blocks chosen by linearity"
    assert sweep_title({"model": "/x/gpt2", "score": "angular_distance", "iterative": True}).startswith("gpt2: ")


def test_sweep_with_distillation_frees_the_model_first(world, tmp_path, monkeypatch):
    """The original model is gone (no reference left) before the distillation processes start. The launcher here
    stands in for the training run: it copies the replaced student to the run's export folder, so the distilled
    curve equals the linear one."""
    import gc
    import weakref

    import linreg.pruning.cli as cli

    src = save_model(tiny_model("llama", seed=14), world["tok"], tmp_path / "src")
    launcher = tmp_path / "copy_student.py"
    launcher.write_text(
        "import shutil, sys\n"
        "a = sys.argv\n"
        "out = a[a.index('--output-dir') + 1]\n"
        "student = [s.split('=', 1)[1] for s in a if s.startswith('task.options.student=')][0]\n"
        "shutil.copytree(student, out + '/hf')\n")
    refs: list = []
    real_load, real_run = cli._load, subprocess.run

    def load(args):
        got = real_load(args)
        refs.append(weakref.ref(got[0]))
        return got

    alive: list[bool] = []

    def run(cmd, *a, **kw):
        gc.collect()
        alive.append(refs[0]() is not None)
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(cli, "_load", load)
    monkeypatch.setattr(cli.subprocess, "run", run)
    out = tmp_path / "sweep"
    rc = prune_main(["--model", str(src), "--data", str(world["text"]), "--max-tokens", "1024", "--eval-tokens",
                     "256", "--seq-len", str(SEQ), "--no-progress", "--sweep", "0,2", "--out", str(out),
                     "--distill-recipe", "recipes/distill-tiny.yaml", "--distill-launcher",
                     f"{sys.executable} {launcher}"])
    assert rc == 0
    assert alive == [False]
    res = json.loads((out / "sweep.json").read_text())
    assert res["distilled"]["2"] == pytest.approx(res["linear"]["2"], rel=1e-6)
    assert res["distilled"]["0"] == res["linear"]["0"]
