"""What the one training loop trains. An objective owns data, model construction, the loss and the export;
the loop (``linreg.train.loop``) owns DeepSpeed, the schedule, logging, tracking and checkpoints.

Kinds are looked up by ``task.kind`` in the recipe. Each entry is an import path, so modules that add
kinds (distillation, fine-tuning) load only when used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from linreg.errors import ConfigError

OBJECTIVES: dict[str, str] = {
    "lm": "linreg.train.objectives:LMObjective",
    "distill": "linreg.pruning.distill:DistillObjective",
    "classification": "linreg.finetune.objectives:ClassificationObjective",
    "reward": "linreg.finetune.objectives:RewardObjective",
}


@dataclass
class RunContext:
    recipe: Any
    run_dir: Path
    rank: int
    world_size: int
    device: torch.device
    barrier: Callable[[], None]
    log: Callable[[str], None]
    extras: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def objective_class(kind: str):
    if kind not in OBJECTIVES:
        raise ConfigError(f"task.kind: unknown kind {kind!r}; available: {', '.join(sorted(OBJECTIVES))}")
    mod, _, name = OBJECTIVES[kind].partition(":")
    return getattr(importlib.import_module(mod), name)


def split_evenly(items: list, rank: int, world_size: int) -> tuple[list, list[bool]]:
    """This rank's share of ``items`` and, per entry, whether it is real. Every rank gets the same count
    (padding repeats the first item, flagged False) because ZeRO-3 needs the same number of forwards on
    every rank."""
    per = -(-len(items) // world_size)
    mine = items[rank * per:(rank + 1) * per]
    real = [True] * len(mine)
    while len(mine) < per:
        mine.append(items[0])
        real.append(False)
    return mine, real


class Objective:
    """Interface of a training objective (see :class:`LMObjective` for the reference implementation)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.recipe = ctx.recipe

    # data
    def prepare(self) -> None: ...
    def num_train_examples(self) -> int: ...
    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]: ...
    # model
    def build_model(self) -> torch.nn.Module: ...
    def trainable_parameters(self, model) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]
    def model_config(self):
        return None
    def on_engine_ready(self, engine) -> None:
        """Hook after ``deepspeed.initialize`` (e.g. to move a frozen teacher to the device)."""
    # loss
    def loss(self, model, batch: dict, regularizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...
    # evaluation and tracking (every rank calls these with the same number of forwards)
    def evaluate(self, model) -> dict[str, float]:
        return {}
    def tracking_batches(self) -> list[dict[str, torch.Tensor]]:
        return []
    def export(self, model, out_dir: Path) -> None: ...
    def export_hint(self) -> str:
        """How users load what :meth:`export` wrote (printed at the end of a run)."""
        return "AutoModel.from_pretrained"
    def tokens_per_example(self) -> int:
        return 0


def lm_forward(model, batch: dict, regularizer, *, labels: bool = True):
    """Forward a causal LM, capturing block states for the regularizer when one is set.

    Returns (outputs, regularizer term or None). The capture hooks are removed before backward, so
    activation checkpointing's recomputation does not see them."""
    kwargs = {"input_ids": batch["input_ids"]}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    if labels:
        kwargs["labels"] = batch.get("labels", batch["input_ids"])
    if regularizer is None:
        return model(**kwargs), None
    from linreg.hidden import BlockCapture

    with BlockCapture(model, detach=False) as cap:
        out = model(**kwargs)
        reg = regularizer(cap.states, batch.get("attention_mask"), model=model)
    return out, reg


def add_regularizer(total: torch.Tensor, parts: dict, reg: torch.Tensor | None):
    """``(total + reg, parts)`` with ``reg`` logged as ``loss/regularizer``; unchanged when ``reg`` is None."""
    if reg is None:
        return total, parts
    parts["loss/regularizer"] = reg
    return total + reg, parts


def sequence_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each sequence, ``[B]`` in float64 (logits upcast)."""
    logits = logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.size(0), -1).double().mean(1)


class LMObjective(Objective):
    """Causal language modelling on packed blocks (pretraining)."""

    def prepare(self) -> None:
        from linreg.data import prepare_data
        from linreg.data.config import resolve_cache_dir

        r = self.recipe
        kwargs = dict(seq_len=r.train.seq_len, cache_root=resolve_cache_dir(r.data), seed=r.train.seed,
                      num_proc=r.data.num_proc)
        if self.ctx.is_main:
            self.data = prepare_data(r.data, r.tokenizer, progress=True, **kwargs)
        self.ctx.barrier()
        if not self.ctx.is_main:
            self.data = prepare_data(r.data, r.tokenizer, progress=False, **kwargs)
        self.tokenizer = self.data.tokenizer
        if len(self.data.train) == 0:
            from linreg.errors import DataError

            raise DataError("the training split has no full block of train.seq_len tokens; add data or "
                            "shorten train.seq_len")
        self.ctx.log(f"data: {len(self.data.train)} train blocks, {len(self.data.val)} validation blocks of "
                     f"{r.train.seq_len} tokens (shards in {self.data.shard_dir})")

    def num_train_examples(self) -> int:
        return len(self.data.train)

    def tokens_per_example(self) -> int:
        return self.recipe.train.seq_len

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        order = np.argsort(indices)  # sorted reads from the memmap, original order restored
        rows = np.empty((len(indices), self.data.train.shape[1]), dtype=np.int64)
        rows[order] = self.data.train[indices[order]]
        return {"input_ids": torch.from_numpy(rows)}

    def model_config(self):
        from linreg.model import mistral_config

        r = self.recipe
        if r.model.init_from:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(r.model.init_from)
        return mistral_config(r.model.config, vocab_size=len(self.tokenizer), seq_len=r.train.seq_len,
                              attn_implementation=r.model.attn_implementation)

    def build_model(self):
        from linreg.model import build_model

        r = self.recipe
        model = build_model(self.model_config(), r.train.seed, init_from=r.model.init_from,
                            attn_implementation=r.model.attn_implementation)
        rows = model.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > rows:
            what = f"model.init_from={r.model.init_from}" if r.model.init_from else "the model"
            raise ConfigError(
                f"the tokenizer ({r.tokenizer.path or 'trained BPE'}) has {len(self.tokenizer)} tokens but "
                f"{what} embeds only {rows}: its ids would index past the embedding. Use the model's own "
                f"tokenizer (tokenizer.path; with model.init_from it defaults to that folder)")
        if r.model.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        return model

    def loss(self, model, batch, regularizer):
        out, reg = lm_forward(model, batch, regularizer)
        return add_regularizer(out.loss, {"loss/lm": out.loss}, reg)

    def _val_blocks(self, count: int) -> list[np.ndarray]:
        n = min(count, len(self.data.val))
        return [np.asarray(self.data.val[i], dtype=np.int64) for i in range(n)]

    #: names of the extra per-sequence validation values that ``eval_batch`` returns, in order
    eval_extras: tuple[str, ...] = ()

    def eval_batch(self, model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-sequence mean next-token NLL ``[B]`` of one validation batch, and one ``[B]`` tensor
        per name in ``eval_extras``."""
        return sequence_nll(model(input_ids=ids).logits, ids), []

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Validation loss and perplexity (plus ``eval_extras``) over ``train.eval_blocks`` held-out
        blocks, split over the ranks, each block counted once."""
        import math

        import torch.distributed as dist

        blocks = self._val_blocks(self.recipe.train.eval_blocks)
        if not blocks:
            return {}
        mine, real = split_evenly(blocks, self.ctx.rank, self.ctx.world_size)
        was_training = model.training
        model.eval()
        k = len(self.eval_extras)
        tot = torch.zeros(k + 2, dtype=torch.float64, device=self.ctx.device)  # nll, extras..., count
        mb = self.recipe.train.micro_batch_size
        for i in range(0, len(mine), mb):
            ids = torch.from_numpy(np.stack(mine[i:i + mb])).to(self.ctx.device)
            w = torch.tensor(real[i:i + mb], dtype=torch.float64, device=self.ctx.device)
            nll, extras = self.eval_batch(model, ids)
            for n, v in enumerate([nll, *extras]):
                tot[n] += (v.double() * w).sum()
            tot[k + 1] += w.sum()
        if dist.is_initialized():
            dist.all_reduce(tot)
        model.train(was_training)
        val = (tot[0] / tot[k + 1]).item()
        out = {"val/loss": val, "val/perplexity": math.exp(min(val, 50.0))}
        out.update({name: (tot[n + 1] / tot[k + 1]).item() for n, name in enumerate(self.eval_extras)})
        return out

    def tracking_batches(self) -> list[dict[str, torch.Tensor]]:
        blocks = self._val_blocks(self.recipe.track.blocks)
        if not blocks:
            return []
        mine, real = split_evenly(blocks, self.ctx.rank, self.ctx.world_size)
        out = []
        mb = self.recipe.train.micro_batch_size
        for i in range(0, len(mine), mb):
            ids = torch.from_numpy(np.stack(mine[i:i + mb]))
            mask = torch.tensor(real[i:i + mb], dtype=torch.long)[:, None].expand_as(ids).contiguous()
            # attention_mask also marks padding rows for the accumulator; causal attention within a
            # fully masked row is never used for anything
            out.append({"input_ids": ids, "attention_mask": mask})
        return out

    def export_hint(self) -> str:
        return "MistralForCausalLM.from_pretrained" if not self.recipe.model.init_from else \
            "AutoModelForCausalLM.from_pretrained"

    def export(self, model, out_dir: Path) -> None:
        model.config.use_cache = True
        model.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
