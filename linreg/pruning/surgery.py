"""Block surgery on Hugging Face causal LMs: remove decoder blocks, replace them by fitted linear maps, save and
load the result.

Removal (``remove_blocks``) deletes blocks from the ModuleList and fixes what depends on the block count, so the
model runs, generates with a KV cache, and round-trips through ``save_pretrained`` / ``from_pretrained`` as the
original class:

* ``config.num_hidden_layers`` (``n_layer`` of GPT-2 is an alias of it);
* per-layer config lists (``layer_types``, ``no_rope_layers``) are filtered, lists of layer indices
  (``mlp_only_layers``) and the ``max_window_layers`` threshold are re-indexed;
* every ``layer_idx`` attribute inside the remaining blocks (attention modules use it as their KV-cache slot) is
  renumbered to the block's new position.

Replacement (``replace_blocks``) puts a :class:`~linreg.pruning.linear_block.LinearBlock` at the block's position
(the block count does not change). How such models are saved and loaded is described in
``linreg/pruning/linear_block.py`` and ``docs/analyze_and_prune.md``: plain ``from_pretrained`` for removal-only
folders; ``trust_remote_code=True`` (code shipped in the folder) or :func:`load_pruned` for linear replacements.

Every model touched here carries ``model.linreg_pruning`` (a dict): the original block count, the original index
of each current block (``kept_layers``), the removed and the linearly replaced original indices. ``save_pruned``
writes it to ``linreg_pruning.json``; ``load_pruned`` reads it back.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linreg.errors import CheckpointError, ConfigError
from linreg.hidden import find_blocks
from linreg.pruning.linear_block import PRUNING_KEY, LinearBlock, pruned_classes

__all__ = [
    "LinearBlock",
    "provenance",
    "block_output_is_tuple",
    "remove_blocks",
    "replace_blocks",
    "identity_block",
    "swap_blocks",
    "save_pruned",
    "load_pruned",
    "load_model",
    "load_tokenizer",
    "PROVENANCE_FILE",
    "REMOTE_CODE_FILE",
]

PROVENANCE_FILE = "linreg_pruning.json"
REMOTE_CODE_FILE = "modeling_linreg_pruned.py"
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")  # one entry per block: filtered on removal
INDEX_LISTS = ("mlp_only_layers",)  # lists of block indices: re-indexed on removal


def _unwrap(model: Any) -> nn.Module:
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def provenance(model: nn.Module) -> dict:
    """``model.linreg_pruning``, created for an untouched model (every block kept, none replaced)."""
    model = _unwrap(model)
    info = getattr(model, "linreg_pruning", None)
    if info is None:
        n = len(find_blocks(model))
        info = {"original_num_layers": n, "kept_layers": list(range(n)), "removed": [], "linear": []}
        model.linreg_pruning = info
    return info


def text_config(model: nn.Module):
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        try:
            return cfg.get_text_config()
        except Exception:  # pragma: no cover - odd configs
            pass
    return cfg


def hidden_size(model: nn.Module) -> int:
    cfg = text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"{type(model).__name__}: the config has no hidden_size")


@torch.no_grad()
def block_output_is_tuple(model: nn.Module) -> bool:
    """Whether the decoder blocks return tuples (Transformers 4) or plain tensors (Transformers 5), by running
    the model once on two tokens."""
    model = _unwrap(model)
    blocks = find_blocks(model)
    seen: list[bool] = []
    target = next((b for b in blocks if not isinstance(b, LinearBlock)), None)
    if target is None:
        return bool(blocks[0].tuple_output)
    handle = target.register_forward_hook(lambda m, a, out: seen.append(isinstance(out, tuple)))
    try:
        dev = next(model.parameters()).device
        was = model.training
        model.eval()
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=dev), use_cache=False)
        model.train(was)
    finally:
        handle.remove()
    return bool(seen and seen[0])


def _set_layer_idx(block: nn.Module, new_idx: int) -> None:
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int) or (isinstance(module, LinearBlock)):
            module.layer_idx = new_idx


def remove_blocks(model: nn.Module, positions: list[int]) -> nn.Module:
    """Delete the blocks at ``positions`` (current indices) in place; fix the config and the cache indices."""
    model = _unwrap(model)
    info = provenance(model)
    blocks = find_blocks(model)
    n = len(blocks)
    pos = sorted({int(p) % n if -n <= int(p) < n else int(p) for p in positions})
    bad = [p for p in pos if not 0 <= p < n]
    if bad:
        raise ConfigError(f"remove_blocks: positions {bad} out of range for {n} blocks")
    if len(pos) >= n:
        raise ConfigError(f"remove_blocks: cannot remove all {n} blocks")
    cfg = text_config(model)
    if getattr(cfg, "is_heterogeneous", False):
        raise ConfigError("remove_blocks: heterogeneous per-layer configs (config.per_layer_config) are not supported")
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("remove_blocks: this GPT-2 config scales attention by 1/(layer_idx+1); removing blocks would "
                          "change the scaling of every later block when the model is loaded again")
    keep = [i for i in range(n) if i not in set(pos)]
    new_list = nn.ModuleList([blocks[i] for i in keep])
    # put the new list where the old one was
    parent, attr = _parent_of(model, blocks)
    setattr(parent, attr, new_list)
    for new_i, block in enumerate(new_list):
        _set_layer_idx(block, new_i)
    _fix_config(cfg, keep, n)
    if cfg is not model.config:
        _fix_config(model.config, keep, n)
    removed_orig = [info["kept_layers"][p] for p in pos]
    info["removed"] = sorted(set(info["removed"]) | set(removed_orig))
    info["linear"] = [o for o in info["linear"] if o not in removed_orig]
    info["kept_layers"] = [info["kept_layers"][i] for i in keep]
    return model


def _parent_of(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child is target:
                return module, child_name
    raise ConfigError("cannot locate the decoder block list inside the model")  # pragma: no cover


def _fix_config(cfg: Any, keep: list[int], n_old: int) -> None:
    remap = {old: new for new, old in enumerate(keep)}
    for key in PER_LAYER_LISTS:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)) and len(value) == n_old:
            setattr(cfg, key, [value[i] for i in keep])
    for key in INDEX_LISTS:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)):
            setattr(cfg, key, [remap[i] for i in value if i in remap])
    mwl = getattr(cfg, "max_window_layers", None)
    if isinstance(mwl, int):
        cfg.max_window_layers = sum(1 for i in keep if i < mwl)
    cfg.num_hidden_layers = len(keep)


def replace_blocks(model: nn.Module, maps: dict[int, tuple[torch.Tensor, torch.Tensor]], *,
                   tuple_output: bool | None = None) -> nn.Module:
    """Put a LinearBlock computing ``y = x @ W + b`` at each current position of ``maps`` (in place)."""
    model = _unwrap(model)
    info = provenance(model)
    blocks = find_blocks(model)
    if tuple_output is None:
        tuple_output = block_output_is_tuple(model)
    ref = next(model.parameters())
    for p, (w, b) in sorted(maps.items()):
        if not 0 <= p < len(blocks):
            raise ConfigError(f"replace_blocks: position {p} out of range for {len(blocks)} blocks")
        old = blocks[p]
        blocks[p] = LinearBlock.from_affine(w, b, tuple_output=tuple_output, layer_idx=p,
                                            attention_type=getattr(old, "attention_type", None),
                                            dtype=ref.dtype, device=ref.device)
        orig = info["kept_layers"][p]
        if orig not in info["linear"]:
            info["linear"] = sorted(info["linear"] + [orig])
    return model


def identity_block(model: nn.Module, position: int) -> LinearBlock:
    """A LinearBlock that passes its input through (W = I, b = 0): the same function as removing the block, for
    evaluating removal without surgery."""
    blocks = find_blocks(model)
    ref = next(model.parameters())
    tuple_output = block_output_is_tuple(model)
    d = hidden_size(_unwrap(model))
    return LinearBlock(d, tuple_output=tuple_output, layer_idx=position,
                       attention_type=getattr(blocks[position], "attention_type", None)).to(ref.device, ref.dtype)


class swap_blocks:
    """Context manager: temporarily put other modules at some block positions (evaluation without surgery)."""

    def __init__(self, model: nn.Module, replacements: dict[int, nn.Module]):
        self.blocks = find_blocks(model)
        self.replacements = replacements
        self.saved: dict[int, nn.Module] = {}

    def __enter__(self):
        for p, m in self.replacements.items():
            self.saved[p] = self.blocks[p]
            self.blocks[p] = m
        return self

    def __exit__(self, *exc):
        for p, m in self.saved.items():
            self.blocks[p] = m


# ------------------------------------------------------------------------------------------------------ saving


def _linear_positions(model: nn.Module) -> list[int]:
    return [i for i, b in enumerate(find_blocks(model)) if isinstance(b, LinearBlock)]


def save_pruned(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, extra: dict | None = None) -> Path:
    """Save a (possibly) pruned model as a Hugging Face folder plus ``linreg_pruning.json``.

    Removal only: an ordinary folder of the original class. With linear replacements: ``config.json`` gets
    ``model_type: linreg_pruned_<base>``, ``auto_map`` to the bundled ``modeling_linreg_pruned.py`` and the
    ``linreg_pruning`` entry listing the linear blocks (see the module docstring for how it loads).
    """
    model = _unwrap(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = copy.deepcopy(provenance(model))
    linear_pos = _linear_positions(model)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    base_arch = type(model).__name__
    base_cfg = type(model.config).__name__
    # a model loaded through the pruned classes is saved with its base class recorded
    existing = cfg.get(PRUNING_KEY) or getattr(model.config, PRUNING_KEY, None) or {}
    if existing.get("base_architecture"):
        base_arch = existing["base_architecture"]
        base_cfg = existing["base_config_class"]
        base_type = existing["base_model_type"]
    else:
        base_type = cfg.get("model_type")
    if linear_pos:
        blocks = find_blocks(model)
        cfg[PRUNING_KEY] = {
            "linear_layers": linear_pos,
            "tuple_output": bool(blocks[linear_pos[0]].tuple_output),
            "hidden_size": hidden_size(model),
            "base_architecture": base_arch,
            "base_config_class": base_cfg,
            "base_model_type": base_type,
        }
        cfg["model_type"] = f"linreg_pruned_{base_type}"
        cfg["architectures"] = ["LinregPrunedForCausalLM"]
        cfg["auto_map"] = {"AutoConfig": "modeling_linreg_pruned.LinregPrunedConfig",
                           "AutoModelForCausalLM": "modeling_linreg_pruned.LinregPrunedForCausalLM"}
        _write_remote_code(out / REMOTE_CODE_FILE, base_arch, base_cfg)
    else:
        if existing.get("base_architecture"):  # every linear block was removed: back to the plain class
            cfg["model_type"] = base_type
            cfg["architectures"] = [base_arch]
        for key in (PRUNING_KEY, "auto_map"):
            cfg.pop(key, None)
        (out / REMOTE_CODE_FILE).unlink(missing_ok=True)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    info["linear_positions"] = linear_pos
    info["num_hidden_layers"] = len(find_blocks(model))
    info["base_architecture"] = base_arch
    info["load"] = ("linreg.pruning.load_pruned(path) or AutoModelForCausalLM.from_pretrained(path, "
                    "trust_remote_code=True)" if linear_pos else "AutoModelForCausalLM.from_pretrained(path)")
    if extra:
        info.update(extra)
    (out / PROVENANCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def _write_remote_code(path: Path, base_arch: str, base_cfg: str) -> None:
    src = Path(__file__).with_name("linear_block.py").read_text()
    tail = (
        "\n\n# --- written by linreg.pruning.save_pruned: the classes this folder's config.json auto_map names ---\n"
        f"LinregPrunedConfig, LinregPrunedForCausalLM = pruned_classes({base_arch!r}, {base_cfg!r})\n"
    )
    path.write_text(src + tail)


def _read_config_dict(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        f = p / "config.json"
        if not f.is_file():
            raise CheckpointError(f"{p}: no config.json (not a Hugging Face model folder)")
        return json.loads(f.read_text())
    from transformers import PretrainedConfig

    try:
        cfg, _ = PretrainedConfig.get_config_dict(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read the config of {path}: {type(exc).__name__}: {exc}") from exc
    return cfg


def register_pruned(config_dict: dict) -> tuple[type, type]:
    """Register the pruned classes that ``config_dict`` (a pruned folder's config.json) needs with the Auto
    classes, so ``AutoModelForCausalLM.from_pretrained`` loads it without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    info = config_dict.get(PRUNING_KEY) or {}
    if "base_architecture" not in info:
        raise CheckpointError(f"config has model_type {config_dict.get('model_type')!r} but no {PRUNING_KEY} entry")
    cfg_cls, model_cls = pruned_classes(info["base_architecture"], info.get("base_config_class"))
    try:
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
    except TypeError:  # pragma: no cover - older transformers without exist_ok
        try:
            AutoConfig.register(cfg_cls.model_type, cfg_cls)
            AutoModelForCausalLM.register(cfg_cls, model_cls)
        except ValueError:
            pass
    return cfg_cls, model_cls


def _torch_dtype(dtype: str | torch.dtype | None):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; choose from {', '.join(names)}")
    return names[dtype]


def load_pruned(path: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                **kwargs: Any) -> nn.Module:
    """Load a model folder written by :func:`save_pruned` (or any Hugging Face causal LM).

    Linear-replaced folders load through the pruned classes registered from this package (no remote code);
    everything else through ``AutoModelForCausalLM``. ``model.linreg_pruning`` is restored from
    ``linreg_pruning.json`` when present.
    """
    from transformers import AutoModelForCausalLM

    cfg = _read_config_dict(path)
    if str(cfg.get("model_type", "")).startswith("linreg_pruned_"):
        register_pruned(cfg)
    kw = dict(kwargs)
    td = _torch_dtype(dtype)
    if td is not None:
        kw["dtype"] = td
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cpu":
        kw.setdefault("device_map", {"": dev})
    want_info = bool(kw.pop("output_loading_info", False))
    try:
        model, loading_info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kw)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from exc
    check_loading_info(path, loading_info)
    if dev is not None and dev.type == "cpu":
        model = model.to(dev)
    prov = Path(path) / PROVENANCE_FILE
    if prov.is_file():
        data = json.loads(prov.read_text())
        model.linreg_pruning = {k: data[k] for k in ("original_num_layers", "kept_layers", "removed", "linear")
                                if k in data}
    return (model, loading_info) if want_info else model


def check_loading_info(path: str | Path, info: dict) -> None:
    """Refuse a load that left weights missing (randomly initialised), unused or of the wrong shape (the
    ``output_loading_info`` of ``from_pretrained``; Transformers has already dropped the keys each class declares
    harmless)."""
    problems = []
    for key, what in (("missing_keys", "missing from the checkpoint (would be random)"),
                      ("unexpected_keys", "in the checkpoint but not used by the model"),
                      ("mismatched_keys", "of the wrong shape")):
        keys = sorted(str(k) for k in (info or {}).get(key) or ())
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"weights {what}: {shown}")
    if problems:
        raise CheckpointError(f"{path}: the checkpoint does not match the model class; " + "; ".join(problems))


load_model = load_pruned


def load_tokenizer(path: str | Path, **kwargs: Any):
    """``AutoTokenizer.from_pretrained(path)`` that also works quietly on linear-replaced folders (Transformers
    reads config.json there; the pruned classes are registered first so it does not ask about remote code)."""
    from transformers import AutoTokenizer

    try:
        cfg = _read_config_dict(path)
    except CheckpointError:
        cfg = {}
    if str(cfg.get("model_type", "")).startswith("linreg_pruned_"):
        register_pruned(cfg)
    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Copy tokenizer files of a local model folder (used when no tokenizer object is at hand)."""
    src, dst = Path(src), Path(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
