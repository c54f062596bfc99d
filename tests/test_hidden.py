"""linreg.hidden on tiny randomly initialised Hugging Face models built from configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from linreg.errors import ConfigError, DataError
from linreg.hidden import BlockCapture, ModelLinearity, find_blocks, measure_model

V, D, L = 64, 16, 3


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    )
    return MistralForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _others():
    common = dict(vocab_size=V, hidden_size=D, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return {
        "opt": (
            lambda: OPTForCausalLM(OPTConfig(ffn_dim=32, num_hidden_layers=L, num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=D, **common)),
            lambda m: m.model.decoder.layers,
            lambda m: m.model.decoder.final_layer_norm,
        ),
        "bloom": (
            lambda: BloomForCausalLM(BloomConfig(n_layer=L, n_head=4, **common)),
            lambda m: m.transformer.h,
            lambda m: m.transformer.ln_f,
        ),
        "gpt_neox": (
            lambda: GPTNeoXForCausalLM(GPTNeoXConfig(intermediate_size=32, num_hidden_layers=L, num_attention_heads=4, max_position_embeddings=128, **common)),
            lambda m: m.gpt_neox.layers,
            lambda m: m.gpt_neox.final_layer_norm,
        ),
    }


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _check_capture(model, blocks, final_norm):
    ids = _ids(2, 11)
    with torch.no_grad(), BlockCapture(model) as cap:
        out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(cap.states) == len(blocks) + 1 == len(hs)
    for i in range(len(blocks)):
        torch.testing.assert_close(cap.states[i], hs[i], rtol=0, atol=0)
    # the last captured state is pre final norm; output_hidden_states' last entry is post norm
    assert not torch.allclose(cap.states[-1], hs[-1], atol=1e-3)
    torch.testing.assert_close(final_norm(cap.states[-1]), hs[-1], rtol=1e-6, atol=1e-6)


def test_mistral_blocks_and_last_hook():
    m = tiny_mistral()
    assert find_blocks(m) is m.model.layers
    _check_capture(m, m.model.layers, m.model.norm)


def test_gpt2_blocks_and_last_hook():
    m = tiny_gpt2()
    assert find_blocks(m) is m.transformer.h
    _check_capture(m, m.transformer.h, m.transformer.ln_f)


@pytest.mark.parametrize("arch", ["opt", "bloom", "gpt_neox"])
def test_other_architectures(arch):
    build, blocks_of, norm_of = _others()[arch]
    torch.manual_seed(0)
    m = build().eval()
    assert find_blocks(m) is blocks_of(m)
    _check_capture(m, blocks_of(m), norm_of(m))


def test_find_blocks_fallback_and_error():
    class Cfg:
        num_hidden_layers = 4

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Cfg()
            self.heads = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
            self.stack = torch.nn.Module()
            self.stack.weird_name = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(4)])

    m = Odd()
    assert find_blocks(m) is m.stack.weird_name
    Cfg.num_hidden_layers = 7
    with pytest.raises(ConfigError, match="num_hidden_layers=7"):
        find_blocks(m)
    # DeepSpeed/DDP-style wrappers (a DeepSpeedEngine also has a `config`: the DeepSpeed config dict)
    wrapper = torch.nn.Module()
    wrapper.module = tiny_mistral()
    assert find_blocks(wrapper) is wrapper.module.model.layers
    wrapper.config = {"train_batch_size": 8}
    assert find_blocks(wrapper) is wrapper.module.model.layers
    with BlockCapture(wrapper) as cap:
        wrapper.module(input_ids=_ids(1, 5))
    assert len(cap.states) == L + 1 and all(s is not None for s in cap.states)


def test_hooks_removed_and_exceptions():
    m = tiny_mistral()
    blocks = m.model.layers
    with pytest.raises(RuntimeError, match="boom"):
        with BlockCapture(m):
            assert len(blocks[0]._forward_pre_hooks) == 1
            assert all(len(b._forward_hooks) == 1 for b in blocks)
            raise RuntimeError("boom")
    assert len(blocks[0]._forward_pre_hooks) == 0
    assert all(len(b._forward_hooks) == 0 for b in blocks)


def test_detach_false_keeps_graph_and_layers_subset():
    m = tiny_mistral()
    ids = _ids(2, 9)
    with BlockCapture(m, detach=False) as cap:
        m(input_ids=ids)
    assert all(s.requires_grad for s in cap.states)
    (cap.states[2] - cap.states[1]).pow(2).mean().backward()
    g = m.model.layers[1].mlp.down_proj.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert m.model.layers[2].mlp.down_proj.weight.grad is None  # block 2 is after states[2]
    with torch.no_grad(), BlockCapture(m, layers=[1]) as cap:
        m(input_ids=ids)
    assert [s is not None for s in cap.states] == [False, True, True, False]
    with torch.no_grad(), BlockCapture(m, detach=True) as cap:
        m(input_ids=ids)
    assert not any(s.requires_grad for s in cap.states)
    with pytest.raises(ConfigError, match="out of range"):
        BlockCapture(m, layers=[3])


def _reference_states(model, seqs):
    """Per-sequence, unpadded runs; block boundaries from output_hidden_states and a pre-hook on the norm."""
    per_layer = [[] for _ in range(L + 1)]
    captured = {}
    handle = model.model.norm.register_forward_pre_hook(lambda mod, args: captured.__setitem__("pre_norm", args[0]))
    try:
        with torch.no_grad():
            for s in seqs:
                out = model(input_ids=s[None], output_hidden_states=True)
                for i in range(L):
                    per_layer[i].append(out.hidden_states[i][0])
                per_layer[L].append(captured["pre_norm"][0])
    finally:
        handle.remove()
    return [torch.cat(p).double().numpy() for p in per_layer]


def _ref_score(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    a, *_ = np.linalg.lstsq(x, y, rcond=None)
    return 1 - ((x @ a - y) ** 2).sum()


def test_measure_model_excludes_padding():
    m = tiny_mistral().double()
    lengths = [23, 9, 17, 30, 5, 12]
    seqs = [_ids(1, n, seed=10 + k)[0] for k, n in enumerate(lengths)]
    t = max(lengths)
    batches = []
    for k in range(0, len(seqs), 3):  # right-padded batches of 3
        group = seqs[k : k + 3]
        ids = torch.zeros(len(group), t, dtype=torch.long)
        mask = torch.zeros(len(group), t, dtype=torch.long)
        for j, s in enumerate(group):
            ids[j, : len(s)] = s
            mask[j, : len(s)] = 1
            ids[j, len(s) :] = 7  # padding id: would change the scores if it were counted
        batches.append({"input_ids": ids, "attention_mask": mask})
    m.train()  # measure_model must switch to eval and back
    res = measure_model(m, batches, progress=False)
    assert m.training
    m.eval()
    assert isinstance(res, ModelLinearity)
    assert res.pairs == [f"block {i}: input -> output (pre final norm)" for i in range(L)]
    ref = _reference_states(m, seqs)
    n = sum(lengths)
    for i, layer in enumerate(res.layers):
        assert layer.n_tokens == n and layer.dim == D
        x, y = ref[i], ref[i + 1]
        assert abs(layer.linearity - _ref_score(x, y)) < 1e-8
        assert abs(layer.linearity_wo_residual - _ref_score(x, y - x)) < 1e-8
        want_ratio = np.mean(np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1))
        assert abs(layer.contribution_norm - want_ratio) < 1e-9 * want_ratio
        assert layer.baseline == pytest.approx(D / (n - 1))
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert len(d["layers"]) == L and d["pairs"][2].startswith("block 2")
    assert res.mean("linearity") == pytest.approx(np.mean([l.linearity for l in res.layers]))
    with pytest.raises(ConfigError, match="unknown metric"):
        res.mean("nope")
    # float32 statistics (faster on some GPUs) agree to float32 accuracy
    res32 = measure_model(m.float(), batches, accumulate_dtype=torch.float32)
    m.double()
    for a, b in zip(res32.layers, res.layers):
        assert abs(a.linearity - b.linearity) < 1e-4
    # a subset of pairs, and 1-D input_ids without mask
    sub = measure_model(m, [{"input_ids": s} for s in seqs], layers=[-1])
    assert sub.pairs == ["block 2: input -> output (pre final norm)"]
    assert abs(sub.layers[0].linearity - res.layers[2].linearity) < 1e-8


def test_measure_model_errors():
    m = tiny_mistral()
    with pytest.raises(DataError, match="no batches"):
        measure_model(m, [])
    with pytest.raises(DataError, match="input_ids"):
        measure_model(m, [{"ids": _ids(1, 4)}])
    with pytest.raises(ConfigError, match="process group"):
        measure_model(m, [{"input_ids": _ids(2, 30)}], distributed=True)
    # an overflowing model (one Inf in the embeddings) is refused, not scored without the broken feature
    with torch.no_grad():
        m.model.embed_tokens.weight[5, 0] = float("inf")
    ids = _ids(2, 30)
    ids[0, 3] = 5
    with pytest.raises(DataError, match=r"non-finite hidden states .* in x \(the block input\)"):
        measure_model(m, [{"input_ids": ids}])


def test_measure_model_distributed_rank_without_batches(tmp_path):
    import torch.multiprocessing as mp

    from tests._tiny_lm import TinyLM, ids, measure_worker

    mp.spawn(measure_worker, args=(str(tmp_path / "init"), str(tmp_path / "r1.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "r1.pt")
    want = measure_model(TinyLM(), [{"input_ids": ids(2, 20, seed=1)}, {"input_ids": ids(3, 8, seed=2)}]).to_dict()
    assert got["pairs"] == want["pairs"]
    for g, w in zip(got["layers"], want["layers"]):
        assert g["n_tokens"] == w["n_tokens"] == 64
        for key in ("linearity", "linearity_wo_residual", "contribution_norm", "cosine"):
            assert g[key] == pytest.approx(w[key], rel=1e-9)
