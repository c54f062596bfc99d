"""Fine-tuning objectives for the one training loop: sequence classification and reward modelling.

Both put a head on a causal LM through ``AutoModelForSequenceClassification`` (Mistral, Llama, Qwen,
GPT-2, OPT, NeoX ... all have one): the head reads the hidden state (after the final norm) of the last
token that is not padding, as Hugging Face does (``pad_token_id`` in the model config; a tokenizer
without a pad token pads with EOS). The model comes from ``model.init_from`` (a Hugging Face folder such
as our pretraining export ``runs/<name>/hf``, or a hub name); without it a Mistral is built from
``model.config`` with the tokenizer of ``tokenizer.path`` (tests), or, without one, a byte-level BPE
trained on the training texts into ``run_dir/tokenizer`` (toy runs). The new head is
initialised from ``train.seed``, so seeds differ in head init and batch order (and, for models built
from a config, in the whole init).

* :class:`ClassificationObjective` (``task.kind: classification``): cross-entropy; validation accuracy,
  F1 (the positive class, id 1, for two classes; macro over classes otherwise) and macro F1.
* :class:`RewardObjective` (``task.kind: reward``): a scalar head (``num_labels=1``), pairwise loss
  ``-log sigmoid(r_chosen - r_rejected)``; accuracy is the share of pairs with ``r_chosen > r_rejected``
  (ties count as wrong). One forward runs the chosen and the rejected sequences of a micro batch
  together, so ``train.micro_batch_size`` counts pairs.

Linearity is tracked on the first ``track.blocks`` validation sequences (for reward: the chosen and the
rejected dialogue of the first ``track.blocks / 2`` pairs), each truncated to ``train.seq_len`` tokens,
padding excluded: the same held-out tokens before, during and after fine-tuning, whatever the seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from linreg.errors import ConfigError, DataError, LinregError
from linreg.finetune.tasks import FinetuneOptions, TaskData, load_task_data
from linreg.train.objectives import Objective, add_regularizer, lm_forward, split_evenly

__all__ = ["ClassificationObjective", "RewardObjective", "pairwise_loss", "pair_accuracy",
           "classification_metrics", "model_label", "FINETUNE_INFO"]

FINETUNE_INFO = "finetune.json"  # run folder: what was fine-tuned (read by `linreg finetune-table`)


# --------------------------------------------------------------------------------------------------
# pure functions (tested against float64 references)


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected)``, computed stably as ``softplus(r_rejected - r_chosen)``."""
    return torch.nn.functional.softplus(r_rejected - r_chosen).mean()


def pair_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked right (``r_chosen > r_rejected``; ties are wrong)."""
    return (r_chosen > r_rejected).float().mean()


def classification_metrics(confusion) -> dict[str, float]:
    """Accuracy, F1 and macro F1 from a confusion matrix ``[true class, predicted class]``.

    ``f1`` is the F1 of class 1 for two classes (BoolQ, MultiRC: "True"), the macro F1 otherwise (CB).
    A class with no true and no predicted example gets F1 0 in the macro mean (as scikit-learn's
    ``zero_division=0``)."""
    c = np.asarray(confusion, dtype=np.float64)
    total = c.sum()
    tp = np.diag(c)
    pred = c.sum(0)
    true = c.sum(1)
    denom = pred + true
    f1s = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    out = {"accuracy": float(tp.sum() / total) if total else float("nan"), "f1_macro": float(f1s.mean())}
    out["f1"] = float(f1s[1]) if len(f1s) == 2 else out["f1_macro"]
    return out


def model_label(recipe, opts: FinetuneOptions) -> str:
    """Row label of the model in the table: ``task.options.model_name``, else from ``model.init_from``
    (a folder named ``hf`` is named after its run folder), else the recipe's Mistral size."""
    if opts.model_name:
        return opts.model_name
    init = recipe.model.init_from
    if init:
        p = Path(init).expanduser()
        if p.exists():
            p = p.resolve()
            return p.parent.name if p.name in ("hf", "export", "final") else p.name
        return str(init)  # a hub name
    cfg = recipe.model.config
    return f"mistral-d{cfg.get('hidden_size', 4096)}-L{cfg.get('num_hidden_layers', 32)} (random init)"


# --------------------------------------------------------------------------------------------------


def _pad(seqs: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id arrays to the longest: (input_ids [B, T] int64, attention_mask [B, T] int64)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


class _FinetuneObjective(Objective):
    kind = "classification"

    # -- data ----------------------------------------------------------------------------------------
    def _options(self) -> FinetuneOptions:
        from linreg.config import from_dict

        return from_dict(FinetuneOptions, self.recipe.task.options, "task.options")

    def _load_tokenizer(self):
        from linreg.data.tokenizer import load_tokenizer

        r = self.recipe
        path = r.tokenizer.path or r.model.init_from
        if not path:
            path = self._train_tokenizer()
        tok = load_tokenizer(path, revision=r.tokenizer.revision if r.tokenizer.path else None)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        side = self.opts.truncation_side
        tok.truncation_side = ("left" if self.kind == "reward" else "right") if side == "auto" else side
        return tok

    def _train_tokenizer(self) -> Path:
        """No tokenizer.path and no model.init_from (toy runs): rank 0 trains a byte-level BPE with the
        recipe's ``tokenizer`` settings on the training texts into ``run_dir/tokenizer`` (kept for resume)."""
        from linreg.data.tokenizer import train_bpe

        folder = self.ctx.run_dir / "tokenizer"
        if self.ctx.is_main and not (folder / "tokenizer.json").is_file():
            texts = self._texts_for_tokenizer()[: self.recipe.tokenizer.train_docs or None]
            tok = train_bpe(texts, self.recipe.tokenizer)
            tok.save_pretrained(str(folder))
            self.ctx.log(f"trained a {len(tok)}-token byte-level BPE on {len(texts)} training texts: {folder}")
        self.ctx.barrier()
        return folder

    def _read_data(self) -> TaskData:
        # rank 0 reads first (a hub download lands in the shared cache once); on bad data every rank
        # raises the same error instead of waiting in the barrier
        error = None
        data = None
        if self.ctx.is_main:
            try:
                data = load_task_data(self.opts, self.kind)
            except LinregError as exc:
                error = exc
        self.ctx.barrier()
        if error is not None:
            raise error
        if not self.ctx.is_main:
            data = load_task_data(self.opts, self.kind)
        return data

    def _tokenize(self, texts: list[str], what: str) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        step = 1024
        for i in range(0, len(texts), step):
            enc = self.tokenizer(texts[i:i + step], truncation=True, max_length=self.recipe.train.seq_len)
            for j, ids in enumerate(enc["input_ids"]):
                if not ids:
                    raise DataError(f"{what} example {i + j}: the text tokenizes to no tokens")
                out.append(np.asarray(ids, dtype=np.int32))
        return out

    def prepare(self) -> None:
        r = self.recipe
        self.opts = self._options()
        self.data = self._read_data()
        self.tokenizer = self._load_tokenizer()
        self.pad_id = int(self.tokenizer.pad_token_id)
        self._tokenize_data()
        n_eval = len(self.data.validation)
        if self.opts.max_eval_examples is not None:
            n_eval = min(n_eval, self.opts.max_eval_examples)
        self.n_eval = n_eval
        self._track_cache = None
        self.hidden_size = None
        lengths = np.array([len(s) for s in self._train_sequences()])
        self._tokens_per_sequence = float(lengths.mean())
        truncated = float((lengths >= r.train.seq_len).mean())
        self.ctx.log(f"task {self.data.name} ({self.kind}): {len(self.data.train)} training and "
                     f"{len(self.data.validation)} validation examples ({self.n_eval} evaluated) from "
                     f"{self.data.sources['train']} / {self.data.sources['validation']}; "
                     f"{lengths.mean():.0f} tokens per sequence on average, {truncated:.1%} truncated to "
                     f"{r.train.seq_len} ({self.tokenizer.truncation_side} side)"
                     + (f"; classes {', '.join(self.data.label_names)}" if self.kind == "classification" else ""))
        if self.ctx.is_main:
            info = {"kind": self.kind, "task": self.data.name, "model": model_label(r, self.opts),
                    "dataset": self.opts.dataset, "seed": r.train.seed, "steps": r.train.steps,
                    "init_from": r.model.init_from, "num_labels": self.data.num_labels,
                    "label_names": self.data.label_names, "n_train": len(self.data.train),
                    "n_validation": len(self.data.validation), "n_evaluated": self.n_eval,
                    "sources": self.data.sources, "seq_len": r.train.seq_len,
                    "truncation_side": self.tokenizer.truncation_side, "finished": False}
            (self.ctx.run_dir / FINETUNE_INFO).write_text(json.dumps(info, indent=2) + "\n")

    def _train_sequences(self) -> list[np.ndarray]:
        raise NotImplementedError

    def _texts_for_tokenizer(self) -> list[str]:
        if self.kind == "reward":
            return [t for e in self.data.train for t in (e.chosen, e.rejected)]
        return [e.text for e in self.data.train]

    def num_train_examples(self) -> int:
        return len(self.data.train)

    def tokens_per_example(self) -> int:
        return int(round(self._tokens_per_sequence))

    # -- model ---------------------------------------------------------------------------------------
    def _num_labels(self) -> int:
        return self.data.num_labels

    def build_model(self):
        from transformers import AutoModelForSequenceClassification, MistralForSequenceClassification

        r = self.recipe
        n = self._num_labels()
        extra = {}
        if self.kind == "classification":
            names = self.data.label_names
            extra = {"id2label": dict(enumerate(names)), "label2id": {v: i for i, v in enumerate(names)}}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(r.train.seed)  # the new head (and a config-built body): the same on every rank
            if r.model.init_from:
                try:
                    model = AutoModelForSequenceClassification.from_pretrained(
                        r.model.init_from, num_labels=n, attn_implementation=r.model.attn_implementation,
                        dtype=torch.float32, **extra)
                except (OSError, ValueError) as exc:
                    raise ConfigError(f"model.init_from={r.model.init_from}: cannot load it with a sequence "
                                      f"classification head: {exc}") from exc
            else:
                from linreg.model import mistral_config

                cfg = mistral_config(r.model.config, vocab_size=len(self.tokenizer), seq_len=r.train.seq_len,
                                     attn_implementation=r.model.attn_implementation)
                cfg.num_labels = n
                for k, v in extra.items():
                    setattr(cfg, k, v)
                model = MistralForSequenceClassification(cfg)
        model = model.to(torch.float32)
        vocab = model.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > vocab:
            raise ConfigError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's embedding only "
                              f"{vocab}; use the model's own tokenizer (tokenizer.path)")
        model.config.pad_token_id = self.pad_id
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        text_cfg.pad_token_id = self.pad_id
        model.config.use_cache = False
        self.hidden_size = int(getattr(text_cfg, "hidden_size", 0) or getattr(text_cfg, "n_embd", 0) or 0)
        if r.model.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def model_config(self):
        return None  # the loop's FLOPs formula is for MistralForCausalLM; no MFU for fine-tuning

    def export(self, model, out_dir: Path) -> None:
        model.config.use_cache = True
        model.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)

    # -- tracking ------------------------------------------------------------------------------------
    def _track_sequences(self) -> list[np.ndarray]:
        raise NotImplementedError

    def tracking_batches(self) -> list[dict[str, torch.Tensor]]:
        if self._track_cache is not None:
            return self._track_cache
        n = self.recipe.track.blocks
        seqs = self._track_sequences()[:n]
        if not seqs:
            return []
        tokens = int(sum(len(s) for s in seqs))
        if self.hidden_size and tokens <= self.hidden_size + 1:
            raise DataError(f"linearity tracking: the first {len(seqs)} validation sequences (track.blocks={n}) "
                            f"hold {tokens} tokens; hidden size {self.hidden_size} needs more than "
                            f"{self.hidden_size + 1}, and many more for a score well above chance. Raise "
                            f"track.blocks")
        if self.ctx.is_main:
            chance = f", chance level about {self.hidden_size / (tokens - 1):.3f}" if self.hidden_size else ""
            self.ctx.log(f"linearity tracking on {len(seqs)} held-out sequences, {tokens} tokens{chance}")
        mine, real = split_evenly(list(range(len(seqs))), self.ctx.rank, self.ctx.world_size)
        mb = self.recipe.train.micro_batch_size
        out = []
        for i in range(0, len(mine), mb):
            ids, mask = _pad([seqs[j] for j in mine[i:i + mb]], self.pad_id)
            mask = mask * torch.tensor(real[i:i + mb], dtype=torch.long)[:, None]  # padding rows: no tokens
            out.append({"input_ids": ids, "attention_mask": mask})
        self._track_cache = out
        return out

    # -- evaluation helpers --------------------------------------------------------------------------
    def _eval_chunks(self):
        """This rank's validation indices in micro batches, with the real/padding flags."""
        mine, real = split_evenly(list(range(self.n_eval)), self.ctx.rank, self.ctx.world_size)
        mb = self.recipe.train.micro_batch_size
        for i in range(0, len(mine), mb):
            yield mine[i:i + mb], real[i:i + mb]

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.is_initialized() and self.ctx.world_size > 1:
            dist.all_reduce(t)
        return t


class ClassificationObjective(_FinetuneObjective):
    """Sequence classification with cross-entropy on a causal LM (``task.kind: classification``)."""

    kind = "classification"

    def _tokenize_data(self) -> None:
        self.train_ids = self._tokenize([e.text for e in self.data.train], "training")
        self.train_labels = np.array([e.label for e in self.data.train], dtype=np.int64)
        self.val_ids = self._tokenize([e.text for e in self.data.validation], "validation")
        self.val_labels = np.array([e.label for e in self.data.validation], dtype=np.int64)

    def _train_sequences(self):
        return self.train_ids

    def _track_sequences(self):
        return self.val_ids

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        ids, mask = _pad([self.train_ids[i] for i in indices], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.from_numpy(self.train_labels[np.asarray(indices)])}

    def loss(self, model, batch, regularizer):
        out, reg = lm_forward(model, batch, regularizer, labels=False)
        logits = out.logits.float()
        ce = torch.nn.functional.cross_entropy(logits, batch["labels"])
        parts = {"loss/task": ce, "train/accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}
        return add_regularizer(ce, parts, reg)

    @torch.no_grad()
    def predict(self, model, seqs: list[np.ndarray]) -> torch.Tensor:
        """Logits [B, num_labels] of a list of token id arrays (one padded forward)."""
        ids, mask = _pad(seqs, self.pad_id)
        return model(input_ids=ids.to(self.ctx.device), attention_mask=mask.to(self.ctx.device)).logits.float()

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        if self.n_eval == 0:
            return {}
        was = model.training
        model.eval()
        c = self.data.num_labels
        conf = torch.zeros(c, c, dtype=torch.float64, device=self.ctx.device)
        loss = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        for idx, real in self._eval_chunks():
            logits = self.predict(model, [self.val_ids[i] for i in idx])
            labels = torch.from_numpy(self.val_labels[idx]).to(self.ctx.device)
            w = torch.tensor(real, dtype=torch.float64, device=self.ctx.device)
            ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none").double()
            loss += torch.stack([(ce * w).sum(), w.sum()])
            keep = w > 0
            conf.index_put_((labels[keep], logits.argmax(-1)[keep]),
                            torch.ones(int(keep.sum()), dtype=torch.float64, device=self.ctx.device),
                            accumulate=True)
        self._all_reduce(conf)
        self._all_reduce(loss)
        model.train(was)
        m = classification_metrics(conf.cpu().numpy())
        return {"val/loss": (loss[0] / loss[1]).item(), "val/accuracy": m["accuracy"], "val/f1": m["f1"],
                "val/f1_macro": m["f1_macro"]}


class RewardObjective(_FinetuneObjective):
    """Pairwise reward modelling with a scalar head (``task.kind: reward``)."""

    kind = "reward"

    def _num_labels(self) -> int:
        return 1

    def _tokenize_data(self) -> None:
        self.train_chosen = self._tokenize([e.chosen for e in self.data.train], "training (chosen)")
        self.train_rejected = self._tokenize([e.rejected for e in self.data.train], "training (rejected)")
        self.val_chosen = self._tokenize([e.chosen for e in self.data.validation], "validation (chosen)")
        self.val_rejected = self._tokenize([e.rejected for e in self.data.validation], "validation (rejected)")
        same = sum(np.array_equal(a, b) for a, b in zip(self.train_chosen, self.train_rejected))
        if same:
            self.ctx.log(f"warning: {same} of {len(self.train_chosen)} training pairs are identical after "
                         f"tokenization and truncation to {self.recipe.train.seq_len} tokens (no signal); "
                         f"raise train.seq_len or use truncation_side: left")

    def _train_sequences(self):
        return self.train_chosen + self.train_rejected

    def tokens_per_example(self) -> int:  # one example = one pair = two sequences
        return int(round(2 * self._tokens_per_sequence))

    def _track_sequences(self):
        out = []
        for a, b in zip(self.val_chosen, self.val_rejected):
            out += [a, b]
        return out

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        seqs = [self.train_chosen[i] for i in indices] + [self.train_rejected[i] for i in indices]
        ids, mask = _pad(seqs, self.pad_id)
        return {"input_ids": ids, "attention_mask": mask}  # first half chosen, second half rejected

    def loss(self, model, batch, regularizer):
        out, reg = lm_forward(model, batch, regularizer, labels=False)
        rewards = out.logits.float().squeeze(-1)
        b = rewards.shape[0] // 2
        rc, rr = rewards[:b], rewards[b:]
        lo = pairwise_loss(rc, rr)
        parts = {"loss/reward": lo, "train/accuracy": pair_accuracy(rc, rr),
                 "train/margin": (rc - rr).mean().detach()}
        return add_regularizer(lo, parts, reg)

    @torch.no_grad()
    def rewards(self, model, seqs: list[np.ndarray]) -> torch.Tensor:
        """Scalar rewards [B] of a list of token id arrays (one padded forward)."""
        ids, mask = _pad(seqs, self.pad_id)
        out = model(input_ids=ids.to(self.ctx.device), attention_mask=mask.to(self.ctx.device))
        return out.logits.float().squeeze(-1)

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        if self.n_eval == 0:
            return {}
        was = model.training
        model.eval()
        tot = torch.zeros(4, dtype=torch.float64, device=self.ctx.device)  # loss, right, margin, count
        for idx, real in self._eval_chunks():
            r = self.rewards(model, [self.val_chosen[i] for i in idx] + [self.val_rejected[i] for i in idx]).double()
            rc, rr = r[:len(idx)], r[len(idx):]
            w = torch.tensor(real, dtype=torch.float64, device=self.ctx.device)
            lo = torch.nn.functional.softplus(rr - rc)
            tot += torch.stack([(lo * w).sum(), ((rc > rr).double() * w).sum(), ((rc - rr) * w).sum(), w.sum()])
        self._all_reduce(tot)
        model.train(was)
        n = tot[3].item()
        return {"val/loss": tot[0].item() / n, "val/accuracy": tot[1].item() / n, "val/margin": tot[2].item() / n}

