"""A decoder block replaced by a fitted linear map, and the model classes that load such models.

This file is self-contained on purpose (it imports only torch and transformers): ``save_pruned`` copies it
verbatim into every saved folder that holds linear replacements, as ``modeling_linreg_pruned.py``, and points
``config.json``'s ``auto_map`` at it. So a pruned folder loads with

* ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` (the code is the small file in the
  folder itself; it works offline and needs no ``linreg`` install), or
* ``linreg.pruning.load_pruned(folder)``, which registers the same classes from the installed package and needs
  no ``trust_remote_code``.

Plain ``AutoModelForCausalLM.from_pretrained(folder)`` without either refuses to load (the folder's
``model_type`` is ``linreg_pruned_<base>``, unknown to Transformers), instead of silently building the
original architecture with a randomly initialised block where the linear map belongs. Folders with removed
blocks only are ordinary Hugging Face folders of the original class and need none of this.

How a replaced model is represented: the pruned class subclasses the original one (for example
``MistralForCausalLM``); its ``__init__`` builds the original architecture, then puts a :class:`LinearBlock`
at every index listed in ``config.linreg_pruning["linear_layers"]``. Its weights are stored under the
block's usual prefix (``model.layers.5.weight``, ``model.layers.5.bias``).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

__all__ = ["LinearBlock", "pruned_classes", "install_linear_blocks", "PRUNING_KEY"]

PRUNING_KEY = "linreg_pruning"  # config attribute: {"linear_layers": [...], "tuple_output": bool, ...}

# Attribute paths of the decoder-block ModuleList, same list as linreg.hidden (kept here so the file is
# self-contained when copied into a model folder).
_BLOCK_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "transformer.layers",
    "transformer.blocks",
    "layers",
    "decoder.layers",
    "h",
)
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _blocks_of(model: nn.Module) -> nn.ModuleList:
    n = getattr(model.config, "num_hidden_layers", None)
    for path in _BLOCK_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0 and (n is None or len(obj) == n):
            return obj
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} (tried {', '.join(_BLOCK_PATHS)})")


def _length_layer_class():
    """A KV-cache layer that stores nothing and only counts positions (None if this transformers has no
    per-layer cache objects)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - transformers < 4.54
        return None

    class LengthOnlyCacheLayer(DynamicLayer):
        """Cache slot of a linear block: no keys or values, but the position count that ``get_seq_length`` and
        mask sizes read (layer 0's slot is what generation asks for the past length)."""

        is_sliding = False
        is_compileable = False

        def __init__(self, length: int = 0, **kwargs):
            super().__init__()
            self.length = int(length)
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover - never updated
            pass

        def update(self, key_states, value_states, *args, **kwargs):  # pragma: no cover - never called
            raise RuntimeError("the cache slot of a linear block holds no keys or values")

        def advance(self, n: int) -> None:
            self.length += int(n)

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length + query_length, 0

        def get_max_length(self) -> int:
            return -1

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove < 0:
                self.length = max(0, self.length + tokens_to_remove)
            elif tokens_to_remove > 0:  # legacy meaning: the new absolute length
                self.length = min(self.length, tokens_to_remove)

        def reset(self) -> None:
            self.length = 0

        def offload(self) -> None: ...
        def prefetch(self) -> None: ...
        def reorder_cache(self, beam_idx) -> None: ...
        def batch_repeat_interleave(self, repeats: int) -> None: ...
        def batch_select_indices(self, indices) -> None: ...

    return LengthOnlyCacheLayer


_LENGTH_LAYER = _length_layer_class()


def _output_collector():
    """The ``ContextVar`` through which Transformers 5 gathers ``output_hidden_states`` / ``output_attentions``
    (None on versions that collect them in the decoder loop itself, where a LinearBlock needs no help)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - other transformers versions
        return None
    return _active_collector


_COLLECTOR = _output_collector()


class LinearBlock(nn.Module):
    """Affine stand-in for a decoder block: ``h -> h @ W + b`` applied to every token independently.

    Stored in residual form, ``W = I + weight.T`` (``weight`` is ``[d, d]`` in ``nn.Linear`` layout), so that the
    identity part of W is exact in any dtype and bf16/fp16 rounding only touches the block's own contribution.
    ``weight = 0, bias = 0`` is the identity, i.e. the block removed.

    It takes the block's call signature (``hidden_states`` first, anything else ignored) and returns what the
    block returned: a plain tensor (Transformers 5 decoder layers) or a 1-tuple (``tuple_output=True``, older
    layers). Given a KV cache, it keeps the position count of its own cache slot (no keys or values), so
    ``generate`` sees the right past length even when block 0 is linear.
    """

    def __init__(self, hidden_size: int, tuple_output: bool = False, layer_idx: int | None = None,
                 attention_type: str | None = None):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.weight = nn.Parameter(torch.zeros(self.hidden_size, self.hidden_size))
        self.bias = nn.Parameter(torch.zeros(self.hidden_size))
        self.tuple_output = bool(tuple_output)
        self.layer_idx = layer_idx
        if attention_type is not None:
            self.attention_type = attention_type

    @classmethod
    def from_affine(cls, w: torch.Tensor, b: torch.Tensor, *, tuple_output: bool = False, layer_idx: int | None = None,
                    attention_type: str | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> "LinearBlock":
        """From ``(W [d, d], b [d])`` with ``y = x @ W + b`` (float64 from ``LinearityAccumulator.fit_affine``)."""
        d = w.shape[0]
        if tuple(w.shape) != (d, d) or tuple(b.shape) != (d,):
            raise ValueError(f"expected W [d, d] and b [d], got {tuple(w.shape)} and {tuple(b.shape)}")
        block = cls(d, tuple_output=tuple_output, layer_idx=layer_idx, attention_type=attention_type)
        with torch.no_grad():
            w64 = w.detach().to("cpu", torch.float64)
            a = (w64 - torch.eye(d, dtype=torch.float64)).T
            block.weight.copy_(a.to(torch.float32))
            block.bias.copy_(b.detach().to("cpu", torch.float32))
        return block.to(device=device, dtype=dtype)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, b)`` in float64 with ``y = x @ W + b``."""
        w = self.weight.detach().double().T + torch.eye(self.hidden_size, dtype=torch.float64, device=self.weight.device)
        return w, self.bias.detach().double()

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, layer_idx={self.layer_idx}, tuple_output={self.tuple_output}"

    def _track_cache(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> None:
        if _LENGTH_LAYER is None or self.layer_idx is None:
            return
        cache = None
        for key in _CACHE_KWARGS:
            if kwargs.get(key) is not None:
                cache = kwargs[key]
                break
        if cache is None:
            for a in args:
                if hasattr(a, "layers") and hasattr(a, "get_seq_length"):
                    cache = a
                    break
        if cache is None:
            return
        cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache
        layers = getattr(cache, "layers", None)
        if not isinstance(layers, list):
            return
        i = int(self.layer_idx)
        if i < len(layers):
            slot = layers[i]
            if not isinstance(slot, _LENGTH_LAYER):
                past = slot.get_seq_length() if hasattr(slot, "get_seq_length") and getattr(slot, "is_initialized", False) else 0
                slot = layers[i] = _LENGTH_LAYER(int(past))
        else:
            while len(layers) < i:  # cannot happen when blocks run in order; keep indices aligned anyway
                layers.append(_LENGTH_LAYER(0))
            slot = _LENGTH_LAYER(0)
            layers.append(slot)
        slot.advance(hidden_states.shape[-2] if hidden_states.dim() >= 2 else 1)

    @staticmethod
    def _record_outputs(hidden_states: torch.Tensor, out: torch.Tensor) -> None:
        """Take the decoder layer's part in Transformers 5 output recording: ``output_hidden_states`` is filled by
        hooks on the architecture's decoder-layer class, which a LinearBlock is not, so without this the model
        would return L instead of L + 1 hidden states, shifted. The block's output goes in like any layer's (and
        its input first when it is block 0); its attention weights are None (it has none). Other recorded outputs
        (MoE router logits, cross-attentions) get no entry from a linear block."""
        collected = _COLLECTOR.get() if _COLLECTOR is not None else None
        if not collected:
            return
        states = collected.get("hidden_states")
        if states is not None:
            selection = collected.get("_hidden_states_layers")
            if not states:  # block 0: the initial hidden state first, as the layer hooks do
                states.append(hidden_states if selection is None or 0 in selection else None)
            states.append(out if selection is None or len(states) in selection else None)
        attentions = collected.get("attentions")
        if attentions is not None:
            attentions.append(None)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if isinstance(hidden_states, (tuple, list)):
            hidden_states = hidden_states[0]
        self._track_cache(hidden_states, args, kwargs)
        out = hidden_states + nn.functional.linear(hidden_states, self.weight.to(hidden_states.dtype),
                                                   self.bias.to(hidden_states.dtype))
        self._record_outputs(hidden_states, out)
        return (out,) if self.tuple_output else out


def install_linear_blocks(model: nn.Module, info: dict) -> None:
    """Put (zero-initialised) LinearBlocks at ``info["linear_layers"]`` of ``model``'s block list."""
    blocks = _blocks_of(model)
    hidden = int(info.get("hidden_size") or model.config.hidden_size)
    for i in info.get("linear_layers", []):
        i = int(i)
        if not 0 <= i < len(blocks):
            raise ValueError(f"{PRUNING_KEY}.linear_layers: index {i} out of range for {len(blocks)} blocks")
        old = blocks[i]
        blocks[i] = LinearBlock(hidden, tuple_output=bool(info.get("tuple_output", False)), layer_idx=i,
                                attention_type=getattr(old, "attention_type", None))


_CLASS_CACHE: dict[tuple[str, str], tuple[type, type]] = {}


def pruned_classes(base_model_class: str | type, base_config_class: str | type | None = None) -> tuple[type, type]:
    """``(ConfigClass, ModelClass)`` of a pruned model whose original class is ``base_model_class`` (a class or
    its name in ``transformers``). ``model_type`` is ``linreg_pruned_<base model_type>``."""
    tf = importlib.import_module("transformers")
    base = getattr(tf, base_model_class) if isinstance(base_model_class, str) else base_model_class
    if base_config_class is None:
        base_cfg = base.config_class
    else:
        base_cfg = getattr(tf, base_config_class) if isinstance(base_config_class, str) else base_config_class
    key = (f"{base.__module__}.{base.__qualname__}", f"{base_cfg.__module__}.{base_cfg.__qualname__}")
    if key in _CLASS_CACHE:
        return _CLASS_CACHE[key]
    model_type = f"linreg_pruned_{base_cfg.model_type}"
    cfg_cls = type(f"LinregPruned{base_cfg.__name__}", (base_cfg,), {"model_type": model_type, "__module__": __name__})

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        info = getattr(config, PRUNING_KEY, None) or {}
        install_linear_blocks(self, info)

    model_cls = type(f"LinregPruned{base.__name__}", (base,), {"config_class": cfg_cls, "__init__": __init__,
                                                               "__module__": __name__})
    _register_weight_conversions(base.__name__, base_cfg.model_type, model_cls.__name__, model_type)
    _CLASS_CACHE[key] = (cfg_cls, model_cls)
    return cfg_cls, model_cls


def _register_weight_conversions(base_class: str, base_type: str, pruned_class: str, pruned_type: str) -> None:
    """Give the pruned class and model_type the checkpoint weight renamings of the original ones.

    Transformers 5 renames weights between the checkpoint layout and the modules on every save and load (GPT-NeoX
    ``embed_out`` <-> ``lm_head``, Mixtral's per-expert ``w1/w2/w3`` <-> fused expert tensors, ...) with rules it
    looks up by class name, then by ``model_type``; classes defined outside the library only get rules registered
    for them explicitly. Without this, a pruned GPT-NeoX or MoE folder (written by the original class, so in the
    checkpoint layout) would reload with missing weights."""
    try:
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
    except ImportError:  # transformers 4: module attributes are the checkpoint names, nothing to rename
        return
    for source, target in ((base_class, pruned_class), (base_type, pruned_type)):
        rules = get_checkpoint_conversion_mapping(source)
        if rules is not None:
            register_checkpoint_conversion_mapping(target, rules, overwrite=True)
