"""Distillation of a pruned model into its original: the ``distill`` kind of the training loop.

``deepspeed launch/distill.py --recipe recipes/distill-tiny.yaml`` runs :class:`DistillObjective` through the same
loop as pretraining (DeepSpeed ZeRO, checkpoints, resume, TensorBoard, linearity tracking, HF export).

* **Teacher**: the original model (``task.options.teacher``, a Hugging Face folder or hub name), frozen, in eval
  mode, outside DeepSpeed; moved to the device in ``on_engine_ready`` and cast to the engine's dtype.
* **Student**: a pruned folder written by ``linreg prune`` (``task.options.student``), or, when that is null,
  the teacher pruned right here on ``calibration_blocks`` training blocks (``remove``, ``select``, ``layers``,
  ``metric``, ``iterative``, ``replace``: the options of ``linreg prune``). Every rank scores the same
  calibration blocks, then takes rank 0's choice of blocks (broadcast), so a near tie cannot give ranks different
  architectures; a rank whose own choice differed redoes the cut with rank 0's blocks (and fits them itself).
* **Trained**: ``trainable: linear`` (default) trains only the LinearBlock replacements; ``all`` trains every
  student parameter; a list of substrings trains the parameters whose names contain one of them (and the
  linear replacements).
* **Loss**: ``mse_weight`` x layerwise MSE + ``lm_weight`` x next-token cross-entropy (default 1 and 0), plus the
  recipe's regularizer on the student's block states if one is set. The layerwise MSE compares, for each
  student block j, its output with the teacher's output of the block it stands for (``kept_layers[j]``, from
  the removal map): ``||s_j - t_kept[j]||^2 / ||t_kept[j]||^2`` over the batch (``normalize: true``, the
  default; relative error, so that deep layers with large norms do not dominate), or the plain mean squared
  error (``normalize: false``), averaged over the matched blocks (``match: all``, default, or ``replaced``:
  only the outputs of linear replacements).
* **Data**: the LM objective's packed blocks (``data:``), tokenized with the teacher's tokenizer unless
  ``tokenizer.path`` names another.
* **Evaluation**: validation loss/perplexity of the student and ``val/mse`` (the layerwise MSE on validation
  blocks). **Export**: ``run_dir/hf`` through :func:`linreg.pruning.save_pruned` (loads with ``load_pruned``).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linreg.errors import ConfigError
from linreg.train.objectives import LMObjective, add_regularizer, sequence_nll

__all__ = ["DistillObjective", "DEFAULT_OPTIONS", "layerwise_mse", "rank0_choice"]

DEFAULT_OPTIONS: dict[str, Any] = {
    "teacher": None,
    "student": None,
    "remove": 1,
    "select": "linearity",
    "metric": "linearity",
    "layers": None,
    "iterative": False,
    "replace": "linear",
    "calibration_blocks": 32,
    "trainable": "linear",
    "mse_weight": 1.0,
    "lm_weight": 0.0,
    "normalize": True,
    "match": "all",
}


def _resolve_model_path(value: str) -> str:
    from linreg.recipe import REPO_ROOT

    p = Path(value).expanduser()
    if p.exists():
        return str(p)
    if (REPO_ROOT / p).exists():
        return str(REPO_ROOT / p)
    return value  # a hub name


def layerwise_mse(student_states: list, teacher_states: list, pairs: list[tuple[int, int]],
                  normalize: bool = True) -> torch.Tensor:
    """Mean over ``pairs`` ((student index, teacher index) into the state lists) of the squared error of the
    student state against the teacher state, relative to the teacher's squared norm when ``normalize``."""
    terms = []
    for si, ti in pairs:
        s = student_states[si].float()
        t = teacher_states[ti].float()
        diff = (s - t).pow(2)
        if normalize:
            terms.append(diff.sum() / t.pow(2).sum().clamp_min(1e-12))
        else:
            terms.append(diff.mean())
    return torch.stack(terms).mean()


def rank0_choice(chosen: list[int]) -> list[int]:
    """Rank 0's list of chosen blocks on every rank (``broadcast_object_list`` when torch.distributed runs with
    several ranks; the list itself otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(chosen)
    box = [list(chosen)]
    dist.broadcast_object_list(box, src=0)
    return [int(i) for i in box[0]]


class DistillObjective(LMObjective):
    """Layerwise distillation of a pruned student into its original teacher (see the module docstring)."""

    def __init__(self, ctx):
        super().__init__(ctx)
        opts = dict(self.recipe.task.options or {})
        unknown = sorted(set(opts) - set(DEFAULT_OPTIONS))
        if unknown:
            raise ConfigError(f"task.options.{unknown[0]}: unknown distill option; valid options: "
                              f"{', '.join(sorted(DEFAULT_OPTIONS))}")
        self.opts = {**DEFAULT_OPTIONS, **opts}
        if not self.opts["teacher"]:
            raise ConfigError("task.options.teacher: the original model (a Hugging Face folder or hub name) is required")
        if self.opts["match"] not in ("all", "replaced"):
            raise ConfigError(f"task.options.match must be all or replaced, got {self.opts['match']!r}")
        for key in ("mse_weight", "lm_weight"):
            if not isinstance(self.opts[key], (int, float)) or self.opts[key] < 0:
                raise ConfigError(f"task.options.{key} must be a number >= 0, got {self.opts[key]!r}")
        if self.opts["mse_weight"] == 0 and self.opts["lm_weight"] == 0:
            raise ConfigError("task.options: mse_weight and lm_weight are both 0; nothing to train")
        self.teacher_path = _resolve_model_path(str(self.opts["teacher"]))
        self.teacher = None

    # ------------------------------------------------------------------------------------------- data
    def prepare(self) -> None:
        from linreg.errors import CheckpointError
        from linreg.pruning.surgery import _read_config_dict, register_pruned

        try:
            cfg = _read_config_dict(self.teacher_path)
        except CheckpointError:
            cfg = {}
        if str(cfg.get("model_type", "")).startswith("linreg_pruned_"):
            register_pruned(cfg)  # a linear-replaced teacher: its tokenizer loads without remote-code prompts
        if self.recipe.tokenizer.path is None:
            self.recipe.tokenizer.path = self.teacher_path  # the teacher's vocabulary; recorded in recipe.yaml
        super().prepare()

    def model_config(self):
        return None  # no FLOPs/MFU estimate for a pruned student

    # ------------------------------------------------------------------------------------------ model
    def build_model(self):
        from linreg.hidden import find_blocks
        from linreg.pruning.linear_block import LinearBlock
        from linreg.pruning.surgery import load_pruned, provenance

        o = self.opts
        teacher = load_pruned(self.teacher_path, dtype=torch.float32)
        if hasattr(teacher, "linreg_pruning"):  # a pruned teacher: block indices below are relative to it
            del teacher.linreg_pruning
        teacher.eval()
        teacher.requires_grad_(False)
        teacher.config.use_cache = False
        n_teacher = len(find_blocks(teacher))
        if o["student"]:
            student = load_pruned(_resolve_model_path(str(o["student"])), dtype=torch.float32)
            info = provenance(student)
            if info["original_num_layers"] != n_teacher:
                raise ConfigError(f"task.options.student {o['student']} was cut from a model with "
                                  f"{info['original_num_layers']} blocks; the teacher has {n_teacher}")
            self.ctx.log(f"student: {o['student']} (original blocks kept: {info['kept_layers']}, linear: "
                         f"{info['linear']}, removed: {info['removed']})")
        else:
            from linreg.pruning.prune import prune_model

            student = copy.deepcopy(teacher)
            n_cal = min(int(o["calibration_blocks"]), len(self.data.train))
            mb = self.recipe.train.micro_batch_size
            rows = np.asarray(self.data.train[:n_cal], dtype=np.int64)
            batches = [{"input_ids": torch.from_numpy(rows[i:i + mb])} for i in range(0, n_cal, mb)]
            given = list(o["layers"]) if o["layers"] else None
            report = prune_model(student, batches, int(o["remove"]) if o["select"] != "given" else 0,
                                 select=o["select"], replace=o["replace"], iterative=bool(o["iterative"]),
                                 given=given, metric=o["metric"], progress=False)
            chosen = rank0_choice(report["chosen"])
            if chosen != report["chosen"]:  # a near tie scored differently here: rank 0's blocks, fitted here
                print(f"[rank {self.ctx.rank}] distill: this rank's scores chose blocks {report['chosen']}, rank 0's "
                      f"chose {chosen} (a near tie); using rank 0's", file=sys.stderr, flush=True)
                student = copy.deepcopy(teacher)
                redo = prune_model(student, batches, 0, select="given", given=chosen, replace=o["replace"],
                                   iterative=bool(o["iterative"]), progress=False)
                report = {**redo, "select": report["select"], "score": report["score"], "chosen_by_rank0": True}
            self.prune_report = report
            self.ctx.log(f"student: cut blocks {report['chosen']} of the teacher by {report['score']} on {n_cal} "
                         f"calibration blocks ({'linear maps' if o['replace'] == 'linear' else 'removed'})")
        if student.config.vocab_size < len(self.tokenizer):
            raise ConfigError(f"the tokenizer has {len(self.tokenizer)} tokens, the student's vocabulary "
                              f"{student.config.vocab_size}")
        self.kept = list(provenance(student)["kept_layers"])
        blocks = find_blocks(student)
        linear_pos = [j for j, b in enumerate(blocks) if isinstance(b, LinearBlock)]
        self.has_linear = bool(linear_pos)
        if o["match"] == "replaced":
            matched = linear_pos
            if not matched:
                raise ConfigError("task.options.match=replaced, but the student has no linear replacements")
        else:
            matched = list(range(len(blocks)))
        # (student state index, teacher state index): output of student block j <-> teacher block kept[j]
        self.pairs = [(j + 1, self.kept[j] + 1) for j in matched]

        student.requires_grad_(False)
        train = o["trainable"]
        if train == "all":
            student.requires_grad_(True)
        else:
            for j in linear_pos:
                blocks[j].requires_grad_(True)
            if isinstance(train, (list, tuple)):
                for name, p in student.named_parameters():
                    if any(str(s) in name for s in train):
                        p.requires_grad_(True)
            elif train != "linear":
                raise ConfigError(f"task.options.trainable must be linear, all, or a list of name substrings; got {train!r}")
        n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
        if n_train == 0:
            raise ConfigError("nothing to train: the student has no linear replacements and task.options.trainable "
                              "selects no parameter (use trainable: all, or a list of name substrings)")
        self.ctx.log(f"distillation: {n_train / 1e6:.3f}M trainable parameters ({train}); matching "
                     f"{len(self.pairs)} block outputs; loss = {o['mse_weight']} x layerwise "
                     f"{'relative ' if o['normalize'] else ''}MSE + {o['lm_weight']} x LM")
        if self.recipe.model.activation_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
        self.teacher = teacher
        return student

    def on_engine_ready(self, engine) -> None:
        dtype = next(engine.module.parameters()).dtype
        self.teacher.to(device=self.ctx.device, dtype=dtype)

    # ------------------------------------------------------------------------------------------- loss
    def _teacher_states(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list:
        from linreg.hidden import BlockCapture

        kw: dict[str, Any] = {"input_ids": ids, "use_cache": False, "logits_to_keep": 1}
        if mask is not None:
            kw["attention_mask"] = mask
        with torch.no_grad(), BlockCapture(self.teacher, detach=True) as cap:
            self.teacher(**kw)
            return list(cap.states)

    def loss(self, model, batch, regularizer):
        from linreg.hidden import BlockCapture

        o = self.opts
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        t_states = self._teacher_states(ids, mask)
        kw: dict[str, Any] = {"input_ids": ids}
        if mask is not None:
            kw["attention_mask"] = mask
        if o["lm_weight"] > 0:
            kw["labels"] = batch.get("labels", ids)
        else:
            kw["logits_to_keep"] = 1
        with BlockCapture(model, detach=False) as cap:
            out = model(**kw)
            mse = layerwise_mse(cap.states, t_states, self.pairs, normalize=bool(o["normalize"]))
            reg = regularizer(cap.states, mask, model=model) if regularizer is not None else None
        total = o["mse_weight"] * mse
        parts = {"loss/mse": mse}
        if o["lm_weight"] > 0:
            total = total + o["lm_weight"] * out.loss
            parts["loss/lm"] = out.loss
        return add_regularizer(total, parts, reg)

    # ------------------------------------------------------------------------------------- evaluation
    eval_extras = ("val/mse",)

    def eval_batch(self, model, ids):
        """The LM validation NLL, and each sequence's layerwise MSE to the teacher."""
        from linreg.hidden import BlockCapture

        t_states = self._teacher_states(ids)
        with BlockCapture(model, detach=True) as cap:
            logits = model(input_ids=ids).logits
            s_states = list(cap.states)
        mse = torch.stack([
            layerwise_mse([None if s is None else s[r:r + 1] for s in s_states],
                          [None if t is None else t[r:r + 1] for t in t_states], self.pairs,
                          normalize=bool(self.opts["normalize"])).double()
            for r in range(ids.size(0))])
        return sequence_nll(logits, ids), [mse]

    # ----------------------------------------------------------------------------------------- export
    def export_hint(self) -> str:
        if getattr(self, "has_linear", True):
            return ("linreg.pruning.load_pruned, or AutoModelForCausalLM.from_pretrained(..., "
                    "trust_remote_code=True)")
        return "AutoModelForCausalLM.from_pretrained"

    def export(self, model, out_dir: Path) -> None:
        from linreg.pruning.surgery import save_pruned

        model.config.use_cache = True
        extra = {"distilled_from": str(self.teacher_path), "distill_options": {k: v for k, v in self.opts.items()}}
        save_pruned(model, out_dir, tokenizer=self.tokenizer, extra=extra)
