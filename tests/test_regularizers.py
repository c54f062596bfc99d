"""linreg.regularizers: values and gradients against direct autograd formulas written here."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from linreg.errors import ConfigError
from linreg.regularizers import REGISTRY, Regularizer, build_regularizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _states(n_states: int = 4, b: int = 3, t: int = 7, d: int = 5, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(b, t, d, generator=g, dtype=dtype).requires_grad_(True) for _ in range(n_states)]
    return leaves


def _mask(b: int = 3, t: int = 7) -> torch.Tensor:
    lengths = torch.tensor([7, 3, 5])[:b]
    return (torch.arange(t)[None, :] < lengths[:, None]).long()


def _ref_cosine(states, mask, pairs):
    """Explicit loops: mean over pairs of (mean over real tokens of 1 - <a,b>/(|a||b|))."""
    per_pair = []
    for i in pairs:
        a, c = states[i], states[i + 1]
        total, count = 0.0, 0
        for bi in range(a.shape[0]):
            for ti in range(a.shape[1]):
                if mask is None or mask[bi, ti]:
                    u, v = a[bi, ti], c[bi, ti]
                    total = total + 1 - (u * v).sum() / torch.sqrt((u * u).sum() * (v * v).sum())
                    count += 1
        per_pair.append(total / count)
    return sum(per_pair) / len(per_pair)


def _ref_mse(states, mask, pairs):
    per_pair = []
    for i in pairs:
        diff2 = (states[i + 1] - states[i]) ** 2  # [B, T, d]
        per_tok = diff2.sum(-1) / diff2.shape[-1]
        m = torch.ones_like(per_tok) if mask is None else mask.to(per_tok.dtype)
        per_pair.append((per_tok * m).sum() / m.sum())
    return sum(per_pair) / len(per_pair)


def _grads(value, leaves):
    return torch.autograd.grad(value, leaves, allow_unused=True)


def _assert_same(got, want, leaves):
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=1e-12)
    for g1, g2 in zip(_grads(got, leaves), _grads(want, leaves)):
        if g2 is None:
            assert g1 is None or torch.count_nonzero(g1) == 0
        else:
            torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("layers", [None, [0, 2], [-1]])
def test_cosine_value_and_gradient(with_mask, layers):
    states = _states()
    mask = _mask() if with_mask else None
    reg = build_regularizer("cosine", weight=0.7, layers=layers)
    pairs = {None: [0, 1, 2], (0, 2): [0, 2], (-1,): [2]}[None if layers is None else tuple(layers)]
    _assert_same(reg(states, attention_mask=mask), 0.7 * _ref_cosine(states, mask, pairs), states)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("layers", [None, [1]])
def test_mse_value_and_gradient(with_mask, layers):
    states = _states(seed=1)
    mask = _mask() if with_mask else None
    reg = build_regularizer("mse", weight=2.5, layers=layers)
    pairs = [0, 1, 2] if layers is None else layers
    _assert_same(reg(states, attention_mask=mask), 2.5 * _ref_mse(states, mask, pairs), states)


def test_padding_does_not_matter():
    states = _states(seed=2)
    mask = _mask()
    moved = [s.detach().clone() for s in states]
    for s in moved:
        s[mask == 0] = 1e3 * torch.randn_like(s[mask == 0])
    for name in ("cosine", "mse"):
        reg = build_regularizer(name, weight=1.0)
        torch.testing.assert_close(reg(states, mask), reg(moved, mask))


def test_bf16_states_are_upcast():
    states = [s.detach().to(torch.bfloat16) for s in _states(seed=3)]
    got = build_regularizer("mse", weight=1.0)(states)
    assert got.dtype == torch.float32
    want = _ref_mse([s.double() for s in states], None, [0, 1, 2])
    assert abs(float(got) - float(want)) < 1e-5 * float(want)


def test_cosine_closed_form_backward_gradcheck():
    """The hand-written backward of the consecutive-pair cosine against finite differences (float64)."""
    from linreg.regularizers import consecutive_cosine

    states = [s.detach()[:2, :3].clone().requires_grad_(True) for s in _states(seed=4)]
    assert torch.autograd.gradcheck(lambda *h: consecutive_cosine(list(h), [0, 1, 2]), states)
    # a state shared by two pairs, and a selection that skips one
    assert torch.autograd.gradcheck(lambda *h: consecutive_cosine(list(h), [0, 2]), states)


def test_cosine_zero_vector_token_uses_eps():
    """A zero hidden state (the eps clamp is active) gives the clamped value and a finite gradient."""
    states = _states(seed=5)
    with torch.no_grad():
        states[1][0, 0].zero_()
    got = build_regularizer("cosine", weight=1.0, eps=1e-8, layers=[0])(states)
    a, b = states[0], states[1]
    den = torch.clamp_min(a.norm(dim=-1) * b.norm(dim=-1), 1e-8)
    want = (1 - (a * b).sum(-1) / den).mean()
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got, [a, b])
    g_want = torch.autograd.grad(want, [a, b])
    for x, y in zip(g_got, g_want):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y)


def test_cosine_bf16_states_gradients_keep_dtype():
    leaves = [s.detach().to(torch.bfloat16).requires_grad_(True) for s in _states(seed=6)]
    got = build_regularizer("cosine", weight=1.0)(leaves)
    assert got.dtype == torch.float32
    ref_leaves = [s.detach().double().requires_grad_(True) for s in leaves]
    want = _ref_cosine(ref_leaves, None, [0, 1, 2])
    assert abs(got.item() - want.item()) < 1e-5
    for g, r in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, ref_leaves)):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), r, rtol=2e-2, atol=1e-4)


def _all_at_once_cosine_grads(states, pair_idx, grad_cos, eps=1e-8):
    """The closed-form gradient evaluated the straightforward way (every state upcast, float32 gradients kept for
    all states until the end): the values the one-state-at-a-time backward must reproduce bit for bit."""
    up = [h.detach().float() if h.dtype in (torch.float16, torch.bfloat16) else h.detach() for h in states]
    nsq = [torch.linalg.vecdot(h, h) for h in up]
    grads = [None] * len(states)
    for p, i in enumerate(pair_idx):
        den = torch.sqrt(nsq[i] * nsq[i + 1]).clamp_min_(eps)
        cos = torch.linalg.vecdot(up[i], up[i + 1]) / den
        g = grad_cos[p]
        s1 = (g / den).unsqueeze(-1)
        for a, b in ((i, i + 1), (i + 1, i)):
            s2 = torch.where(den > eps, g * cos / nsq[a].clamp_min(torch.finfo(nsq[a].dtype).tiny), 0.0).unsqueeze(-1)
            ga = up[b] * s1 - up[a] * s2
            grads[a] = ga if grads[a] is None else grads[a].add_(ga)
    return [None if g is None else g.to(h.dtype) for g, h in zip(grads, states)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pairs", [[0, 1, 2, 3], [0, 2], [3, 1]])
def test_cosine_backward_exact_values(dtype, pairs):
    from linreg.regularizers import consecutive_cosine

    leaves = [s.detach().to(dtype).requires_grad_(True) for s in _states(n_states=5, b=2, t=9, d=16, seed=8)]
    with torch.no_grad():
        leaves[2][0, 0].zero_()  # one token on the eps clamp
    cos = consecutive_cosine(leaves, pairs)
    grad_cos = torch.randn(cos.shape, generator=torch.Generator().manual_seed(9))
    got = torch.autograd.grad(cos, leaves, grad_cos, allow_unused=True)
    want = _all_at_once_cosine_grads(leaves, pairs, grad_cos)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            assert g.dtype == dtype and torch.equal(g, w)


class _LiveBytes:
    """Bytes of tensor storage created by aten ops inside the context that are still alive, and their peak."""

    def __init__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        key, n = st.data_ptr(), st.nbytes()
                        if n and key not in tracker.seen:
                            tracker.seen.add(key)
                            tracker.live += n
                            tracker.peak = max(tracker.peak, tracker.live)
                            weakref.finalize(st, tracker._free, key, n)
                return out

        self.mode = Mode()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key, n):
        self.live -= n
        self.seen.discard(key)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    def start(self) -> int:
        self.peak = self.live
        return self.live


def test_cosine_regularizer_memory_one_state_at_a_time():
    """bf16 states: the forward holds at most two float32 upcasts, the backward about three float32 copies of one
    state besides the bf16 gradients it returns (before: float32 copies of every state, and float32 gradients of
    every state until the end: about 2 x 4 bytes per element per state)."""
    n_states, shape = 9, (2, 32, 128)
    f32_state = 4 * shape[0] * shape[1] * shape[2]  # bytes of one state in float32
    g = torch.Generator().manual_seed(10)
    leaves = [torch.randn(shape, generator=g).to(torch.bfloat16).requires_grad_(True) for _ in range(n_states)]
    reg = build_regularizer("cosine", weight=1.0)
    with _LiveBytes() as mem:
        states = [h * 1 for h in leaves]  # non-leaf states, as in a model's graph
        base = mem.start()
        loss = reg(states)
        fwd_peak = mem.peak - base
        base = mem.start()
        loss.backward()
        bwd_peak = mem.peak - base
    assert fwd_peak < 3.5 * f32_state, fwd_peak / f32_state
    # the returned bf16 gradients alone are n_states / 2 float32 states
    assert bwd_peak < (n_states / 2 + 4) * f32_state, bwd_peak / f32_state
    assert all(h.grad is not None and h.grad.dtype == torch.bfloat16 for h in leaves)


def _tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
    )
    return MistralForCausalLM(cfg)


def test_weight_regularizer_value_and_gradient():
    model = _tiny_mistral()
    reg = build_regularizer("weight", weight=3.0, layers=[0, 2])
    value = reg([], model=model)
    terms = []
    for i in (0, 2):
        o = model.model.layers[i].self_attn.o_proj.weight
        dn = model.model.layers[i].mlp.down_proj.weight
        terms.append(((o**2).sum() + (dn**2).sum()) / (o.numel() + dn.numel()))
    want = 3.0 * (terms[0] + terms[1]) / 2
    torch.testing.assert_close(value, want)
    value.backward()
    o = model.model.layers[0].self_attn.o_proj.weight
    n0 = o.numel() + model.model.layers[0].mlp.down_proj.weight.numel()
    # d/dW of 3 * mean_b(sum W^2 / n_b) = 3 * 2 W / (n_b * n_blocks)
    torch.testing.assert_close(o.grad, 3.0 * 2 * o.detach() / (n0 * 2))
    assert model.model.layers[1].self_attn.o_proj.weight.grad is None
    assert model.model.layers[0].self_attn.q_proj.weight.grad is None
    with pytest.raises(ConfigError, match="needs the model"):
        reg([])
    with pytest.raises(ConfigError, match="no parameter of block 0 matches"):
        build_regularizer("weight", weight=1.0, param_patterns=["nothing.weight"])([], model=model)


def test_weight_regularizer_gpt2_default_patterns():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0))
    value = build_regularizer("weight", weight=1.0)([], model=model)
    terms = []
    for blk in model.transformer.h:
        a, m = blk.attn.c_proj.weight, blk.mlp.c_proj.weight
        terms.append(((a**2).sum() + (m**2).sum()) / (a.numel() + m.numel()))
    torch.testing.assert_close(value, sum(terms) / 2)


def test_with_block_capture_training_signal():
    """The cosine regularizer on captured states back-propagates into the blocks."""
    from linreg.hidden import BlockCapture

    model = _tiny_mistral()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    reg = build_regularizer("cosine", weight=1.0, layers=[1])
    with BlockCapture(model, detach=False, layers=[1]) as cap:
        out = model(input_ids=ids, attention_mask=mask)
        loss = reg(cap.states, attention_mask=mask, model=model)
    # direct formula on the same tensors
    h1, h2 = cap.states[1], cap.states[2]
    cos = torch.nn.functional.cosine_similarity(h1, h2, dim=-1)
    want = ((1 - cos) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert model.model.layers[1].mlp.down_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[2].mlp.down_proj.weight.grad is None  # pair 1 ends at block 1's output
    assert out.logits.shape == (2, 9, 64)


def test_registry_and_errors():
    assert {"cosine", "mse", "weight"} <= set(REGISTRY)
    assert build_regularizer("none", weight=1.0) is None
    assert build_regularizer(None, weight=1.0) is None
    with pytest.raises(ConfigError) as info:
        build_regularizer("cosin", weight=1.0)
    msg = str(info.value)
    assert "'cosin'" in msg and "cosine" in msg and "mse" in msg and "weight" in msg and "package.module:ClassName" in msg
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg_xyz.mod'"):
        build_regularizer("no_such_pkg_xyz.mod:Reg", weight=1.0)
    with pytest.raises(ConfigError, match="has no attribute 'Nope'"):
        build_regularizer("linreg.regularizers:Nope", weight=1.0)
    with pytest.raises(ConfigError, match="expected 'package.module:ClassName'"):
        build_regularizer(":Reg", weight=1.0)
    with pytest.raises(ConfigError, match="unknown options"):
        build_regularizer("mse", weight=1.0, colour="red")
    with pytest.raises(ConfigError, match="finite"):
        build_regularizer("mse", weight=float("nan"))
    with pytest.raises(ConfigError, match="out of range"):
        build_regularizer("mse", weight=1.0, layers=[5])(_states())


def test_example_plugin_loads_by_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("custom_regularizer", None)
    reg = build_regularizer("custom_regularizer:RelativeMSE", weight=0.5, layers=[0, 1])
    assert isinstance(reg, Regularizer)
    states = _states(seed=4)
    mask = _mask()
    want_terms = []
    for i in (0, 1):
        a, c = states[i], states[i + 1]
        per_tok = ((c - a) ** 2).sum(-1) / (a**2).sum(-1)
        want_terms.append((per_tok * mask).sum() / mask.sum())
    _assert_same(reg(states, attention_mask=mask), 0.5 * (want_terms[0] + want_terms[1]) / 2, states)


def test_user_plugin_module(tmp_path, monkeypatch):
    pkg = tmp_path / "my_regs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "last_pair.py").write_text(
        textwrap.dedent(
            """
            import torch

            class LastPairL1:  # no base class: only the documented call signature
                def __init__(self, weight, layers=None, scale=1.0):
                    self.weight, self.scale = weight, scale

                def __call__(self, hidden_states, attention_mask=None, model=None):
                    return self.weight * self.scale * (hidden_states[-1] - hidden_states[-2]).abs().mean()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = build_regularizer("my_regs.last_pair:LastPairL1", weight=2.0, scale=3.0)
    states = _states(seed=5)
    torch.testing.assert_close(reg(states), 6.0 * (states[-1] - states[-2]).abs().mean())
    with pytest.raises(ConfigError, match="bad options"):
        build_regularizer("my_regs.last_pair:LastPairL1", weight=2.0, unknown=1)
