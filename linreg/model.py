"""The Mistral-architecture model of the recipes: construction, parameter counts, FLOPs per token."""

from __future__ import annotations

from typing import Any

import torch

from linreg.errors import ConfigError

# Dense peak tensor throughput per device (TFLOP/s) in bf16/fp16, from vendor data sheets; matched as a
# substring of torch.cuda.get_device_name(). Recipes may set train.peak_tflops instead.
PEAK_TFLOPS_BF16 = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A6000": 155.0,
    "L4": 121.0,
    "A10": 125.0,
    "V100": 125.0,
    "4090": 165.0,
    "3090": 71.0,
    "MI300X": 1307.0,
    "MI250X": 383.0,
}


def check_mistral_keys(config: dict[str, Any], path: str = "model.config") -> None:
    """Refuse keys that ``MistralConfig`` would silently keep as unused attributes (a typo such as
    ``hiden_size`` would otherwise train a model of the default size)."""
    import difflib
    import inspect

    from transformers import MistralConfig

    known = set(inspect.signature(MistralConfig.__init__).parameters) - {"self", "kwargs"}
    known |= set(MistralConfig().to_dict()) | {"rope_theta", "rope_scaling"}  # legacy rope keys are still read
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown recipe key '{path}.{key}': not a MistralConfig argument{hint}")


def mistral_config(overrides: dict[str, Any], vocab_size: int, seq_len: int, attn_implementation: str = "sdpa"):
    from transformers import MistralConfig

    kw = dict(overrides)
    kw.setdefault("vocab_size", vocab_size)
    kw.setdefault("max_position_embeddings", max(seq_len, 2048))
    kw.setdefault("tie_word_embeddings", False)
    kw.setdefault("sliding_window", None)
    if kw["vocab_size"] < vocab_size:
        raise ConfigError(
            f"model.config.vocab_size={kw['vocab_size']} is smaller than the tokenizer's vocabulary ({vocab_size})"
        )
    try:
        cfg = MistralConfig(**kw)
    except TypeError as exc:
        raise ConfigError(f"model.config: {exc}") from None
    cfg._attn_implementation = attn_implementation
    return cfg


def build_model(config, seed: int, *, init_from: str | None = None, attn_implementation: str = "sdpa",
                dtype: torch.dtype = torch.float32):
    """Random init (seeded, identical on every rank) or load ``init_from``."""
    from transformers import AutoModelForCausalLM, MistralForCausalLM

    if init_from:
        return AutoModelForCausalLM.from_pretrained(init_from, attn_implementation=attn_implementation,
                                                    dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MistralForCausalLM(config)
    return model.to(dtype)


def _meta_model(config):
    """The causal LM of ``config`` on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    with torch.device("meta"):
        if isinstance(config, MistralConfig):
            return MistralForCausalLM(config)
        return AutoModelForCausalLM.from_config(config)


def count_parameters(model_or_config) -> dict[str, int]:
    """Total, embedding (token and position embedding tables, and an untied output layer) and
    non-embedding parameter counts.

    Works on a model or, without allocating anything, on a config (via the meta device; any causal-LM
    config that ``AutoModelForCausalLM`` knows)."""
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else _meta_model(model_or_config)
    emb_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            emb_ids.update(id(p) for p in module.parameters(recurse=False))
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        emb_ids.update(id(p) for p in out.parameters())
    seen: set[int] = set()
    total = emb = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 partitions .numel()
        total += n
        if id(p) in emb_ids:
            emb += n
    return {"total": total, "embedding": emb, "non_embedding": total - emb}


def _config_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def flops_per_token(config, seq_len: int, counts: dict[str, int] | None = None) -> float | None:
    """Training FLOPs per token: 6 x (matmul parameters) + 6 x attention score/value products.

    Forward 2N + attention 2 x 2 x L x T x d (causal masking not discounted, as is usual), times 3 for
    forward + backward. The lm_head counts; the embedding lookups do not. ``counts`` are
    :func:`count_parameters` of the real model (otherwise counted from ``config`` on the meta device).
    None when the config does not say its width, depth and vocabulary, or its model cannot be counted:
    MFU is then not logged, the run goes on.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = _config_int(text, "hidden_size", "n_embd", "d_model")
    layers = _config_int(text, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _config_int(text, "vocab_size")
    if d is None or layers is None or vocab is None:
        return None
    if counts is None:
        try:
            counts = count_parameters(config)
        except Exception:  # a config no causal-LM class builds: no estimate rather than a failed run
            return None
    matmul_params = counts["non_embedding"] + vocab * d  # lm_head
    attn = 2 * 2 * layers * seq_len * d
    return 3.0 * (2.0 * matmul_params + attn)


def peak_flops_per_device(peak_tflops: float | None) -> float | None:
    if peak_tflops:
        return peak_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_TFLOPS_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS_BF16[key] * 1e12
    return None


def release_memory() -> None:
    """Collect garbage and hand cached accelerator memory back (between runs in one process, or before
    starting subprocesses that need the GPUs)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
