"""Fill a DeepSpeed JSON from the recipe, so that no value is stated in two places.

The files in ``ds_configs/`` say ``"auto"`` for everything the recipe owns (batch sizes, gradient
accumulation, clipping, precision). A concrete value there that disagrees with the recipe is refused.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from linreg.errors import ConfigError

# (path in the DeepSpeed JSON) -> recipe key, for the error message
RECIPE_OWNED = {
    ("train_batch_size",): "train.global_batch_size",
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.global_batch_size / (train.micro_batch_size x ranks)",
    ("gradient_clipping",): "train.grad_clip",
    ("bf16", "enabled"): "train.precision",
    ("fp16", "enabled"): "train.precision",
}


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None


def resolve_precision(precision: str, device_type: str) -> str:
    if precision != "auto":
        return precision
    if device_type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def batch_geometry(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient accumulation steps for a global batch that does not depend on the rank count."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size={micro_batch} "
            f"x {world_size} rank(s); pick sizes so that it is (the global batch is kept fixed across rank counts)"
        )
    return global_batch // per_step


def fill_ds_config(raw: dict, *, global_batch: int, micro_batch: int, world_size: int, grad_clip: float,
                   precision: str, source: str = "DeepSpeed config") -> dict[str, Any]:
    cfg = copy.deepcopy(raw)
    accum = batch_geometry(global_batch, micro_batch, world_size)
    values = {
        ("train_batch_size",): global_batch,
        ("train_micro_batch_size_per_gpu",): micro_batch,
        ("gradient_accumulation_steps",): accum,
        ("gradient_clipping",): grad_clip,
        ("bf16", "enabled"): precision == "bf16",
        ("fp16", "enabled"): precision == "fp16",
    }
    for keys, value in values.items():
        node = cfg
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        current = node.get(keys[-1], "auto")
        if current != "auto" and current != value:
            raise ConfigError(
                f"{source}: {'.'.join(keys)}={current!r} conflicts with the recipe ({RECIPE_OWNED[keys]} gives "
                f"{value!r}); set it to \"auto\" in the JSON and change the recipe instead"
            )
        node[keys[-1]] = value
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ConfigError(
            f"{source}: 'optimizer'/'scheduler' sections are not used; the optimizer and schedule come from the "
            "recipe's optimizer section"
        )
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 10**9)  # the loop does its own logging
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(cfg: dict) -> bool:
    dev = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return dev not in (None, "none")
