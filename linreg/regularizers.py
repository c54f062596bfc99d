"""Linearity regularizers added to the training loss (pretraining experiments of the paper).

Interface (also in ``docs/metrics.md``)::

    reg = build_regularizer(name, weight, layers=None, **kwargs)   # None for name "none"
    loss = lm_loss + reg(hidden_states, attention_mask=mask, model=model)

``hidden_states`` is :attr:`linreg.hidden.BlockCapture.states` captured with ``detach=False``: L + 1
tensors ``[B, T, d]``, pair i = ``states[i] -> states[i + 1]`` (block i, pre final norm).
``layers`` selects the pairs that take part (default: all; negative indices count from the end).
``attention_mask`` ``[B, T]`` (1 = real token) excludes padding from every mean. The returned scalar
is already multiplied by ``weight``. Values are computed in float32 (bf16/fp16 states are upcast).

Built-in regularizers (``REGISTRY``):

``cosine``  ``weight * mean_{pairs, tokens} (1 - cos(h_l, h_{l+1}))`` — the paper's cosine-similarity
            regularizer: it pulls consecutive hidden states towards the same direction (a negative
            weight pushes them apart). Scale-free, so it does not fight the growth of the residual
            stream norm.
``mse``     ``weight * mean_{pairs, tokens} mean_{features} (h_{l+1} - h_l)^2`` — the paper's MSE
            regularizer on consecutive hidden states (mean squared block contribution per feature).
``weight``  ``weight * mean_{blocks} (sum_W ||W||_F^2 / sum_W numel(W))`` over the *output projections*
            of each selected block (the linear maps that write into the residual stream: ``o_proj``,
            ``down_proj``, GPT-2 ``c_proj``, OPT ``out_proj``/``fc2``, BLOOM/NeoX ``dense`` and
            ``dense_4h_to_h``...). It is the mean squared entry of those weights, i.e. a targeted
            weight decay that drives every block towards the identity map (a zero residual branch),
            the weight-space counterpart of ``mse``. Needs ``model=``; ``param_patterns`` (list of
            parameter-name suffixes) overrides the default set. Not available under ZeRO stage 3
            (parameters are partitioned outside forward).

Plugins: any ``"package.module:ClassName"`` import path works as a name. The class must accept
``(weight, layers=None, **kwargs)`` and be callable as ``(hidden_states, attention_mask=None,
model=None) -> Tensor``; subclassing :class:`Regularizer` gives ``pairs()`` and ``masked_mean()``
helpers. Example (``examples/custom_regularizer.py``)::

    import torch
    from linreg.regularizers import Regularizer

    class RelativeMSE(Regularizer):
        '''weight * mean over pairs and tokens of ||h_{l+1} - h_l||^2 / ||h_l||^2.'''

        def __call__(self, hidden_states, attention_mask=None, model=None):
            terms = []
            for h0, h1 in self.pairs(hidden_states):
                per_token = (h1 - h0).pow(2).sum(-1) / h0.pow(2).sum(-1).clamp_min(1e-12)
                terms.append(self.masked_mean(per_token, attention_mask))
            return self.weight * torch.stack(terms).mean()

    build_regularizer("custom_regularizer:RelativeMSE", weight=0.1)   # with examples/ on sys.path
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from linreg.errors import ConfigError

__all__ = [
    "Regularizer",
    "RegularizerProtocol",
    "CosineRegularizer",
    "consecutive_cosine",
    "MSERegularizer",
    "WeightRegularizer",
    "REGISTRY",
    "build_regularizer",
    "available_regularizers",
    "register",
]


@runtime_checkable
class RegularizerProtocol(Protocol):
    """What the trainer needs from a regularizer (plugins need not subclass :class:`Regularizer`)."""

    def __call__(self, hidden_states: list[torch.Tensor], attention_mask: torch.Tensor | None = None, model: Any = None) -> torch.Tensor: ...


class Regularizer:
    """Base class with the shared helpers; subclasses implement ``__call__``."""

    #: whether ``__call__`` needs the hidden states (False: the trainer may skip BlockCapture)
    needs_hidden_states: bool = True

    def __init__(self, weight: float, layers: Sequence[int] | None = None, **kwargs: Any):
        if kwargs:
            raise ConfigError(f"regularizer {type(self).__name__}: unknown options {sorted(kwargs)}")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"regularizer {type(self).__name__}: weight must be a number, got {weight!r}") from None
        if not math.isfinite(weight):
            raise ConfigError(f"regularizer {type(self).__name__}: weight must be finite, got {weight}")
        self.weight = weight
        if layers is not None:
            try:
                layers = [int(i) for i in layers]
            except (TypeError, ValueError):
                raise ConfigError(f"regularizer {type(self).__name__}: layers must be a list of integers, got {layers!r}") from None
            if not layers:
                raise ConfigError(f"regularizer {type(self).__name__}: layers is empty (use null for all pairs)")
        self.layers = layers

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight}, layers={self.layers})"

    # -- helpers ------------------------------------------------------------------------------
    def pair_indices(self, n_pairs: int) -> list[int]:
        """Indices of the selected pairs among ``n_pairs`` (validates ``layers``)."""
        if self.layers is None:
            return list(range(n_pairs))
        bad = [i for i in self.layers if not -n_pairs <= i < n_pairs]
        if bad:
            raise ConfigError(f"regularizer layers {bad} out of range: the model has {n_pairs} pairs (0..{n_pairs - 1})")
        return sorted({i % n_pairs for i in self.layers})

    def pairs(self, hidden_states: Sequence[torch.Tensor | None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Selected consecutive pairs ``(h_l, h_{l+1})`` upcast to float32 (at least)."""
        n_pairs = len(hidden_states) - 1
        if n_pairs < 1:
            raise ConfigError(f"regularizer needs at least 2 hidden states (got {len(hidden_states)})")
        out = []
        for i in self.pair_indices(n_pairs):
            h0, h1 = hidden_states[i], hidden_states[i + 1]
            if h0 is None or h1 is None:
                raise ConfigError(f"regularizer: hidden states of pair {i} were not captured (BlockCapture layers?)")
            out.append((_upcast(h0), _upcast(h1)))
        return out

    @staticmethod
    def masked_mean(per_token: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean of ``per_token`` ([B, T]) over the tokens with ``attention_mask`` 1."""
        if attention_mask is None:
            return per_token.mean()
        m = attention_mask.to(device=per_token.device, dtype=per_token.dtype)
        if m.shape != per_token.shape:
            raise ConfigError(f"attention_mask shape {tuple(m.shape)} does not match tokens shape {tuple(per_token.shape)}")
        return (per_token * m).sum() / m.sum().clamp_min(1.0)

    def __call__(self, hidden_states: list[torch.Tensor], attention_mask: torch.Tensor | None = None, model: Any = None) -> torch.Tensor:
        raise NotImplementedError


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _ConsecutiveCosine(torch.autograd.Function):
    """``cos[p] = <h_i, h_{i+1}> / max(|h_i| |h_{i+1}|, eps)`` for the pairs ``i = pair_idx[p]``.

    One pass per state for its squared norm (shared by the two pairs a state belongs to), one dot
    product per pair, and a closed-form backward,
    ``d cos / d h_i = h_{i+1} / den - cos h_i / |h_i|^2`` (the second term vanishes where the eps
    clamp is active), instead of autograd through a normalisation per pair. Computed in float32 at
    least; nothing is saved beyond per-token scalars (the states are already held by the model's graph).

    Memory: both passes go one state at a time. The forward holds at most two upcast states; the
    backward builds each state's gradient from its (at most two) pairs in float32 and casts it to the
    state's dtype at once, so besides the returned gradients it needs about three float32 copies of
    one state, not float32 copies of every state and of every gradient.
    """

    @staticmethod
    def forward(ctx, pair_idx, eps, *states):
        need = sorted({j for i in pair_idx for j in (i, i + 1)})
        selected = set(pair_idx)
        nsq: dict[int, torch.Tensor] = {}
        dots: dict[int, torch.Tensor] = {}
        prev = None  # the upcast state j - 1 while pair j - 1 still needs it
        for j in need:
            h = _upcast(states[j])
            nsq[j] = torch.linalg.vecdot(h, h)
            if j - 1 in selected:
                dots[j - 1] = torch.linalg.vecdot(prev, h)
            prev = h if j in selected else None
        del prev
        cos, den = [], []
        for i in pair_idx:
            d = torch.sqrt(nsq[i] * nsq[i + 1]).clamp_min_(eps)
            cos.append(dots[i] / d)
            den.append(d)
        cos = torch.stack(cos)
        ctx.pair_idx, ctx.eps, ctx.need, ctx.n_states = pair_idx, eps, need, len(states)
        ctx.save_for_backward(cos, torch.stack(den), *[states[j] for j in need], *[nsq[j] for j in need])
        return cos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_cos):
        cos, den, *rest = ctx.saved_tensors
        k = len(ctx.need)
        raw = dict(zip(ctx.need, rest[:k]))
        nsq = dict(zip(ctx.need, rest[k:]))
        # the pairs each state belongs to, in pair order: (p, partner); state j is h_i of pair i = j and
        # h_{i+1} of pair i = j - 1
        roles: dict[int, list[tuple[int, int]]] = {j: [] for j in ctx.need}
        for p, i in enumerate(ctx.pair_idx):
            roles[i].append((p, i + 1))
            roles[i + 1].append((p, i))
        grads: list[torch.Tensor | None] = [None] * ctx.n_states
        for j in ctx.need:
            h = raw[j]
            acc = None
            for p, b in roles[j]:
                g = grad_cos[p]
                live = den[p] > ctx.eps  # where the clamp is active the denominator is a constant
                s1 = (g / den[p]).unsqueeze(-1)
                gc = g * cos[p]
                s2 = torch.where(live, gc / nsq[j].clamp_min(torch.finfo(nsq[j].dtype).tiny), 0.0).unsqueeze(-1)
                # raw * float32 scale computes in float32 (exact upcast), no upcast copy of the whole state
                ga = raw[b] * s1
                ga -= h * s2
                acc = ga if acc is None else acc.add_(ga)
                del ga
            grads[j] = acc.to(h.dtype)
            del acc
        return (None, None, *grads)


def consecutive_cosine(hidden_states: Sequence[torch.Tensor | None], pair_idx: Sequence[int], eps: float = 1e-8) -> torch.Tensor:
    """Per-token cosine of the selected consecutive pairs: ``[len(pair_idx), *states[0].shape[:-1]]``."""
    for i in pair_idx:
        if hidden_states[i] is None or hidden_states[i + 1] is None:
            raise ConfigError(f"regularizer: hidden states of pair {i} were not captured (BlockCapture layers?)")
    return _ConsecutiveCosine.apply(list(pair_idx), float(eps), *hidden_states)


class CosineRegularizer(Regularizer):
    """``weight * mean_{pairs, tokens} (1 - cos(h_l, h_{l+1}))``, ``cos = <a, b> / max(|a| |b|, eps)``."""

    def __init__(self, weight: float, layers: Sequence[int] | None = None, eps: float = 1e-8, **kwargs: Any):
        super().__init__(weight, layers, **kwargs)
        self.eps = float(eps)

    def __call__(self, hidden_states, attention_mask=None, model=None):
        n_pairs = len(hidden_states) - 1
        if n_pairs < 1:
            raise ConfigError(f"regularizer needs at least 2 hidden states (got {len(hidden_states)})")
        cos = consecutive_cosine(hidden_states, self.pair_indices(n_pairs), self.eps)  # [P, B, T]
        # every pair has the same tokens, so the mean over pairs of the masked means is one masked mean
        return self.weight * self.masked_mean(1.0 - cos.mean(dim=0), attention_mask)


class MSERegularizer(Regularizer):
    """``weight * mean_{pairs, tokens} mean_{features} (h_{l+1} - h_l)^2``."""

    def __call__(self, hidden_states, attention_mask=None, model=None):
        terms = [self.masked_mean((h1 - h0).pow(2).mean(dim=-1), attention_mask) for h0, h1 in self.pairs(hidden_states)]
        return self.weight * torch.stack(terms).mean()


#: parameter-name suffixes of the linear maps that write a block's output into the residual stream
OUTPUT_PROJECTIONS = (
    "self_attn.o_proj.weight",  # Llama, Mistral, Qwen, Gemma
    "mlp.down_proj.weight",
    "attn.c_proj.weight",  # GPT-2
    "mlp.c_proj.weight",
    "self_attn.out_proj.weight",  # OPT
    "fc2.weight",
    "self_attention.dense.weight",  # BLOOM
    "attention.dense.weight",  # GPT-NeoX
    "mlp.dense_4h_to_h.weight",  # BLOOM, GPT-NeoX
)


class WeightRegularizer(Regularizer):
    """``weight * mean_{blocks} (sum ||W||_F^2 / sum numel(W))`` over each block's output projections."""

    needs_hidden_states = False

    def __init__(self, weight: float, layers: Sequence[int] | None = None, param_patterns: Sequence[str] | None = None, **kwargs: Any):
        super().__init__(weight, layers, **kwargs)
        patterns = OUTPUT_PROJECTIONS if param_patterns is None else param_patterns
        if isinstance(patterns, str) or not patterns:
            raise ConfigError("weight regularizer: param_patterns must be a non-empty list of parameter-name suffixes")
        self.param_patterns = tuple(str(p) for p in patterns)

    def block_params(self, model: Any) -> list[list[torch.Tensor]]:
        from linreg.hidden import find_blocks

        blocks = find_blocks(model)
        out = []
        for i in self.pair_indices(len(blocks)):
            params = [p for name, p in blocks[i].named_parameters() if any(name == pat or name.endswith("." + pat) for pat in self.param_patterns)]
            if not params:
                names = ", ".join(name for name, _ in blocks[i].named_parameters())
                raise ConfigError(
                    f"weight regularizer: no parameter of block {i} matches {list(self.param_patterns)}; "
                    f"pass param_patterns (suffixes among: {names})"
                )
            if any(p.numel() == 0 and hasattr(p, "ds_tensor") for p in params):
                raise ConfigError("weight regularizer: parameters are partitioned (DeepSpeed ZeRO stage 3); use stage <= 2 or a hidden-state regularizer")
            out.append(params)
        return out

    def __call__(self, hidden_states=None, attention_mask=None, model=None):
        if model is None:
            raise ConfigError("weight regularizer needs the model: call it as reg(states, mask, model=model)")
        terms = []
        for params in self.block_params(model):
            sq = torch.stack([p.float().pow(2).sum() for p in params]).sum()
            terms.append(sq / sum(p.numel() for p in params))
        return self.weight * torch.stack(terms).mean()


REGISTRY: dict[str, type] = {
    "cosine": CosineRegularizer,
    "mse": MSERegularizer,
    "weight": WeightRegularizer,
}


def register(name: str):
    """Class decorator adding a regularizer to ``REGISTRY`` under ``name``."""

    def deco(cls: type) -> type:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ConfigError(f"regularizer name {name!r} is already registered ({REGISTRY[name].__name__})")
        REGISTRY[name] = cls
        return cls

    return deco


def available_regularizers() -> list[str]:
    return ["none", *sorted(REGISTRY)]


def _choices() -> str:
    return ", ".join(available_regularizers()) + ", or a plugin 'package.module:ClassName'"


def _resolve(name: str) -> type:
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" not in name:
        raise ConfigError(f"unknown regularizer {name!r}; available: {_choices()}")
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"bad regularizer plugin path {name!r}: expected 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"regularizer plugin {name!r}: cannot import module {module_name!r} ({exc}); available built-ins: {_choices()}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"regularizer plugin {name!r}: module {module_name!r} has no attribute {attr!r}; available built-ins: {_choices()}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"regularizer plugin {name!r}: {attr!r} is not a class or factory")
    return obj


def build_regularizer(name: str | None, weight: float, layers: Sequence[int] | None = None, **kwargs: Any):
    """Instantiate the regularizer ``name`` (``"none"``/None/"" give None).

    Raises ConfigError for an unknown name, an unimportable plugin, or options the class refuses.
    """
    if name is None or str(name).strip().lower() in ("", "none"):
        return None
    if not isinstance(name, str):
        raise ConfigError(f"regularizer name must be a string, got {type(name).__name__}")
    cls = _resolve(name.strip())
    try:
        reg = cls(weight, layers=layers, **kwargs)
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigError(f"regularizer {name!r}: bad options {sorted(kwargs)} or arguments ({exc})") from exc
    if not callable(reg):
        raise ConfigError(f"regularizer {name!r}: {cls!r} did not produce a callable")
    return reg
