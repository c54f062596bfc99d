"""Hidden states at the boundaries of the decoder blocks of any Hugging Face causal LM.

Pairing convention (used by every linearity number in this repo): for a model with L decoder blocks,
``states[0]`` is the input of block 0 (the embeddings, after any embedding dropout / scaling the model
applies) and ``states[i + 1]`` is the output of block i, taken by forward hooks on the blocks
themselves. Pair i is ``states[i] -> states[i + 1]``: exactly what block i computes, so the **last
pair ends before the final norm**. This differs from ``output_hidden_states=True``, whose last
entry already has the final norm applied in Llama/Mistral/Qwen/GPT-2/OPT/BLOOM/GPT-NeoX
(``hidden_states[-1] == final_norm(states[-1])``), which would make the last "layer" look less linear
than it is.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from linreg.errors import ConfigError, DataError
from linreg.metrics import LayerLinearity, LinearityAccumulator

__all__ = ["find_blocks", "BlockCapture", "measure_model", "ModelLinearity", "pair_label"]

# attribute paths of the decoder-block ModuleList in common architectures
_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3 (inside *ForCausalLM)
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, BLOOM, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.layers",
    "transformer.blocks",  # MPT
    "layers",  # a bare base model (MistralModel, LlamaModel)
    "decoder.layers",  # bare OPTDecoder / OPTModel
    "h",  # bare GPT2Model, BloomModel
)


def _unwrap(model: Any) -> torch.nn.Module:
    """Strip DeepSpeed / DDP / FSDP-style wrappers that keep the real model in ``.module``.

    A DeepSpeedEngine also has a ``config`` attribute (the DeepSpeed config), so the test is whether
    the object has a model config that names its number of layers.
    """
    for _ in range(4):
        inner = getattr(model, "module", None)
        if isinstance(inner, torch.nn.Module) and inner is not model and _num_layers(model) is None:
            model = inner
        else:
            break
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"expected a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
    return model


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _num_layers(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        try:
            cfg = cfg.get_text_config()
        except Exception:  # pragma: no cover - odd configs
            pass
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_blocks(model: Any) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks of a causal LM (Mistral/Llama/Qwen, GPT-2, OPT, BLOOM, NeoX...).

    Tries the known attribute paths, then falls back to the ModuleList whose length equals
    ``config.num_hidden_layers`` (or ``n_layer``). Raises ConfigError when nothing fits.
    """
    model = _unwrap(model)
    n_layers = _num_layers(model)
    for path in _BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            if n_layers is None or len(blocks) == n_layers:
                return blocks
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if n_layers is not None:
        matching = [(name, m) for name, m in candidates if len(m) == n_layers]
        if matching:
            # prefer the shallowest one (the decoder stack, not a list nested inside a block)
            matching.sort(key=lambda item: item[0].count("."))
            return matching[0][1]
    found = ", ".join(f"{name or '<root>'} (len {len(m)})" for name, m in candidates[:10]) or "none"
    raise ConfigError(
        f"cannot find the decoder blocks of {type(model).__name__}: none of the known paths "
        f"({', '.join(_BLOCK_PATHS)}) holds a ModuleList"
        + (f" of config.num_hidden_layers={n_layers} blocks" if n_layers is not None else "")
        + f"; ModuleLists present: {found}"
    )


def pair_label(i: int) -> str:
    """Human-readable description of pair i."""
    return f"block {i}: input -> output (pre final norm)"


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    for attr in ("hidden_states", "last_hidden_state"):
        hs = getattr(out, attr, None)
        if isinstance(hs, torch.Tensor):
            return hs
    raise DataError(f"cannot find the hidden-state tensor in a decoder block's output of type {type(out).__name__}")


class BlockCapture:
    """Context manager collecting the hidden states at every block boundary through forward hooks.

    ``states`` has L + 1 entries after each forward pass: ``states[0]`` the input of block 0 (from a
    forward pre-hook), ``states[i + 1]`` the output of block i (before the final norm). A new forward
    pass starts a new list. ``detach=True`` stores detached tensors (measurement);
    ``detach=False`` keeps them in the autograd graph (regularizers). ``layers`` (pair indices, pair
    i = block i) limits capture to the states those pairs need; the others stay None, so indices
    always match the pairing convention. Hooks are removed on exit, also after an exception.

    Under activation checkpointing the blocks run again during backward and the hooks fire again;
    read ``states`` between forward and backward.
    """

    def __init__(self, model: Any, detach: bool = True, layers: Iterable[int] | None = None):
        self.blocks = find_blocks(model)
        self.detach = detach
        n = len(self.blocks)
        if layers is None:
            wanted = set(range(n + 1))
        else:
            layers = [int(i) for i in layers]
            bad = [i for i in layers if not -n <= i < n]
            if bad:
                raise ConfigError(f"BlockCapture: layers {bad} out of range for a model with {n} blocks (pairs 0..{n - 1})")
            wanted = set()
            for i in layers:
                i %= n
                wanted.update((i, i + 1))
        self._wanted = wanted
        self.states: list[torch.Tensor | None] = [None] * (n + 1)
        self._handles: list[Any] = []

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self.detach else t

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.states = [None] * (len(self.blocks) + 1)
        if 0 not in self._wanted:
            return
        if args:
            h = args[0]
        elif "hidden_states" in kwargs:
            h = kwargs["hidden_states"]
        else:
            raise DataError(f"cannot find the hidden-state input of {type(module).__name__} (no positional arg, no hidden_states=)")
        self.states[0] = self._keep(_first_tensor(h))

    def _make_hook(self, i: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if i + 1 in self._wanted:
                self.states[i + 1] = self._keep(_first_tensor(output))

        return hook

    def __enter__(self) -> "BlockCapture":
        self._handles.append(self.blocks[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_hook(self._make_hook(i)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc: Any) -> None:
        self.remove()


@dataclass
class ModelLinearity:
    """Per-pair metrics of a whole model; ``pairs[i]`` says what ``layers[i]`` pairs."""

    layers: list[LayerLinearity]
    pairs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pairs:
            self.pairs = [pair_label(i) for i in range(len(self.layers))]

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": list(self.pairs), "layers": [layer.to_dict() for layer in self.layers]}

    def mean(self, metric: str = "linearity") -> float:
        """Mean of one metric over the pairs (ignoring undefined/NaN entries)."""
        if not self.layers:
            raise DataError("ModelLinearity.mean: no layers")
        if not hasattr(self.layers[0], metric):
            names = ", ".join(f for f in LayerLinearity.__dataclass_fields__)
            raise ConfigError(f"unknown metric {metric!r}; choose from: {names}")
        values = [float(getattr(layer, metric)) for layer in self.layers]
        values = [v for v in values if math.isfinite(v)]
        return sum(values) / len(values) if values else float("nan")

    def series(self, metric: str = "linearity") -> list[float]:
        return [float(getattr(layer, metric)) for layer in self.layers]


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _hidden_size(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


def _to_tensor(value: Any, device: torch.device) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    return t.to(device)


def measure_model(
    model: Any,
    batches: Iterable[dict[str, Any]],
    *,
    accumulate_dtype: torch.dtype = torch.float64,
    distributed: bool = False,
    progress: bool = False,
    layers: Iterable[int] | None = None,
) -> ModelLinearity:
    """Linearity metrics of every block of ``model`` over the tokens of ``batches``.

    ``batches`` yields dicts with ``input_ids`` ([B, T] or [T]) and optionally ``attention_mask``
    (padding tokens, mask 0, are excluded from every metric). Runs under ``torch.no_grad()`` in eval
    mode (the previous mode is restored). With ``distributed=True`` the statistics of all
    torch.distributed ranks are merged, so every rank gets the metrics of the union of the tokens
    (every rank must call it). ``layers`` restricts the result to those pairs (default: all).
    ``accumulate_dtype`` is the dtype of the statistics: keep float64; float32 cuts eigenvalues
    below ``d * eps32`` and so drops real directions of spread-spectrum states (scores too low; see
    ``LayerLinearity.precision_cut`` and ``linreg.metrics.PrecisionWarning``). Raises DataError on
    NaN/Inf hidden states.
    """
    base = _unwrap(model)
    blocks = find_blocks(base)
    n_blocks = len(blocks)
    pair_ids = list(range(n_blocks)) if layers is None else sorted({int(i) % n_blocks for i in layers})
    device = _model_device(base)
    accs: dict[int, LinearityAccumulator] = {}
    extra: dict[str, Any] = {}
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        params = {}
    if "use_cache" in params:
        extra["use_cache"] = False
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1  # the logits are not needed; keep the LM head cheap

    iterator: Iterable[dict[str, Any]] = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="linearity", unit="batch")

    was_training = base.training
    base.eval()
    try:
        with torch.no_grad(), BlockCapture(base, detach=True, layers=pair_ids) as cap:
            for batch in iterator:
                if "input_ids" not in batch:
                    raise DataError(f"measure_model: batch without input_ids (keys: {sorted(batch)})")
                ids = _to_tensor(batch["input_ids"], device).long()
                mask = batch.get("attention_mask")
                mask = _to_tensor(mask, device) if mask is not None else None
                if mask is not None and mask.shape != ids.shape:
                    raise DataError(f"measure_model: attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
                base(input_ids=ids, attention_mask=mask, **extra)
                tok_mask = mask.bool() if mask is not None else None
                for i in pair_ids:
                    x, y = cap.states[i], cap.states[i + 1]
                    if x is None or y is None:
                        raise DataError(f"measure_model: block {i} did not run (hooks captured nothing)")
                    acc = accs.get(i)
                    if acc is None:
                        acc = accs[i] = LinearityAccumulator(x.shape[-1], device=x.device, dtype=accumulate_dtype)
                    acc.update(x, y, mask=tok_mask)
    finally:
        if was_training:
            base.train()

    if distributed:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("measure_model(distributed=True) needs an initialized torch.distributed process group")
        dim = _hidden_size(base)
        for i in pair_ids:  # a rank without batches still takes part in the collectives
            if i not in accs:
                if dim is None:
                    raise DataError("measure_model: this rank got no batches and the model config has no hidden size")
                accs[i] = LinearityAccumulator(dim, dtype=accumulate_dtype)
            accs[i].all_reduce()
    if not accs:
        raise DataError("measure_model: no batches")
    return ModelLinearity(layers=[accs[i].result() for i in pair_ids], pairs=[pair_label(i) for i in pair_ids])
